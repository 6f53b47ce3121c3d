"""The compiled UNet runtimes (service/compiled) on the embedded model, against the eager banked UNet.

- onnx: one exported graph with the bank as inputs serves rows with different adapters in one call
  (within 1e-4 of PyTorch), sees hot swaps without re-export, is cached, falls back to eager for
  shapes it was not exported for;
- compile: torch.compile'd UNet, adapter swaps with error_on_recompile=True;
- the Triton `unet` model runs the onnx runtime when configured.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from service.adapters import BankedAdapters, parse_adapter
from service.adapters.testing import write_reference_lora
from service.compiled import RuntimeOptions, batch_buckets, configure_unet_runtime
from service.compiled import onnx_export
from service.compiled.onnx_export import GRAPH_FILE, LAYERS_FILE
from service.compiled.onnx_runtime import OnnxUNet
from service.compiled.runtime import bucket_for, pad_rows
from service.compiled.torch_compile import CompiledUNet
from service.config import Settings
from service.engine.default_model import default_model_dir
from service.engine.pipeline import AdapterUse, Engine, GenerationSpec

ATOL = 1e-4  # the bar (fp32); observed ~2e-6
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(model_cache):
    return default_model_dir(model_cache)


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """Three users' LoRAs on every attention projection, different ranks and alphas."""
    unet = Engine.from_pretrained(model_dir).unet
    out = {}
    for key, (rank, alpha, seed) in {"a": (4, 8.0, 1), "b": (2, 3.0, 2), "c": (8, 4.0, 3)}.items():
        path = write_reference_lora(tmp_path_factory.mktemp(f"lora-{key}"), unet, rank=rank, alpha=alpha, seed=seed,
                                    std=0.1)
        out[key] = parse_adapter(str(path))
    return out


def banked_engine(model_dir, adapters, slots: int = 3) -> Engine:
    """slots=3: two adapters resident at once, so a third forces a swap into a bound slot."""
    engine = Engine.from_pretrained(model_dir)
    BankedAdapters.attach(engine, lambda key: adapters[key], num_slots=slots, max_rank=8, max_rows=8,
                           registry=CollectorRegistry())
    return engine


@pytest.fixture(scope="module")
def eager(model_dir, adapters):
    return banked_engine(model_dir, adapters, slots=5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture(scope="module")
def onnx_engine(model_dir, adapters, cache_dir):
    engine = banked_engine(model_dir, adapters)
    configure_unet_runtime(engine, RuntimeOptions(kind="onnx", cache_dir=cache_dir))
    return engine


def step_inputs(engine: Engine, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = engine.limits.default_size // engine.vae_scale_factor
    latents = torch.randn(rows, engine.unet.config.in_channels, size, size, generator=g)
    timesteps = torch.randint(1, 1000, (rows,), generator=g)
    embeds = engine.encode_prompts([f"prompt {i}" for i in range(rows)])
    return latents, timesteps, embeds


MIXED_ROWS = [
    [AdapterUse("a")],
    [AdapterUse("b", 0.5), AdapterUse("a", 1.0)],
    [],
    [AdapterUse("a", 0.7)],
]


# -- onnx ------------------------------------------------------------------------------------------


def test_onnx_graph_has_the_bank_as_inputs(onnx_engine):
    runtime = onnx_engine.unet_runtime
    assert isinstance(runtime, OnnxUNet)
    inputs = {i.name: i for i in runtime.session.get_inputs()}
    bank = onnx_engine.adapters.bank
    unet_layers = [n for n in bank.layers if n.startswith("unet.")]
    assert len(inputs) == 5 + 2 * len(unet_layers)
    for name in ("sample", "timestep", "encoder_hidden_states", "slot_ids", "coef"):
        assert inputs[name].shape[0] == "batch"
    assert inputs["bank.0.A"].shape == [bank.num_slots, bank.max_rank, bank.layers[unet_layers[0]].in_features]
    layers = json.loads((runtime.graph_path.parent / LAYERS_FILE).read_text())["layers"]
    assert layers == [n.removeprefix("unet.") for n in unet_layers]
    # The graph's weights are the base model's: no adapter is baked in.
    assert runtime.stats.fallback_calls == 0


@pytest.mark.parametrize("rows", [MIXED_ROWS, MIXED_ROWS[:1], MIXED_ROWS[2:3]])
def test_onnx_rows_with_different_adapters_match_pytorch(onnx_engine, eager, rows):
    latents, timesteps, embeds = step_inputs(eager, len(rows))
    calls = onnx_engine.unet_runtime.stats.calls
    got = onnx_engine.predict_noise(latents, timesteps, embeds, rows)
    want = eager.predict_noise(latents, timesteps, embeds, rows)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert onnx_engine.unet_runtime.stats.calls == calls + 1 and onnx_engine.unet_runtime.stats.fallback_calls == 0
    if any(rows):  # the adapters change the prediction (so the comparison above means something)
        base = eager.predict_noise(latents, timesteps, embeds, [[]] * len(rows))
        assert (want - base).abs().max() > 1e-2


def test_onnx_hot_swap_is_a_copy_into_bound_memory_not_a_reexport(onnx_engine, eager, monkeypatch):
    runtime = onnx_engine.unet_runtime
    session = runtime.session
    monkeypatch.setattr(onnx_export, "export_unet", lambda *a, **k: pytest.fail("re-exported on a swap"))
    manager = onnx_engine.adapters.manager
    latents, timesteps, embeds = step_inputs(eager, 2, seed=1)
    for rows in ([[AdapterUse("a")], [AdapterUse("b")]], [[AdapterUse("c")], [AdapterUse("a")]],
                 [[AdapterUse("b")], [AdapterUse("c", 0.3)]]):
        before = dict(manager.resident())
        got = onnx_engine.predict_noise(latents, timesteps, embeds, rows)
        torch.testing.assert_close(got, eager.predict_noise(latents, timesteps, embeds, rows), rtol=0, atol=ATOL)
    # Two slots for three adapters: the last calls evicted and loaded into slots the session had bound.
    assert manager.metrics.evictions._value.get() >= 1 and before != manager.resident()
    assert runtime.session is session


def test_onnx_graph_is_cached_per_model_and_bank_layout(onnx_engine, model_dir, adapters, cache_dir, monkeypatch):
    monkeypatch.setattr(onnx_export, "export_unet", lambda *a, **k: pytest.fail("exported again"))
    other = banked_engine(model_dir, adapters)
    runtime = OnnxUNet.for_engine(other, cache_dir, max_rows=8)
    assert runtime.graph_path == onnx_engine.unet_runtime.graph_path
    assert sorted(p.name for p in runtime.graph_path.parent.iterdir()) == sorted([GRAPH_FILE, GRAPH_FILE + ".data",
                                                                                  LAYERS_FILE])
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".export-")]  # no half-written exports
    # Other weights are another graph.
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    assert onnx_export.graph_key(other.unet, other.adapters.bank, runtime.shape) != \
        onnx_export.graph_key(onnx_engine.unet, onnx_engine.adapters.bank, runtime.shape)


def test_onnx_generation_equals_eager_and_other_sizes_fall_back(onnx_engine, eager):
    runtime = onnx_engine.unet_runtime
    spec = GenerationSpec(prompt="a red circle on a blue background", steps=4, num_images=2, seed=3,
                          adapters=(AdapterUse("c", 0.8),))
    for engine_spec in (spec, GenerationSpec(**{**spec.__dict__, "width": 96})):
        fallbacks = runtime.stats.fallback_calls
        got = onnx_engine.generate(engine_spec).images
        want = eager.generate(engine_spec).images
        for a, b in zip(got, want):
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
        # The default size runs in the graph; 96 px wide is not what it was exported for: eager.
        assert (runtime.stats.fallback_calls > fallbacks) == (engine_spec.width == 96)


# -- torch.compile -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_unet_swaps_adapters_without_recompiling(model_dir, adapters, eager):
    import torch._dynamo

    torch._dynamo.reset()
    engine = banked_engine(model_dir, adapters)
    # One bucket of 4 rows: a 2-image CFG request is 4 rows, a 1-image one is padded to 4.
    runtime = CompiledUNet(engine.unet, buckets=(4,))
    engine.unet_runtime = runtime
    size = engine.limits.default_size // engine.vae_scale_factor
    runtime.warmup([(4, size, size)])
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        latents, timesteps, embeds = step_inputs(eager, 4, seed=2)
        for rows in (MIXED_ROWS, [[AdapterUse("c")], [AdapterUse("b", 0.4)], [AdapterUse("c")], []],
                     [[AdapterUse("a")], [AdapterUse("c")], [], [AdapterUse("c", 2.0)]]):
            got = engine.predict_noise(latents, timesteps, embeds, rows)
            torch.testing.assert_close(got, eager.predict_noise(latents, timesteps, embeds, rows), rtol=0, atol=ATOL)
        # Fewer rows pad into the bucket (padding rows are slot 0 and dropped).
        got = engine.predict_noise(latents[:1], timesteps[:1], embeds[:1], [[AdapterUse("a")]])
        torch.testing.assert_close(got, eager.predict_noise(latents[:1], timesteps[:1], embeds[:1],
                                                            [[AdapterUse("a")]]), rtol=0, atol=ATOL)
    finally:
        torch._dynamo.config.error_on_recompile = old
        torch._dynamo.reset()
    assert engine.adapters.manager.metrics.evictions._value.get() >= 1  # swaps happened into graph-held slots
    assert runtime.stats.shapes == {(4, size, size)} and runtime.stats.fallback_calls == 0


# -- pieces --------------------------------------------------------------------------------------------


def test_batch_buckets_and_padding():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(16, (4, 8, 100)) == (4, 8, 16)
    assert bucket_for(5, (4, 8)) == 8 and bucket_for(9, (4, 8)) is None
    latents, t, embeds = pad_rows(torch.ones(3, 4, 2, 2), torch.tensor([5, 6, 7]), torch.ones(3, 7, 8), 8)
    assert latents.shape[0] == t.shape[0] == embeds.shape[0] == 8
    assert latents[3:].abs().sum() == 0 and t.tolist() == [5, 6, 7, 5, 5, 5, 5, 5]


def test_runtime_settings(monkeypatch):
    monkeypatch.setenv("STEERSERVE_UNET_RUNTIME", "onnx")
    monkeypatch.setenv("STEERSERVE_UNET_BATCH_BUCKETS", "2, 4,8")
    settings = Settings()
    options = settings.unet_runtime_options()
    assert options.kind == "onnx" and options.buckets == (2, 4, 8)
    assert options.cache_dir == settings.data_dir / "compiled"
    monkeypatch.setenv("STEERSERVE_UNET_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="unet_runtime 'tensorrt' is not one of eager, compile, onnx"):
        Settings()
    monkeypatch.setenv("STEERSERVE_UNET_RUNTIME", "eager")
    monkeypatch.setenv("STEERSERVE_UNET_BATCH_BUCKETS", "two")
    with pytest.raises(ValueError, match="not a comma-separated list"):
        Settings()
