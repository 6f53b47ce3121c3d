"""StepBatcher (service/engine/batching.py): the steps of concurrent requests share UNet calls in
one process, each request's answer exactly what it gets alone, adapters per row, a failing request
failing alone, a cancelled one leaving the others untouched."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from bench.reference_adapters import write_reference_lora
from service.adapters import BankedAdapters, parse_adapter
from service.engine.batching import StepBatcher
from service.engine.default_model import default_model_dir
from service.engine.pipeline import AdapterUse, Engine, GenerationSpec
from service.engine.sampling import generation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(model_cache, tmp_path_factory):
    model_dir = default_model_dir(model_cache)
    engine = Engine.from_pretrained(model_dir)
    adapters = {}
    for key, (rank, seed) in {"a": (4, 1), "b": (8, 2)}.items():
        path = write_reference_lora(tmp_path_factory.mktemp(f"lora-{key}"), engine.unet, rank=rank, alpha=4.0,
                                    seed=seed, std=0.1)
        adapters[key] = parse_adapter(str(path))

    def load(key):
        if key not in adapters:
            raise KeyError(f"no adapter {key!r}")
        return adapters[key]

    BankedAdapters.attach(engine, load, num_slots=4, max_rank=8, max_rows=32, registry=CollectorRegistry())
    return engine


# Different samplers too: each row carries its own timestep and its loop's input scaling, so DDIM,
# DPM-Solver++ with Karras sigmas (float timesteps), Euler ancestral (seeded step noise) and LCM at
# guidance 1 (one row per image) share UNet calls.
SPECS = [
    GenerationSpec(prompt="a red circle", steps=4, seed=1),
    GenerationSpec(prompt="a blue square", steps=6, seed=2, adapters=(AdapterUse("a"),), sampler="dpmpp_2m",
                   karras_sigmas=True),
    GenerationSpec(prompt="a green star", steps=5, seed=3, num_images=2, adapters=(AdapterUse("b", 0.7),),
                   sampler="euler_ancestral"),
    GenerationSpec(prompt="a heart", steps=4, seed=4, adapters=(AdapterUse("a", 0.5), AdapterUse("b", 0.5)),
                   sampler="lcm", guidance_scale=1.0),
]


def _alone(engine, spec):
    return np.stack([np.asarray(img, dtype=np.int16) for img in engine.generate(spec).images])


async def _together(engine, batcher, specs, should_stop=lambda: False):
    loops = [generation(s, engine.facts, should_stop, device=engine.device, dtype=engine.dtype) for s in specs]
    return await asyncio.gather(*(batcher.run(loop) for loop in loops), return_exceptions=True)


def test_concurrent_requests_share_unet_calls_and_get_what_they_get_alone(engine):
    batcher = StepBatcher(engine, max_rows=32)
    try:
        outs = asyncio.run(_together(engine, batcher, SPECS))
        again = asyncio.run(_together(engine, batcher, SPECS[:2]))  # the same batcher on another event loop
    finally:
        batcher.close()
    assert all(not isinstance(out, BaseException) for out in again), again
    for spec, out in zip(SPECS, outs):
        assert not isinstance(out, BaseException), out
        assert np.abs(out.images.astype(np.int16) - _alone(engine, spec)).max() <= 1, spec.prompt
        assert max(step.batch_size for step in out.steps) > 2 * spec.num_images  # shared with others
    # 19 request steps (4 + 6 + 5 + 4) in fewer UNet calls, with rows of different adapters together.
    assert batcher.stats.steps == 19 + 10 and batcher.stats.calls < 29 and batcher.stats.mean_rows > 2


def test_max_rows_caps_a_call(engine):
    batcher = StepBatcher(engine, max_rows=4)
    try:
        outs = asyncio.run(_together(engine, batcher, SPECS))
    finally:
        batcher.close()
    assert all(max(s.batch_size for s in out.steps) <= 4 for out in outs)


def test_a_failing_request_fails_alone(engine):
    specs = SPECS[:2] + [GenerationSpec(prompt="x", steps=3, seed=5, adapters=(AdapterUse("missing"),))]
    batcher = StepBatcher(engine, max_rows=32)
    try:
        outs = asyncio.run(_together(engine, batcher, specs))
    finally:
        batcher.close()
    assert isinstance(outs[2], Exception) and "missing" in str(outs[2])
    for spec, out in zip(specs[:2], outs[:2]):
        assert np.abs(out.images.astype(np.int16) - _alone(engine, spec)).max() <= 1


def test_a_cancelled_request_leaves_the_others(engine):
    async def scenario(batcher):
        loop = asyncio.get_running_loop()
        stepped = asyncio.Event()  # the request to cancel has run a step (cancelled mid-way, not before)

        def on_step(info):  # (on the model thread)
            loop.call_soon_threadsafe(stepped.set)

        loops = [generation(s, engine.facts, on_step=on_step if i == 1 else None, device=engine.device,
                            dtype=engine.dtype) for i, s in enumerate(SPECS[:3])]
        tasks = [asyncio.ensure_future(batcher.run(loop)) for loop in loops]
        await asyncio.wait_for(stepped.wait(), 60)
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    batcher = StepBatcher(engine, max_rows=32)
    try:
        outs = asyncio.run(scenario(batcher))
    finally:
        batcher.close()
    assert isinstance(outs[1], asyncio.CancelledError)
    for i in (0, 2):
        assert np.abs(outs[i].images.astype(np.int16) - _alone(engine, SPECS[i])).max() <= 1


def test_every_step_is_measured_by_its_width_in_default_resolution_rows(engine):
    """What BatchWidth (service/engine/width.py) fits the device's cost of wider calls from: each
    UNet call's rows, counted at the default resolution (a row's cost goes with its pixels), and the
    seconds until the next call (the call, then each answered request's own guidance and step)."""
    import time

    from service.admission import BatchWidth

    class Recording(BatchWidth):
        def __init__(self):
            super().__init__()
            self.observed = []

        def observe(self, rows, seconds):
            self.observed.append((rows, seconds))
            super().observe(rows, seconds)

    side = engine.limits.default_size
    latent_pixels = (side // engine.vae_scale_factor) ** 2
    specs = [GenerationSpec(prompt="a red circle", steps=3, seed=1, width=side, height=side),
             GenerationSpec(prompt="a blue square", steps=3, seed=2, num_images=2, width=side, height=side),
             GenerationSpec(prompt="a small star", steps=3, seed=3, width=side // 2, height=side // 2)]
    width = Recording()
    batcher = StepBatcher(engine, max_rows=32, width=width)
    calls = []  # (rows at the default resolution, compute seconds) of every UNet call, in order
    compute = batcher._compute

    def spy(batch):
        started = time.perf_counter()
        try:
            return compute(batch)
        finally:
            rows = sum(c.latents.shape[0] * c.latents.shape[-1] * c.latents.shape[-2] for c in batch) / latent_pixels
            calls.append((rows, time.perf_counter() - started))

    batcher._compute = spy
    try:
        outs = asyncio.run(_together(engine, batcher, specs))
    finally:
        batcher.close()
    assert all(not isinstance(out, BaseException) for out in outs), outs
    assert batcher.width is width
    # Each observation is a call's, in order (the last call before the queue runs dry has no next
    # one to end its step), and takes at least the call itself.
    i = 0
    for rows, seconds in width.observed:
        while calls[i][0] != rows:
            i += 1
        assert seconds >= calls[i][1]
        i += 1
    assert len(calls) - 3 <= len(width.observed) < len(calls)
    # 2 rows at 64x64, 4 rows, and 2 rows at a quarter of the pixels: a call of all three is 6.5.
    assert {rows for rows, _ in calls} <= {2, 4, 0.5, 6, 2.5, 4.5, 6.5}


def test_the_width_is_measured_at_start_or_read_from_the_runtime_choice(engine):
    """measure_width(): a 2-row call against a wide one on this CPU, which costs about its rows, so
    the width stays narrow; with the UNet runtime chooser's timings at hand, those, unmeasured."""
    from types import SimpleNamespace

    before = engine.unet_runtime_choice
    engine.unet_runtime_choice = None
    batcher = StepBatcher(engine, max_rows=32)
    try:
        batcher.measure_width().result(120)
        measured = batcher.width
        assert measured.seeded_by == "measured at start"
        assert measured.slowdown(8) > 2 and measured.requests(8) <= 3, measured.describe()
    finally:
        batcher.close()
    engine.unet_runtime_choice = SimpleNamespace(kind="onnx", step_ms={"eager": {"2": 50.0, "16": 400.0},
                                                                       "onnx": {"2": 30.0, "16": 31.4}})
    batcher = StepBatcher(engine, max_rows=32)
    try:
        batcher.measure_width().result(120)
        assert batcher.width.seeded_by == "the UNet runtime chooser's timings"
        assert batcher.width.call_seconds(16) == pytest.approx(0.0314) and batcher.width.requests(8) == 8
    finally:
        engine.unet_runtime_choice = before
        batcher.close()


def test_the_in_process_gateway_batches_concurrent_generate_calls(gateway):
    """Through the public API: concurrent Generate calls on the in-process backend share UNet calls
    (the batcher's counters on /metrics), each answer what the same call gets alone."""
    import re
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from service._generated.steerserve.v1 import steerserve_pb2 as pb
    from tests.conftest import auth

    def metric(name: str) -> float:
        text = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    requests = [pb.GenerateRequest(prompt=f"a shape {i}", steps=6, seed=i) for i in range(4)]
    alone = [gateway.stub().Generate(r, metadata=auth()).images[0].data for r in requests]
    steps0, calls0 = metric("steerserve_engine_steps_total"), metric("steerserve_engine_unet_calls_total")
    # Admission runs as many at once as this CPU's measured batch width (1-2: tests/test_batch_width.py);
    # here all 4 (its slots), to see what the batcher does with them.
    admission = gateway.gateway.servicer.admission
    width, admission.width = admission.width, None
    assert width is gateway.gateway.servicer.backend.batch_width  # the gateway's admission follows its backend
    try:
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda r: gateway.stub().Generate(r, metadata=auth()).images[0].data, requests))
    finally:
        admission.width = width
    steps = metric("steerserve_engine_steps_total") - steps0
    calls = metric("steerserve_engine_unet_calls_total") - calls0
    assert steps == 4 * 6 and calls < steps  # steps of different requests shared UNet calls
    # What a request sees does not change (batched matmuls may round a level apart).
    import io

    from PIL import Image

    def pixels(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)

    for a, b in zip(alone, together):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_a_call_takes_only_the_steps_whose_adapters_fit_the_banks_slots(model_cache, tmp_path):
    """Three requests with three different adapters, a bank of two adapter slots: every UNet call
    applies at most two; the third request waits for the next call instead of failing the merged
    one (and being retried alone); all three get what they get alone, each adapter read once
    (prefetched into host memory when its request arrived)."""
    engine = Engine.from_pretrained(default_model_dir(model_cache))
    files = {k: parse_adapter(str(write_reference_lora(tmp_path / k, engine.unet, rank=4, alpha=4.0, seed=s, std=0.1)))
             for k, s in (("a", 1), ("b", 2), ("c", 3))}
    reads: list[str] = []

    def load(key):
        reads.append(key)
        return files[key]

    hook = BankedAdapters.attach(engine, load, num_slots=3, max_rank=8, max_rows=32, registry=CollectorRegistry())
    calls: list[set[str]] = []
    predict = engine.predict_noise

    def spy(latents, timesteps, embeds, rows):
        calls.append({use.key for row in rows for use in row})
        return predict(latents, timesteps, embeds, rows)

    engine.predict_noise = spy
    specs = [GenerationSpec(prompt=p, steps=4, seed=i, adapters=(AdapterUse(k, tenant=f"t{i}"),))
             for i, (p, k) in enumerate((("a red circle", "a"), ("a blue square", "b"), ("a green star", "c")))]
    batcher = StepBatcher(engine, max_rows=32)
    try:
        outs = asyncio.run(_together(engine, batcher, specs))
    finally:
        batcher.close()
        engine.predict_noise = predict
    assert all(not isinstance(out, BaseException) for out in outs), outs
    assert calls and max(len(keys) for keys in calls) <= 2, calls
    assert batcher.stats.deferred > 0
    assert sorted(reads) == ["a", "b", "c"]  # none read twice: no failed merged call, no reload
    assert hook.manager.metrics.prefetched._value.get() == 3
    for spec, out in zip(specs, outs):
        assert np.abs(out.images.astype(np.int16) - _alone(engine, spec)).max() <= 1, spec.prompt
    hook.manager.close()
