"""Through Triton the batch width follows the device too: the `generate` instances measure what a
step costs by width and send it with each result (STEP_COST_S), and the gateway's admission runs
that many requests at once per ready replica."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.admission import Admission, AdmissionLimits
from service.backends.triton import TritonBackend
from service.engine.default_model import default_model_dir
from service.engine.pipeline import GenerationSpec
from service.engine.sampling import StepInfo
from service.engine.width import BatchWidth, ReplicatedWidth
from service.triton import wire
from tests.test_triton_replicas import StandInTriton, start_stand_in

CPU_LIKE = (0.0005, 0.015)  # a step costs about the sum of its rows: one request at a time pays
GPU_LIKE = (0.030, 0.0005)  # fixed cost dominates: batch wide


class CostReportingTriton(StandInTriton):
    """The stand-in's `generate` answers, plus the STEP_COST_S a real instance sends."""

    def __init__(self, cost):
        super().__init__()
        self.cost = cost

    def ModelStreamInfer(self, request_iterator, context):
        for response in super().ModelStreamInfer(request_iterator, context):
            out = response.infer_response
            out.outputs.add(name="STEP_COST_S", datatype="FP64", shape=[2])
            out.raw_output_contents.append(np.array(self.cost, np.float64).tobytes())
            yield response


def test_the_wire_carries_the_step_cost_and_tolerates_its_absence():
    steps = [StepInfo(step=1, total=1, batch_size=2, queue_seconds=0.001)]
    message = wire.generate_result(np.zeros((1, 8, 8, 3), np.uint8), [1], {}, steps, step_cost=CPU_LIKE)
    assert wire.read_generate_response(message.get).step_cost == pytest.approx(CPU_LIKE)
    unmeasured = wire.generate_result(np.zeros((1, 8, 8, 3), np.uint8), [1], {}, steps)
    assert wire.read_generate_response(unmeasured.get).step_cost is None
    older = {k: v for k, v in message.items() if k != "STEP_COST_S"}  # a model of an earlier version
    assert wire.read_generate_response(older.get).step_cost is None


def test_replicated_width_runs_the_width_per_ready_replica():
    width = BatchWidth()
    ready = [1]
    both = ReplicatedWidth(width, lambda: ready[0])
    assert both.requests(8) == 8  # nothing measured: the slots setting
    width.seed({2.0: CPU_LIKE[0] + 2 * CPU_LIKE[1], 16.0: CPU_LIKE[0] + 16 * CPU_LIKE[1]})
    assert width.requests(8) == 1 and both.requests(8) == 1
    ready[0] = 3
    assert both.requests(8) == 3 and both.requests(2) == 2  # per replica, at most the slots


@pytest.mark.parametrize("cost, expected", [(CPU_LIKE, 1), (GPU_LIKE, 8)])
def test_the_gateway_admission_follows_what_triton_measured(model_cache, cost, expected):
    server, _, port = start_stand_in(CostReportingTriton(cost))
    metrics = type("Metrics", (), {"registry": CollectorRegistry()})()

    async def scenario():
        backend = TritonBackend(f"127.0.0.1:{port}", default_model_dir(model_cache), metrics=metrics)
        admission = Admission(AdmissionLimits(slots=8), width=backend.batch_width)
        try:
            before = admission.concurrency()
            await backend.generate(GenerationSpec(prompt="a photo", steps=2, seed=1), deadline=None)
            return before, admission.concurrency()
        finally:
            await backend.close()

    try:
        before, after = asyncio.run(scenario())
    finally:
        server.stop(0)
    assert before == 8  # until a result says what a step costs there
    assert after == expected
