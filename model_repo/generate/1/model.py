"""Triton python-backend model `generate`: text to image, the sampling loop and the UNet in one
model execution, many requests in flight.

Decoupled with `async def execute`: the stub runs each request as a coroutine on its event loop, so
one instance holds many requests. Each runs service.engine.sampling.generation (the loop the
in-process backend runs too), and its model calls go to this instance's own engine through a
StepBatcher (service/engine/batching.py): the steps of every request in flight meet in one UNet
call, rows with different adapters included, with no BLS round trip per step. Tensors:
service/triton/wire.py.
"""

import asyncio
import json
import time

import triton_python_backend_utils as pb_utils
from prometheus_client import CollectorRegistry

from service.compiled.configure import runtime_status
from service.engine.batching import StepBatcher
from service.engine.sampling import generation
from service.triton import wire
from service.triton.bank_metrics import BankMetrics
from service.triton.bls import request_reader, tensors
from service.triton.parts import instance_engine, instance_settings, instance_share
from service.triton.runtime_metrics import RuntimeInfoMetric, StepMetrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        max_rows = int(config["parameters"]["max_rows"]["string_value"])
        registry = CollectorRegistry()  # this instance's bank series, exported through Triton below
        settings = instance_settings()
        self.engine = engine = instance_engine(settings, args, max_rows=max_rows, unet_runtime=True, registry=registry,
                                               image_prompts=True)
        self.share = instance_share(settings, args)  # serving first: training steps wait while requests run
        # The model thread runs the torch threads the UNet runtime was measured with.
        self.batcher = StepBatcher(engine, max_rows=max_rows, threads=settings.torch_threads)
        # What a step costs by width, measured now on the model thread and then from every call:
        # each result carries it, and the gateway's admission runs as many at once as that pays.
        self.batcher.measure_width()
        self.bank_metrics = BankMetrics(pb_utils, engine, registry, args) if engine.adapters.manager is not None else None
        self.runtime_info = RuntimeInfoMetric(pb_utils, engine, args)
        self.step_metrics = StepMetrics(pb_utils, self.batcher, args)
        pb_utils.Logger.log_info(runtime_status(engine))

    async def execute(self, requests):
        await asyncio.gather(*(self._generate(r) for r in requests))
        self.step_metrics.update()
        self.runtime_info.update()
        if self.bank_metrics is not None:
            self.bank_metrics.update()

    async def _generate(self, request):
        sender = request.get_response_sender()
        try:
            spec, timeout, progress = wire.read_generate_request(request_reader(request))
            deadline = time.monotonic() + timeout if timeout else None

            def should_stop():
                return request.is_cancelled() or (deadline is not None and time.monotonic() >= deadline)

            def on_step(info):
                if progress:
                    message = wire.generate_progress(info.step, info.batch_size, info.queue_seconds)
                    sender.send(pb_utils.InferenceResponse(output_tensors=tensors(message)))

            loop = generation(spec, self.engine.facts, should_stop, on_step, device=self.engine.device,
                              dtype=self.engine.dtype)
            with self.share.serving():
                out = await self.batcher.run(loop)
            message = wire.generate_result(out.images, out.seeds, out.timings, out.steps, self.batcher.width.fit())
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors(message)), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with its status
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(wire.status_message(exc))), flags=FINAL)

    def finalize(self):
        self.batcher.close()
        if self.share.state is not None:
            self.share.state.close()
        if self.engine.adapters.manager is not None:
            self.engine.adapters.manager.close()
