"""The compiled UNet runtimes (service/compiled) on the embedded model, against the eager banked UNet.

- onnx: one exported graph with the bank as inputs serves rows with different adapters in one call
  (within 1e-4 of PyTorch), sees hot swaps without re-export, is cached, falls back to eager for
  shapes it was not exported for;
- compile: torch.compile'd UNet, adapter swaps with error_on_recompile=True;
- the Triton `unet` model runs the onnx runtime when configured.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from service.adapters import BankedAdapters, parse_adapter
from bench.reference_adapters import write_reference_lora
from service.compiled import RuntimeOptions, batch_buckets, configure_unet_runtime
from service.compiled import onnx_export
from service.compiled.onnx_export import GRAPH_FILE, META_FILE
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
    """slots=3: two adapters resident at once, so a third forces a swap into a bound slot. 64 rows:
    the Triton `unet` model's max_batch_size, so the Triton test finds this bank's graph cached."""
    engine = Engine.from_pretrained(model_dir)
    BankedAdapters.attach(engine, lambda key: adapters[key], num_slots=slots, max_rank=8, max_rows=64,
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


@pytest.mark.slow
def test_onnx_graph_has_the_bank_as_inputs(onnx_engine):
    runtime = onnx_engine.unet_runtime.current  # what serves (a forced runtime: from the start)
    assert isinstance(runtime, OnnxUNet) and onnx_engine.unet_runtime.ready.is_set()
    inputs = {i.name: i for i in runtime.session.get_inputs()}
    bank = onnx_engine.adapters.bank
    unet_layers = [n for n in bank.layers if n.startswith("unet.")]
    assert len(inputs) == 5 + 2 * len(unet_layers)
    for name in ("sample", "timestep", "encoder_hidden_states", "slot_ids", "coef"):
        assert inputs[name].shape[0] == "batch"
    assert inputs["bank.0.A"].shape == [bank.num_slots, bank.max_rank, bank.layers[unet_layers[0]].in_features]
    layers = json.loads((runtime.graph_path.parent / META_FILE).read_text())["layers"]
    assert layers == [n.removeprefix("unet.") for n in unet_layers]
    assert runtime.stats.fallback_calls == 0


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_onnx_graph_is_cached_per_model_and_bank_layout(onnx_engine, model_dir, adapters, cache_dir, monkeypatch):
    monkeypatch.setattr(onnx_export, "export_unet", lambda *a, **k: pytest.fail("exported again"))
    other = banked_engine(model_dir, adapters)
    runtime = OnnxUNet.for_engine(other, cache_dir, max_rows=64)
    assert runtime.graph_path == onnx_engine.unet_runtime.graph_path
    assert sorted(p.name for p in runtime.graph_path.parent.iterdir()) == sorted([GRAPH_FILE, GRAPH_FILE + ".data",
                                                                                  META_FILE])
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".export-")]  # no half-written exports
    # Other weights are another graph.
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    assert onnx_export.graph_key(other.unet, other.adapters.bank, runtime.shape) != \
        onnx_export.graph_key(onnx_engine.unet, onnx_engine.adapters.bank, runtime.shape)


@pytest.mark.slow
def test_graph_key_is_the_weights_not_their_path(onnx_engine, model_dir, tmp_path):
    """The deploy's build step and the serving model may mount the same weights at other paths."""
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(model_dir, moved)
    engine = Engine.from_pretrained(moved)
    BankedAdapters.attach(engine, lambda key: None, num_slots=3, max_rank=8, max_rows=64,
                          registry=CollectorRegistry())
    shape = onnx_engine.unet_runtime.shape
    assert engine.unet.config._name_or_path != onnx_engine.unet.config._name_or_path
    assert onnx_export.graph_key(engine.unet, engine.adapters.bank, shape) == \
        onnx_export.graph_key(onnx_engine.unet, onnx_engine.adapters.bank, shape)


@pytest.mark.slow
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


@pytest.mark.slow
def test_triton_unet_model_runs_the_onnx_graph(onnx_engine, eager, adapters, model_dir, cache_dir, tmp_path):
    """The `unet` model configured with STEERSERVE_UNET_RUNTIME=onnx: rows of different adapters
    in one Triton call match the eager engine (the graph comes from the shared cache)."""
    from service.adapters import serialize_adapter
    from service.gateway.server import MODEL_REPOSITORY
    from service.triton.launcher import TritonServer

    for key, adapter in adapters.items():
        (tmp_path / "adapters" / "tenant").mkdir(parents=True, exist_ok=True)
        (tmp_path / "adapters" / "tenant" / f"{key}.safetensors").write_bytes(serialize_adapter(adapter))
    env = {
        "STEERSERVE_MODEL_DIR": str(model_dir), "STEERSERVE_ADAPTER_DIR": str(tmp_path / "adapters"),
        "STEERSERVE_ADAPTER_SLOTS": "3", "STEERSERVE_ADAPTER_MAX_RANK": "8",
        "STEERSERVE_UNET_RUNTIME": "onnx", "STEERSERVE_COMPILED_DIR": str(cache_dir), "STEERSERVE_UNET_BATCH_BUCKETS": "4",
    }
    exports_before = sorted(p.name for p in cache_dir.iterdir())
    latents, timesteps, embeds = step_inputs(eager, len(MIXED_ROWS), seed=4)
    with TritonServer(MODEL_REPOSITORY, models=("unet",), env=env, start_timeout_s=400) as server:
        # Written once every model loaded: what `auto`'s background measurement waits for.
        assert server.ready_file.exists() and server.extra_env["STEERSERVE_UNET_RUNTIME_READY_FILE"] == str(
            server.ready_file.resolve())
        noise = infer_unet(server, latents, timesteps, embeds, MIXED_ROWS)
        log = server.log_path.read_text()
    torch.testing.assert_close(torch.from_numpy(noise), eager.predict_noise(latents, timesteps, embeds, MIXED_ROWS),
                               rtol=0, atol=ATOL)
    assert "UNet runtime onnx ready in" in log and "set by STEERSERVE_UNET_RUNTIME" in log, log
    assert sorted(p.name for p in cache_dir.iterdir()) == exports_before  # the same graph, not a new export


@pytest.mark.slow
def test_gateway_serves_generate_through_the_configured_runtime(onnx_engine, model_dir, tmp_path):
    """STEERSERVE_UNET_RUNTIME=onnx on the in-process backend: Generate answers with the same image as
    the eager engine, through the graph (its runtime's calls in /metrics), with no export at start:
    the graph for this bank layout is already in the data folder's cache."""
    import io
    import shutil
    import urllib.request

    from PIL import Image

    from service._generated.steerserve.v1 import steerserve_pb2 as pb
    from tests.conftest import TOKENS, auth, free_port, start_gateway_in_thread, stop_gateway

    graph_dir = onnx_engine.unet_runtime.graph_path.parent
    shutil.copytree(graph_dir, tmp_path / "data" / "compiled" / graph_dir.name)
    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=free_port(), api_keys=dict(TOKENS),
                        data_dir=tmp_path / "data", model_dir=model_dir, unet_runtime="onnx", adapter_slots=3,
                        adapter_max_rank=8, max_num_images=16,  # the bank's 64 rows: 4 per image
                        image_prompts=False)  # the fixture's graph has no IP-Adapter
    exports = onnx_export.exports_done
    running = start_gateway_in_thread(settings)
    try:
        reply = running.stub().Generate(pb.GenerateRequest(prompt="a red circle", steps=3, seed=5), metadata=auth())
        info = running.stub().GetServerInfo(pb.GetServerInfoRequest(), metadata=auth())
        metrics = urllib.request.urlopen(running.metrics_url, timeout=10).read().decode()
    finally:
        stop_gateway(running)
    assert onnx_export.exports_done == exports
    image = np.asarray(Image.open(io.BytesIO(reply.images[0].data)).convert("RGB"), np.int16)
    want = Engine.from_pretrained(model_dir).generate(GenerationSpec(prompt="a red circle", steps=3, seed=5)).images[0]
    assert np.abs(image - np.asarray(want, np.int16)).max() <= 1
    assert 'steerserve_unet_runtime_info{chosen_by="setting",runtime="onnx"} 1.0' in metrics
    assert info.unet_runtime == "onnx" and info.unet_runtime_choice == "onnx (set by STEERSERVE_UNET_RUNTIME)"
    calls = float(re.search(r"^steerserve_unet_runtime_calls_total (\S+)$", metrics, re.M).group(1))
    fallbacks = float(re.search(r"^steerserve_unet_runtime_fallback_calls_total (\S+)$", metrics, re.M).group(1))
    assert calls >= 3 and fallbacks == 0  # warm-up + 3 steps, all in the graph


@pytest.mark.slow
def test_tensorrt_config_and_profile_match_the_graph(onnx_engine, tmp_path):
    """deploy/tensorrt's pieces, checked without TensorRT: the unet_engine config parses as Triton's
    ModelConfig with exactly the graph's inputs, and trtexec's profile spans 1..max rows."""
    from google.protobuf import text_format

    from service.compiled import tensorrt
    from service.triton.client import grpcclient

    graph = onnx_engine.unet_runtime.graph_path
    session_inputs = {i.name: i for i in onnx_engine.unet_runtime.session.get_inputs()}
    tensorrt.main(["--onnx", str(graph), "--repo", str(tmp_path)])
    config = text_format.Parse((tmp_path / "unet_engine" / "config.pbtxt").read_text(),
                               grpcclient.model_config_pb2.ModelConfig())
    assert config.name == "unet_engine" and config.platform == "tensorrt_plan" and config.max_batch_size == 0
    assert [i.name for i in config.input] == list(session_inputs)
    for i in config.input:
        want = [-1 if isinstance(d, str) else d for d in session_inputs[i.name].shape]
        assert list(i.dims) == want, i.name
    assert [(o.name, list(o.dims)) for o in config.output] == [("noise", [-1, 8, 16, 16])]
    cmd = tensorrt.trtexec_command(graph, tmp_path / "model.plan", opt_rows=8)
    assert "--minShapes=sample:1x8x16x16,timestep:1,encoder_hidden_states:1x77x48,slot_ids:1x4,coef:1x1x32" in cmd
    assert "--maxShapes=sample:64x8x16x16,timestep:64,encoder_hidden_states:64x77x48,slot_ids:64x4,coef:64x1x32" in cmd
    assert "--fp16" in cmd and not any("bank." in part for part in cmd)  # the bank's shapes are static


@pytest.mark.slow
def test_ahead_of_time_export_lands_where_the_unet_model_looks(onnx_engine, model_dir, cache_dir, monkeypatch,
                                                               capsys):
    """deploy's build step (python -m service.compiled.export) builds the bank as the Triton unet model
    does, so its graph key is the one that model computes: here the cached graph, not a new export."""
    from service.compiled import export

    monkeypatch.setattr(onnx_export, "export_unet", lambda *a, **k: pytest.fail("exported again"))
    for name, value in {"STEERSERVE_MODEL_DIR": str(model_dir), "STEERSERVE_COMPILED_DIR": str(cache_dir),
                        "STEERSERVE_ADAPTER_SLOTS": "3", "STEERSERVE_ADAPTER_MAX_RANK": "8",
                        "STEERSERVE_TORCH_THREADS": "1", "STEERSERVE_ADAPTER_DIR": str(cache_dir)}.items():
        monkeypatch.setenv(name, value)
    export.main(["--max-rows", "64"])
    assert capsys.readouterr().out.strip() == str(onnx_engine.unet_runtime.graph_path)


@pytest.mark.slow
def test_triton_unet_model_sends_steps_to_the_engine_model(onnx_engine, eager, adapters, model_dir, cache_dir,
                                                            tmp_path):
    """STEERSERVE_UNET_RUNTIME=triton_engine: the python `unet` model keeps residency and routing and
    sends each step, bank included, to `unet_engine` over BLS. Here `unet_engine` is the generated
    config with a python stand-in running the same graph (tests/triton_standin); at deploy it is the
    TensorRT plan."""
    import shutil

    from service.adapters import serialize_adapter
    from service.compiled import tensorrt
    from service.gateway.server import MODEL_REPOSITORY
    from service.triton.launcher import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY / "unet", repo / "unet")
    graph = onnx_engine.unet_runtime.graph_path
    (repo / "unet_engine" / "1").mkdir(parents=True)
    (repo / "unet_engine" / "config.pbtxt").write_text(tensorrt.engine_config(graph, "python", "KIND_CPU"))
    shutil.copy(Path(__file__).parent / "triton_standin" / "unet_engine_model.py", repo / "unet_engine" / "1" / "model.py")
    adapter_dir = tmp_path / "adapters" / "tenant"
    adapter_dir.mkdir(parents=True)
    for key, adapter in adapters.items():
        (adapter_dir / f"{key}.safetensors").write_bytes(serialize_adapter(adapter))
    env = {
        "STEERSERVE_MODEL_DIR": str(model_dir), "STEERSERVE_ADAPTER_DIR": str(tmp_path / "adapters"),
        "STEERSERVE_ADAPTER_SLOTS": "3", "STEERSERVE_ADAPTER_MAX_RANK": "8",
        "STEERSERVE_UNET_RUNTIME": "triton_engine", "STEERSERVE_COMPILED_DIR": str(cache_dir),
        "STEERSERVE_UNET_ENGINE_ONNX": str(graph),
    }
    latents, timesteps, embeds = step_inputs(eager, len(MIXED_ROWS), seed=5)
    with TritonServer(repo, models=("unet_engine", "unet"), env=env, start_timeout_s=400) as server:
        noise = infer_unet(server, latents, timesteps, embeds, MIXED_ROWS)
        swapped = [[AdapterUse("c")], [AdapterUse("b")], [], [AdapterUse("c", 0.5)]]  # evicts "a"
        noise_swapped = infer_unet(server, latents, timesteps, embeds, swapped)
        engine_calls = server.metric("nv_inference_count", "unet_engine")
    torch.testing.assert_close(torch.from_numpy(noise), eager.predict_noise(latents, timesteps, embeds, MIXED_ROWS),
                               rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.from_numpy(noise_swapped), eager.predict_noise(latents, timesteps, embeds, swapped),
                               rtol=0, atol=ATOL)
    assert engine_calls == 2  # one engine call per batched step


def infer_unet(server, latents, timesteps, embeds, rows) -> np.ndarray:
    """One call of the Triton `unet` model (its wire format: service/triton/wire.py)."""
    from service.triton.client import grpcclient
    from service.triton.wire import encode_adapters

    values = {
        "LATENTS": latents.numpy(), "TIMESTEP": timesteps.numpy().reshape(-1, 1).astype(np.float32),
        "EMBEDS": embeds.numpy(), "ADAPTERS": np.array([[encode_adapters(tuple(row))] for row in rows], dtype=object),
    }
    inputs = []
    for name, value in values.items():
        kind = "BYTES" if value.dtype == object else {np.float32: "FP32", np.int64: "INT64"}[value.dtype.type]
        inputs.append(grpcclient.InferInput(name, list(value.shape), kind))
        inputs[-1].set_data_from_numpy(value)
    return grpcclient.InferenceServerClient(server.grpc_url).infer("unet", inputs).as_numpy("NOISE")


# -- torch.compile -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_unet_swaps_adapters_without_recompiling(model_dir, adapters, eager):
    import torch._dynamo

    torch._dynamo.reset()
    engine = banked_engine(model_dir, adapters)
    # One bucket of 4 rows: a 2-image CFG request is 4 rows, a 1-image one is padded to 4.
    # Recompiles are Dynamo's (its guards on the graph-held slots), whatever generates the code:
    # aot_eager checks them here in seconds; inductor's code for the bank's routed layers is
    # checked, swap included, by test_adapter_bank.py::test_compiled_unet_does_not_recompile_on_swap.
    runtime = CompiledUNet(engine.unet, buckets=(4,), backend="aot_eager")
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
    with pytest.raises(ValueError, match="unet_runtime 'tensorrt' is not one of auto, eager, compile, onnx"):
        Settings()
    monkeypatch.setenv("STEERSERVE_UNET_RUNTIME", "eager")
    monkeypatch.setenv("STEERSERVE_UNET_BATCH_BUCKETS", "two")
    with pytest.raises(ValueError, match="not a comma-separated list"):
        Settings()


# -- auto: the fastest runtime by measurement ----------------------------------------------------------


class FakeRuntime:
    """A runtime whose call takes `ms` milliseconds (or raises): for the choice logic alone. Its
    sleep is the work being timed, not a synchronisation."""

    def __init__(self, name: str, ms: float, fail: bool = False):
        self.name, self.ms, self.fail = name, ms, fail
        self.calls = 0

    def __call__(self, latents, timesteps, embeds):
        if self.fail:
            raise RuntimeError("no onnxruntime-gpu here")
        self.calls += 1
        time.sleep(self.ms / 1000)
        return latents

    def warmup(self, shapes) -> None:
        self(torch.zeros(1), None, None)


def test_auto_picks_the_fastest_that_runs_and_caches_the_measurement(eager, tmp_path):
    from service.compiled import selection

    speeds = {"eager": 6.0, "onnx": 2.0, "compile": 4.0}
    built = []

    def build(kind, fail=()):
        built.append(kind)
        return FakeRuntime(kind, speeds[kind], fail=kind in fail)

    options = RuntimeOptions(kind="auto", cache_dir=tmp_path)
    buckets = batch_buckets(64)
    runtime, choice = selection.choose_runtime(eager, options, buckets, build)
    assert runtime.name == "onnx" and choice.kind == "onnx" and choice.chosen_by == "measured"
    assert set(choice.step_ms) == {"eager", "onnx", "compile"}
    assert choice.step_ms["onnx"]["2"] < choice.step_ms["compile"]["2"] < choice.step_ms["eager"]["2"]
    assert set(choice.step_ms["eager"]) == {"2", "16"}  # one image under CFG, and a full batch
    assert 2.0 < choice.speedup("onnx") < 4.0 and "measured" in choice.describe()
    assert choice.ranking() == ["onnx", "compile", "eager"]
    # A restart (same model, bank, device, versions) reads the measurement and builds only the winner.
    built.clear()
    runtime, again = selection.choose_runtime(eager, options, buckets, build)
    assert built == ["onnx"] and again.chosen_by == "cached measurement" and again.step_ms == choice.step_ms
    # Another layout (buckets) is another key: measured again. A candidate that fails is skipped.
    built.clear()
    runtime, other = selection.choose_runtime(eager, options, (1, 2, 4), lambda k: build(k, fail=("onnx",)))
    assert other.kind == "compile" and "onnx" in other.failed and "no onnxruntime-gpu" in other.failed["onnx"]
    assert other.key != choice.key and sorted(built) == ["compile", "eager", "onnx"]
    # A damaged cache file is measured over, not trusted.
    for path in tmp_path.glob("runtime-choice-*.json"):
        path.write_text("{not json")
    runtime, fresh = selection.choose_runtime(eager, options, buckets, build)
    assert fresh.chosen_by == "measured" and fresh.kind == "onnx"


def test_auto_measures_the_real_runtimes_on_the_engine(model_dir, adapters, cache_dir, eager, tmp_path):
    """eager against onnx on the banked engine (torch.compile's cold compile is left to the bench):
    eager serves at once while the choice is measured in the background; then the faster serves,
    both timed, and generation through it equals eager's."""
    engine = banked_engine(model_dir, adapters)
    go = tmp_path / "models-ready"  # holds the background measurement until the test says go
    runtime = configure_unet_runtime(engine, RuntimeOptions(kind="auto", candidates=("eager", "onnx"),
                                                            cache_dir=cache_dir, ready_file=go))
    spec = GenerationSpec(prompt="a red circle", steps=2, seed=3, adapters=(AdapterUse("a"),))
    want = np.asarray(eager.generate(spec).images[0], dtype=np.int16)
    assert runtime.name == "eager" and engine.unet_runtime_choice.chosen_by == "measuring" and not runtime.ready.is_set()
    assert np.abs(np.asarray(engine.generate(spec).images[0], dtype=np.int16) - want).max() <= 1  # served meanwhile
    go.write_text("")
    assert runtime.ready.wait(300)
    choice = engine.unet_runtime_choice
    assert set(choice.step_ms) == {"eager", "onnx"} and not choice.failed
    # The code's own rule (geometric mean of ratios to eager over the probe shapes) decides.
    fastest = min(choice.step_ms, key=choice.score)
    assert runtime.name == choice.kind == fastest and runtime.stats.warmup_seconds > 0
    assert choice.score(choice.kind) == min(choice.score(k) for k in choice.step_ms)
    assert list(cache_dir.glob("runtime-choice-*.json"))
    assert np.abs(np.asarray(engine.generate(spec).images[0], dtype=np.int16) - want).max() <= 1


def test_triton_runtime_info_metric_round_trips():
    """The unet instance's info series (fake pb_utils) and the gateway's parse of Triton's /metrics."""
    from types import SimpleNamespace

    from service.compiled.selection import RuntimeChoice
    from service.triton.runtime_metrics import RuntimeInfoMetric, parse_runtime_info

    seen = {}

    class Family:
        GAUGE = "gauge"

        def __init__(self, name, description, kind):
            seen["name"] = name

        def Metric(self, labels):  # noqa: N802 - Triton's API
            seen["labels"] = labels
            return SimpleNamespace(set=lambda v: seen.__setitem__("value", v))

    choice = RuntimeChoice("onnx", "measured at start", step_ms={"eager": {"2": 5.0}, "onnx": {"2": 2.5}})
    engine = SimpleNamespace(unet_runtime=SimpleNamespace(name="onnx"), unet_runtime_choice=choice)
    RuntimeInfoMetric(SimpleNamespace(MetricFamily=Family), engine, {"model_name": "unet", "model_instance_name": "unet_0"})
    labels = seen["labels"]
    assert seen["value"] == 1 and labels["runtime"] == "onnx" and "eager 5.0 ms x2" in labels["choice"]
    page = ("# HELP x\nnv_inference_count{model=\"unet\"} 3\n" + 'steerserve_triton_unet_runtime_info{' +
            ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} 1\n")
    assert parse_runtime_info(page) == ("onnx", choice.describe())
    assert parse_runtime_info("nv_inference_count 1\n") == ("", "")


def test_triton_instances_read_files_as_utf8_like_a_normal_python_start():
    """The stub's embedded interpreter starts with the C locale (ASCII); instance_settings sets
    LC_CTYPE as CPython's own start would, so torch.compile's inductor can read its templates."""
    import locale

    from service.triton.parts import _interpreter_locale

    before = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        assert locale.getpreferredencoding(False).upper().replace("-", "") != "UTF8"
        _interpreter_locale()
        assert locale.getpreferredencoding(False).upper().replace("-", "") == "UTF8"
    finally:
        locale.setlocale(locale.LC_CTYPE, before)


# -- the chooser never fails what eager would serve; start-up never waits on it ----------------------


class FlakyRuntime:
    """A compiled stand-in that returns eager's answer, fails the shapes in `bad` (call or warm-up),
    and records the torch threads of the thread that calls it."""

    def __init__(self, name, unet, bad_calls=(), bad_warmup=(), gate: threading.Event | None = None):
        from service.engine.unet import RuntimeStats

        self.name, self.unet, self.bad_calls, self.bad_warmup, self.gate = name, unet, set(bad_calls), set(bad_warmup), gate
        self.stats = RuntimeStats()
        self.calls = 0
        self.threads_seen: set[int] = set()

    def __call__(self, latents, timesteps, embeds):
        self.calls += 1
        self.threads_seen.add(torch.get_num_threads())
        if (latents.shape[0], *latents.shape[2:]) in self.bad_calls:
            raise RuntimeError("kernel failed for this shape")
        self.stats.count()
        return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample

    def warmup(self, shapes) -> None:
        self.threads_seen.add(torch.get_num_threads())
        if self.gate is not None:
            assert self.gate.wait(120)
        for shape in shapes:
            if tuple(shape) in self.bad_warmup:
                raise RuntimeError(f"compile failed for {shape}")


def test_a_runtime_failing_at_serving_time_falls_back_to_eager_for_that_shape(eager):
    from service.compiled import ServingRuntime
    from service.compiled.runtime import EagerUNet

    latents, timesteps, embeds = step_inputs(eager, 2, seed=1)
    want = eager.predict_noise(latents, timesteps, embeds, [(), ()])
    flaky = FlakyRuntime("onnx", eager.unet, bad_calls={(2, *latents.shape[2:])})
    serving = ServingRuntime(EagerUNet(eager.unet), flaky)
    with torch.no_grad():
        torch.testing.assert_close(serving(latents, timesteps, embeds), want)  # answered, not failed
        assert serving.failures == 1 and list(serving.failed_shapes) == [(2, *latents.shape[2:])]
        torch.testing.assert_close(serving(latents, timesteps, embeds), want)
        assert flaky.calls == 1 and serving.failures == 1  # that shape stays eager: not tried again
        one = step_inputs(eager, 1, seed=2)
        serving(*one)
        assert flaky.calls == 2  # other shapes still run in the compiled form
        # A call eager cannot run either is the input's fault: it raises and marks nothing.
        three = step_inputs(eager, 3, seed=3)
        with pytest.raises(Exception):
            serving(three[0], three[1], embeds)  # 3 rows of latents, 2 of embeddings
    assert serving.failures == 1 and len(serving.failed_shapes) == 1
    assert flaky.stats.fallback_calls == 2


def test_auto_serves_eager_at_once_and_drops_a_candidate_whose_warm_up_fails(model_dir, adapters, tmp_path, monkeypatch):
    """The background choice: eager answers while candidates build (start-up never waits); the
    winner's full warm-up fails, so it is dropped (and cached as failed) and the next one serves,
    warmed up by the measuring thread with the serving thread's torch threads."""
    from service.compiled import configure, selection

    engine = banked_engine(model_dir, adapters)
    gate = threading.Event()
    size = engine.limits.default_size // engine.vae_scale_factor
    built = {}

    def build(engine_, kind, options, buckets):
        if kind == "eager":
            built[kind] = FlakyRuntime(kind, engine.unet)
        else:  # onnx "fastest" but its 64-row bucket fails to warm up; compile second
            built[kind] = FlakyRuntime(kind, engine.unet, gate=gate,
                                       bad_warmup={(64, size, size)} if kind == "onnx" else ())
        return built[kind]

    speeds = {"eager": 3.0, "onnx": 1.0, "compile": 2.0}
    monkeypatch.setattr(configure, "build_runtime", build)
    monkeypatch.setattr(selection, "time_calls", lambda runtime, engine, rows, quiet=None: speeds[runtime.name] * rows)
    options = RuntimeOptions(kind="auto", cache_dir=tmp_path, threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller runs 2; the serving thread (options.threads) 1
    try:
        runtime = configure_unet_runtime(engine, options)
        assert runtime.name == "eager" and not runtime.ready.is_set()  # returned while candidates build
        latents, timesteps, embeds = step_inputs(engine, 2, seed=1)
        with torch.no_grad():
            runtime(latents, timesteps, embeds)  # serves meanwhile
        gate.set()
        assert runtime.ready.wait(60)
    finally:
        torch.set_num_threads(before)
    choice = engine.unet_runtime_choice
    assert runtime.name == choice.kind == "compile" and choice.chosen_by == "measured"
    assert choice.failed["onnx"].startswith("warm-up: RuntimeError: compile failed")
    assert built["compile"].threads_seen == built["onnx"].threads_seen == {1}  # the serving thread's, not 2
    cached = json.loads(next(tmp_path.glob("runtime-choice-*.json")).read_text())
    assert cached["kind"] == "compile" and "onnx" in cached["failed"]
    assert time.time() - cached["measured_at"] < 300  # the failure's age counts from when it was seen


def test_cached_failures_expire_and_the_key_follows_code_and_environment(eager, tmp_path, monkeypatch):
    from service.compiled import selection

    options = RuntimeOptions(kind="auto", cache_dir=tmp_path, failure_ttl_s=3600)
    buckets = batch_buckets(64)
    key = selection.choice_key(eager, options, buckets)
    fresh = selection.RuntimeChoice("onnx", "measured", step_ms={"eager": {"2": 2.0}, "onnx": {"2": 1.0}},
                                    failed={"compile": "UnicodeDecodeError: 'ascii' codec"}, key=key,
                                    measured_at=time.time())
    selection.save_choice(options, fresh)
    assert selection.cached_choice(options, key).kind == "onnx"
    selection.save_choice(options, dataclasses.replace(fresh, measured_at=time.time() - 7200))
    assert selection.cached_choice(options, key) is None  # a failure an hour past its TTL: measure again
    # Another text encoding or compiler, or another version of this package's code: another key.
    monkeypatch.setattr(selection.locale, "getpreferredencoding", lambda do_setlocale=True: "ANSI_X3.4-1968")
    assert selection.choice_key(eager, options, buckets) != key
    monkeypatch.undo()
    monkeypatch.setenv("CC", "clang")
    assert selection.choice_key(eager, options, buckets) != key
    monkeypatch.undo()
    monkeypatch.setattr(selection, "_code_version", lambda: "patched")
    assert selection.choice_key(eager, options, buckets) != key


def test_a_measurement_beside_serving_times_only_quiet_calls(eager):
    """time_calls with a Quiet: a timed call that a serving call overlapped is timed again."""
    from service.compiled import selection

    class Busy:
        def __init__(self):
            self.started, self.overlaps = 0, 3

        def wait_idle(self):
            return self.started

        def calls_started(self):
            if self.overlaps:  # a serving call started during this timed call
                self.overlaps -= 1
                self.started += 1
            return self.started

    runtime = FakeRuntime("eager", 1.0)
    selection.time_calls(runtime, eager, 2, budget_s=0, max_reps=3, quiet=Busy())
    assert runtime.calls == 5 + 3  # 2 warm + at least 5 timed, and the 3 overlapped ones again

    class Flood(Busy):  # every timed call overlapped: the measurement still ends
        def calls_started(self):
            self.started += 1
            return self.started

    runtime = FakeRuntime("eager", 0.1)
    selection.time_calls(runtime, eager, 2, budget_s=0, max_reps=3, quiet=Flood())
    assert runtime.calls == 5 * (selection.MAX_OVERLAPS + 1)


def test_a_switch_tells_its_listeners_once(eager):
    from service.compiled import ServingRuntime
    from service.compiled.runtime import EagerUNet

    serving = ServingRuntime(EagerUNet(eager.unet))
    heard = []
    serving.on_promote.append(lambda: heard.append(serving.name))
    serving.promote(serving.eager)  # no switch
    serving.promote(FakeRuntime("onnx", 0.1))
    assert heard == ["onnx"]


def test_an_export_never_waits_for_serving(model_dir, adapters, tmp_path):
    """`auto` exports in the background while eager serves: the export traces a copy that shares
    the weights, so a routed call holding the bank (serving) does not hold the export up, and the
    bank it serves from is left as it was."""
    engine = banked_engine(model_dir, adapters)
    bank = engine.adapters.bank
    before = [t.data_ptr() for layer in bank.layers.values() for t in (layer.lora_A, layer.lora_Bt)]
    done = threading.Event()
    with bank.activate([()]):  # a serving call in flight, holding the bank's lock throughout
        worker = threading.Thread(target=lambda: (onnx_export.exported_unet(
            engine.unet, bank, onnx_export.graph_shape(engine, 4), tmp_path), done.set()))
        worker.start()
        assert done.wait(120)  # finished while the lock was held
    worker.join()
    assert [t.data_ptr() for layer in bank.layers.values() for t in (layer.lora_A, layer.lora_Bt)] == before
    assert all(isinstance(layer.lora_A, torch.Tensor) for layer in bank.layers.values())
    assert (tmp_path / next(p.name for p in tmp_path.iterdir() if p.is_dir()) / META_FILE).is_file()


def test_auto_leaves_out_an_export_that_would_not_fit_in_memory(eager, tmp_path, monkeypatch):
    """An SD-size ONNX export takes about 5x the UNet's weights beside the served model: where the
    machine has less free, `onnx` (and `compile`) are left out with the reason instead of risking
    the server."""
    from service.compiled import selection

    weights = sum(p.numel() * p.element_size() for p in eager.unet.parameters())
    built = []

    def build(kind):
        built.append(kind)
        return FakeRuntime(kind, {"eager": 2.0, "onnx": 1.0, "compile": 1.5}[kind])

    monkeypatch.setattr(selection, "_available_memory", lambda: int(2 * weights))
    runtime, choice = selection.choose_runtime(eager, RuntimeOptions(kind="auto", cache_dir=tmp_path),
                                               batch_buckets(64), build)
    assert built == ["eager"] and choice.kind == "eager"
    assert choice.failed["onnx"].startswith("not enough memory to build it") and "compile" in choice.failed
    monkeypatch.setattr(selection, "_available_memory", lambda: int(6 * weights))
    assert selection.memory_shortfall("onnx", eager) is None and selection.memory_shortfall("compile", eager) is None
    assert selection.memory_shortfall("eager", eager) is None


def test_prepare_runtime_measures_ahead_and_a_server_start_reads_it(model_dir, tmp_path, monkeypatch, capsys):
    """`steerserve prepare-runtime` (image build, a Job, a shared volume) measures before serving
    (measure="blocking"); a server starting on the same compiled folder serves eager at once and
    switches to that choice without measuring again."""
    from service.cli import main
    from service.config import Settings
    from service.serving import build_engine

    monkeypatch.setenv("STEERSERVE_UNET_RUNTIME_CANDIDATES", "eager,onnx")
    args = ["prepare-runtime", "--data-dir", str(tmp_path), "--model-dir", str(model_dir), "--rows", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # The embedded model's IP-Adapter is served with it: the UNet with it (in-process, Triton's
    # generate) and without it (Triton's unet) are measured apart.
    for image_prompts, label in ((False, "4 rows"), (True, r"4 rows \(image prompts\)")):
        chosen = re.search(rf"^{label}: (eager|onnx) \(measured: eager .* ms x2.*; onnx .* ms x2", printed, re.M)
        assert chosen, printed
        settings = Settings(data_dir=tmp_path, model_dir=model_dir, unet_runtime="auto")
        engine = build_engine(settings, 4, registry=CollectorRegistry(), image_prompts=image_prompts)
        assert engine.unet_runtime.ready.wait(120)
        assert engine.unet_runtime_choice.chosen_by == "cached measurement"
        assert engine.unet_runtime.name == chosen.group(1)
