"""How many requests share a UNet call (service/engine/width.py): narrow where a wider call
costs its rows (a CPU), wide where it costs about the same (a GPU), never wider than the running
requests' deadlines allow; admission runs that many at once, so under a flood another tenant's
request starts while the flood still waits; and the in-process backend measures its device."""

from __future__ import annotations

import asyncio

import pytest

from service.admission import Admission, AdmissionLimits, BatchWidth

# Seconds of a step of `rows` rows: CPU-like (a small model on a CPU, some cost per call: this
# machine's embedded model measured 19-24 ms + 6-19 ms a row), proportional (a bigger model on a
# CPU), GPU-like (a fixed cost, a tiny one a row).
CPU = {2: 0.025 + 2 * 0.0063, 16: 0.025 + 16 * 0.0063}
PROPORTIONAL = {2: 0.2, 4: 0.4, 16: 1.6}
GPU = {2: 0.030 + 2 * 0.00005, 16: 0.030 + 16 * 0.00005}
MIDDLE = {2: 0.032, 16: 0.039}  # 31 ms + 0.5 ms a row: 8 at once cost each 1.22x


def seeded(points) -> BatchWidth:
    width = BatchWidth()
    width.seed(points)
    return width


def test_a_cpu_like_cost_keeps_the_width_narrow_and_a_gpu_like_one_goes_wide():
    assert seeded(PROPORTIONAL).requests(8) == 1  # each more request only slows every one
    assert seeded(CPU).requests(8) == 2  # 2 requests: 1.34x each (3: 1.67x, over the 1.4x budget)
    assert seeded(GPU).requests(8) == 8  # the cap (the slots setting)
    assert seeded(GPU).requests(64) == 64
    cpu, gpu = seeded(CPU), seeded(GPU)
    assert cpu.slowdown(8) > 3 and gpu.slowdown(8) < 1.05
    # Nothing measured yet: the cap (the setting), as before there was a measurement.
    assert BatchWidth().requests(8) == 8 and BatchWidth().slowdown(4) is None


def test_deadlines_cap_the_width():
    width = seeded(MIDDLE)
    assert width.requests(8) == 8
    # A running request estimated while it ran alone, with 10% of slack to its deadline: a step of
    # k requests costs (31 + k) / 32 of its 1-wide one, so at most 4 (1.09x; 5 would be 1.13x).
    assert width.requests(8, [(1.10, 1)]) == 4
    # The same slack on a request estimated at 4 wide: from there, up to 7 (1.09x of 4-wide; 8
    # would be 1.11x).
    assert width.requests(8, [(1.10, 4)]) == 7
    # The tightest running request decides; one that cannot be slowed at all stops any widening
    # past what it was estimated at (but nothing is taken from what already runs).
    assert width.requests(8, [(3.0, 1), (1.10, 1)]) == 4
    assert width.requests(8, [(0.9, 3)]) == 3
    # A CPU-like device stays narrow however much slack there is.
    assert seeded(PROPORTIONAL).requests(8, [(100.0, 1)]) == 1


def test_recent_calls_override_the_start_measurement_once_they_span_two_widths():
    width = seeded(PROPORTIONAL)
    for _ in range(5):  # calls of one width alone say nothing about wider ones: the seed stands
        width.observe(2, 0.030)
    assert width.requests(8) == 1
    for _ in range(5):  # a 16-row call costs what a 2-row one does: it is a GPU after all
        width.observe(16, 0.031)
    assert width.requests(8) == 8
    fixed, per_row = width.fit()
    assert fixed == pytest.approx(0.0299, abs=1e-3) and per_row == pytest.approx(0.0000714, abs=1e-4)
    # Calls 2x apart are enough; a few odd ones do not move the medians.
    width = BatchWidth()
    for seconds in (0.031, 0.030, 0.5, 0.032, 0.031):
        width.observe(2, seconds)
    for seconds in (0.042, 0.043, 0.041, 0.001, 0.042):
        width.observe(4, seconds)
    assert width.requests(8) == 2


def test_nearby_recent_widths_do_not_flatten_the_start_measurement():
    """A CPU serving 1-2 requests calls 2 and 4 rows. On a loaded host 2-row calls caught by
    another process can look as slow as 4-row ones: from those two points alone the slope is flat
    and all 8 of a flood would run at once (a CI failure: the flood's 6 waiting ones all started
    with another tenant's). The start-up measurement's wide call keeps the far end of the fit."""
    width = seeded(CPU)
    for _ in range(5):
        width.observe(2, 0.050)  # inflated by load
        width.observe(4, 0.051)
    assert width.requests(8) <= 2 and width.slowdown(8) > 2
    # Recent calls 4x apart decide alone (a GPU after all, whatever the start said).
    for _ in range(5):
        width.observe(16, 0.052)
    assert width.requests(8) == 8


# -- admission follows the width ----------------------------------------------------------------


class Clock:
    """Admission's clock, moved by the test: estimates without waiting."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gated(log: list, name: str, gate: asyncio.Event, clock: Clock | None = None, seconds: float = 0.0):
    async def work():
        log.append(("start", name))
        await gate.wait()
        if clock is not None:
            clock.now += seconds
        log.append(("end", name))
        return name

    return work


def test_admission_runs_the_width_at_once_and_the_other_tenant_starts_while_the_flood_waits():
    async def scenario(points):
        admission = Admission(AdmissionLimits(slots=8), width=seeded(points))
        log, gates = [], [asyncio.Event() for _ in range(8)]
        flood = [asyncio.ensure_future(admission.run("alice", "generate", 10, None, gated(log, f"a{i}", gates[i])))
                 for i in range(8)]
        await asyncio.sleep(0)  # (every admission decided: the tasks ran up to their first wait)
        running_in_flood = admission.running()
        await asyncio.wait_for(_until(lambda: len(log) == running_in_flood), 10)  # their work started
        bob_gate = asyncio.Event()
        bob = asyncio.ensure_future(admission.run("bob", "generate", 10, None, gated(log, "b", bob_gate)))
        await asyncio.sleep(0)
        bob_at_once = admission.running("bob")
        # The first of alice's running ones ends: bob's request is next, alice's still wait.
        gates[int(log[0][1][1:])].set()
        await asyncio.wait_for(_until(lambda: ("start", "b") in log), 10)
        alice_waiting = admission.waiting("alice")
        for g in gates + [bob_gate]:
            g.set()
        await asyncio.gather(*flood, bob)
        assert admission.running() == 0 and admission.waiting() == 0
        return running_in_flood, bob_at_once, alice_waiting

    # CPU-like: 2 of alice's run at once; bob starts after the first of them, 6 of alice's waiting.
    assert run(scenario(CPU)) == (2, 0, 6)
    # GPU-like: all 8 run at once (the slots); bob waits for one of them (nothing of alice's waits).
    assert run(scenario(GPU)) == (8, 0, 0)


async def _until(predicate) -> None:
    """Polls `predicate` on the event loop (the caller bounds it with wait_for)."""
    while not predicate():
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def test_admission_widens_no_further_than_a_running_requests_deadline_allows():
    async def scenario(deadline_slack):
        clock = Clock()
        width = seeded(MIDDLE)  # 8 at once within the budget (see above)
        admission = Admission(AdmissionLimits(slots=8), clock=clock, width=width)
        log, gate = [], asyncio.Event()
        gate.set()
        # Measure: 10 units take 1 s alone.
        await admission.run("carol", "generate", 10, None, gated(log, "calibrate", gate, clock, 1.0))
        held = asyncio.Event()
        deadline = None if deadline_slack is None else clock.now + deadline_slack
        tight = asyncio.ensure_future(admission.run("carol", "generate", 10, deadline, gated(log, "tight", held)))
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(admission.run("dave", "generate", 10, None, gated(log, f"d{i}", held)))
                  for i in range(6)]
        await asyncio.sleep(0)
        running = admission.running()
        held.set()
        await asyncio.gather(tight, *others)
        return running

    assert run(scenario(None)) == 7  # no deadline binds: all at once
    # 1 s of work and 1.1 s to its deadline: at most 1.1x slower, so 4 at once (see above).
    assert run(scenario(1.1)) == 4


def test_admission_without_a_width_keeps_its_slots():
    async def scenario():
        admission = Admission(AdmissionLimits(slots=3))
        log, gate = [], asyncio.Event()
        tasks = [asyncio.ensure_future(admission.run("alice", "generate", 1, None, gated(log, f"a{i}", gate)))
                 for i in range(5)]
        await asyncio.sleep(0)
        running = admission.running()
        gate.set()
        await asyncio.gather(*tasks)
        return running

    assert run(scenario()) == 3


# -- on this machine's CPU, through the in-process backend ---------------------------------------


@pytest.mark.slow
def test_under_a_flood_another_tenants_request_runs_before_the_flood_drains(model_cache, one_torch_thread):
    """The in-process backend measures what a wider UNet call costs on this CPU (about its rows), so
    admission (built beside it, as the gateway builds it: slots 8) runs 1-2 requests at once, not 8.
    Alice floods 8 Generate calls, then bob sends one: bob's starts while most of alice's still wait
    in her queue, and ends before most of hers. (With 8 at once, alice's 8 all run together and
    bob's starts when her queue is already empty, and ends after them all.)"""
    from prometheus_client import CollectorRegistry

    from service.admission import generate_cost
    from service.backends.inprocess import InProcessBackend
    from service.engine.default_model import default_model_dir
    from service.engine.pipeline import Engine
    from service.engine.sampling import GenerationSpec
    from service.gateway.metrics import GatewayMetrics

    model_dir = default_model_dir(model_cache)
    metrics = GatewayMetrics(CollectorRegistry(), watch_gpus=False)
    backend = InProcessBackend(Engine.from_pretrained(model_dir), model_dir, metrics=metrics, torch_threads=1)
    admission = Admission(AdmissionLimits(slots=8, max_queue=64, tenant_max_queued=64), metrics,
                          width=backend.batch_width)
    spec = GenerationSpec(prompt="a red circle on a blue background", steps=6, seed=1)
    assert admission.width is backend.batch_width

    async def scenario():
        ended, alice_waiting_when_bob_started = [], []

        async def call(tenant):
            def work():
                if tenant == "bob":
                    alice_waiting_when_bob_started.append(admission.waiting("alice"))
                return backend.generate(spec, None)

            await admission.run(tenant, "generate", generate_cost(spec), None, work)
            ended.append(tenant)

        for _ in range(2):  # warm up (after the width's measurement at start, queued before them)
            await call("carol")
        flood = [asyncio.ensure_future(call("alice")) for _ in range(8)]
        await asyncio.sleep(0)  # (the flood is admitted: as many run as the width says, the rest wait)
        running = admission.running("alice")
        await call("bob")
        await asyncio.gather(*flood)
        return running, alice_waiting_when_bob_started[0], ended[2:].index("bob")

    try:
        running, alice_waiting, bob_place = asyncio.run(scenario())
        width = backend.batch_width
        print(f"\nwidth {running}: {width.describe()}; alice waiting when bob started {alice_waiting}; "
              f"bob ended {bob_place + 1} of 9")
        assert width.fit() is not None and width.slowdown(8) > 2  # a CPU: 8 rows cost far more than 2
        assert 1 <= running <= 3
        assert 1 <= metrics.registry.get_sample_value("steerserve_batch_width") <= 3
        assert alice_waiting >= 4  # bob's request started long before alice's queue drained
        assert bob_place <= 4  # and ended before most of alice's
    finally:
        asyncio.run(backend.close())


def test_until_measured_a_cpu_runs_one_request_at_a_time_and_a_gpu_the_slots():
    from types import SimpleNamespace

    from service.engine.batching import StepBatcher

    assert BatchWidth(unknown=1).requests(8) == 1 and BatchWidth().requests(8) == 8
    for device, expected in (("cpu", 1), ("cuda", 8)):
        engine = SimpleNamespace(device=SimpleNamespace(type=device), unet_runtime=SimpleNamespace(on_promote=[]))
        batcher = StepBatcher(engine, max_rows=16)
        try:
            assert batcher.width.requests(8) == expected
            assert engine.unet_runtime.on_promote == [batcher.measure_width]  # measured again after a switch
        finally:
            batcher.close()


def test_replicas_share_a_running_requests_deadline_base():
    from service.engine.width import ReplicatedWidth

    width = BatchWidth()
    width.seed({2.0: 0.030 + 2 * 0.0005, 16.0: 0.030 + 16 * 0.0005})  # GPU-like: wide pays
    two = ReplicatedWidth(width, lambda: 2)
    assert two.requests(16) == 16
    # 4 running over 2 replicas (2 each), one of them with no slack to spare: no replica goes wider.
    assert two.requests(16, [(1.0, 4)]) == 4
