"""What the Triton models in model_repo/ compute, as plain library code (no pb_utils, no gRPC).

Each `model_repo/<name>/1/model.py` only converts Triton tensors to and from numpy and calls into here,
so tests and the benchmark exercise the same code without a server.

- `TextEncode`, `UNetStep`, `VaeDecode`: the engine's parts, one call each.
- `UNetStep` is the step-level batching point: one call runs ONE denoising step for any number of
  samples from different requests, each with its own latents, timestep, prompt embeddings and
  adapters (rows of the adapter bank), in a single UNet forward.
- the `generate` model runs the one sampling loop (service.engine.sampling.generation) with
  `run_async`, each model call a BLS call to the parts above, so it keeps many requests in flight
  on one event loop.

Models are configured from the environment (see docs/triton.md): STEERSERVE_MODEL_DIR (diffusers
folder), STEERSERVE_ADAPTER_DIR (the adapter store's blob folder), STEERSERVE_ADAPTER_SLOTS (bank
size), STEERSERVE_ADAPTER_MAX_RANK.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from service.adapters import serialize_adapter
from service.engine.images import decode_image, encode_png
from service.engine.pipeline import AdapterUse, Engine, GenerationCancelled, flush_denormals
from service.engine.sampling import Decode, Denoise, StepResult
from service.personalize import Concept, FrozenBase, TrainingSpec, TrainingStopped, train

if TYPE_CHECKING:
    from service.edit import EditSpec

ENV_MODEL_DIR = "STEERSERVE_MODEL_DIR"
ENV_ADAPTER_DIR = "STEERSERVE_ADAPTER_DIR"
ENV_ADAPTER_SLOTS = "STEERSERVE_ADAPTER_SLOTS"
ENV_ADAPTER_MAX_RANK = "STEERSERVE_ADAPTER_MAX_RANK"
ENV_TORCH_THREADS = "STEERSERVE_TORCH_THREADS"
ENV_COMPILED_DIR = "STEERSERVE_COMPILED_DIR"  # where exported ONNX graphs are cached

Rows = Sequence[Sequence[AdapterUse]]

# -- configuration ---------------------------------------------------------------------------------


def configure_torch() -> None:
    """Intra-op threads per model instance (default 1): every instance is its own process, and on
    a busy 2-core machine torch's 2 spinning OpenMP threads made a 20-step generation 12x slower
    (35 s against 2.9 s with one thread)."""
    torch.set_num_threads(int(os.environ.get(ENV_TORCH_THREADS, "1")))


def model_dir_from_env() -> Path:
    value = os.environ.get(ENV_MODEL_DIR)
    if not value:
        raise RuntimeError(f"{ENV_MODEL_DIR} is not set; the launcher passes the diffusers model folder in it")
    return Path(value)


def instance_device(args: dict) -> str:
    """The torch device of a model instance, from the `args` Triton passes to initialize()."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


def load_engine_from_env(
    args: dict, max_rows: int, adapters: bool = True, unet_runtime: bool = False, registry=None
) -> Engine:
    """The engine of one model instance (on its instance_group's device); with an adapter bank when
    `adapters` and STEERSERVE_ADAPTER_DIR is set.

    `max_rows`: the largest number of rows one model call routes (UNet: its max_batch_size).
    `unet_runtime`: run the UNet as STEERSERVE_UNET_RUNTIME says (eager, compile, onnx), warmed up
    here, before the instance reports ready (the `unet` model: every step of every loop runs there).
    `registry`: where the bank's metrics go (default: the process's global one, each Triton instance
    being its own process).
    """
    configure_torch()
    engine = Engine.from_pretrained(model_dir_from_env(), device=instance_device(args))
    adapter_dir = os.environ.get(ENV_ADAPTER_DIR)
    if adapters and adapter_dir:
        from service.adapters import BankedAdapters
        from service.adapters.loading import blob_loader

        BankedAdapters.attach(
            engine,
            blob_loader(Path(adapter_dir)),
            num_slots=int(os.environ.get(ENV_ADAPTER_SLOTS, "16")),
            max_rank=int(os.environ.get(ENV_ADAPTER_MAX_RANK, "16")),
            max_rows=max_rows,
            registry=registry,
        )
    if unet_runtime:
        from service.compiled import configure_unet_runtime

        configure_unet_runtime(engine, runtime_options_from_env())
    return engine


class BankMetrics:
    """One model instance's adapter bank, exported through Triton's own /metrics as custom metrics
    (the stub process has no HTTP endpoint of its own): residency, pins, host cache, and the
    manager's hit/miss/eviction counters. `update()` after each execute; at rest every pin must be
    back to zero, which the soak benchmark checks.

    `pb_utils` is passed in (it exists only inside a stub), so this stays importable in tests.
    """

    GAUGES = {
        "steerserve_triton_adapter_resident": "Adapters resident in the bank slots of a Triton model instance.",
        "steerserve_triton_adapter_pinned_slots": "Bank slots pinned by requests in flight in a Triton model instance.",
        "steerserve_triton_adapter_host_cached": "Parsed adapters kept in host memory by a Triton model instance.",
    }
    COUNTERS = {  # Triton metric -> the manager's series it mirrors (in the instance's own registry)
        "steerserve_triton_adapter_cache_hits_total": "steerserve_adapter_cache_hits_total",
        "steerserve_triton_adapter_cache_misses_total": "steerserve_adapter_cache_misses_total",
        "steerserve_triton_adapter_evictions_total": "steerserve_adapter_evictions_total",
    }

    def __init__(self, pb_utils, engine: Engine, registry, args: dict):
        self._pb_utils = pb_utils
        self.manager = engine.adapters.manager
        self.registry = registry
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        # Triton drops a family whose Python object is collected while its metrics live: keep both.
        self._families = {
            **{name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.GAUGE)
               for name, text in self.GAUGES.items()},
            **{name: pb_utils.MetricFamily(name=name, description=f"{source} of a Triton model instance's adapter bank.",
                                           kind=pb_utils.MetricFamily.COUNTER)
               for name, source in self.COUNTERS.items()},
        }
        self._gauges = {name: self._families[name].Metric(labels=labels) for name in self.GAUGES}
        self._counters = {name: self._families[name].Metric(labels=labels) for name in self.COUNTERS}
        self._seen = {name: 0.0 for name in self.COUNTERS}

    def values(self) -> dict[str, float]:
        values = {
            "steerserve_triton_adapter_resident": len(self.manager.resident()),
            "steerserve_triton_adapter_pinned_slots": sum(1 for n in self.manager.pinned().values() if n > 0),
            "steerserve_triton_adapter_host_cached": len(self.manager.host_cached()),
        }
        for name, source in self.COUNTERS.items():
            # misses carry a "source" label: sum its series
            values[name] = sum(sample.value for metric in self.registry.collect() for sample in metric.samples
                               if sample.name == source)
        return values

    def update(self) -> None:
        try:
            self._update()
        except Exception as exc:  # noqa: BLE001 - a metrics failure must never fail the requests
            self._pb_utils.Logger.log_warn(f"adapter bank metrics not updated: {exc}")

    def _update(self) -> None:
        values = self.values()
        for name, gauge in self._gauges.items():
            gauge.set(values[name])
        for name, counter in self._counters.items():
            delta = values[name] - self._seen[name]
            if delta > 0:
                counter.increment(delta)
                self._seen[name] = values[name]


def runtime_options_from_env():
    """Settings.unet_runtime_options (STEERSERVE_UNET_*, parsed and checked by Settings), with the
    graph cache the gateway passes in STEERSERVE_COMPILED_DIR."""
    from service.config import Settings

    options = Settings().unet_runtime_options()
    if os.environ.get(ENV_COMPILED_DIR):
        options.cache_dir = Path(os.environ[ENV_COMPILED_DIR])
    return options


# -- adapters on the wire: one JSON string per row ----------------------------------------------


def encode_adapters(uses: Sequence[AdapterUse]) -> bytes:
    """[[key, weight], ...], with a third element 1 for a FineStyle style adapter."""
    return json.dumps([[u.key, u.weight, 1] if u.style else [u.key, u.weight] for u in uses]).encode()


def decode_adapters(raw: bytes | str) -> tuple[AdapterUse, ...]:
    return tuple(AdapterUse(key=str(u[0]), weight=float(u[1]), style=len(u) > 2 and bool(u[2])) for u in json.loads(raw or "[]"))


# -- the parts ---------------------------------------------------------------------------------------


class TextEncode:
    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, prompts: Sequence[str], rows: Rows) -> np.ndarray:
        flush_denormals()
        return self.engine.encode_prompts(list(prompts), list(rows)).float().cpu().numpy()


@dataclass
class StepSample:
    """The part of one UNet call that belongs to one Triton request: m independent predictions
    (CFG's two rows per image, FineStyle's three, an edit's source and target rows)."""

    latents: np.ndarray  # [m, C, h, w]
    timesteps: np.ndarray  # [m]
    embeds: np.ndarray  # [m, L, D]
    adapters: list[tuple[AdapterUse, ...]]  # m rows


class UNetStep:
    """One denoising step for the rows of any requests: one UNet forward per latent shape.

    Engine.predict_noise runs each group, so a single-request call computes exactly what the
    in-process engine computes. Guidance is left to the caller (it is per request); returns per
    request its rows' noise [m, C, h, w].
    """

    def __init__(self, engine: Engine):
        self.engine = engine

    @torch.no_grad()
    def __call__(self, samples: Sequence[StepSample]) -> list[np.ndarray]:
        flush_denormals()
        out: list[np.ndarray | None] = [None] * len(samples)
        # The dynamic batcher only groups equal shapes, but a call must not fail if it ever mixes them.
        by_shape: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            by_shape.setdefault((s.latents.shape[1:], s.embeds.shape[1:]), []).append(i)
        for indices in by_shape.values():
            group = [samples[i] for i in indices]
            dev, dt = self.engine.device, self.engine.dtype
            latents = torch.from_numpy(np.concatenate([s.latents for s in group])).to(dev, dt)
            t = torch.from_numpy(np.concatenate([s.timesteps for s in group]).astype(np.int64)).to(dev)
            embeds = torch.from_numpy(np.concatenate([s.embeds for s in group])).to(dev, dt)
            rows = [row for s in group for row in s.adapters]
            noise = self.engine.predict_noise(latents, t, embeds, rows).float().cpu().numpy()
            start = 0
            for i, s in zip(indices, group):
                m = s.latents.shape[0]
                out[i] = noise[start : start + m]
                start += m
        return out  # type: ignore[return-value]


class VaeDecode:
    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        return self.engine.decode_array(torch.from_numpy(latents))  # [n, H, W, 3] uint8


# -- personalization: a training job on the wire ------------------------------------------------------


def training_spec_to_wire(spec: TrainingSpec) -> tuple[bytes, list[bytes]]:
    """(JSON of every TrainingSpec field but the images, the images as PNG bytes)."""
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "images"}
    fields["concepts"] = [dataclasses.asdict(c) for c in spec.concepts]
    return json.dumps(fields).encode(), [encode_png(image) for image in spec.images]


def training_spec_from_wire(raw: bytes | str, pngs) -> TrainingSpec:
    fields = json.loads(raw)
    images = [decode_image(bytes(png), max_pixels=2**31) for png in pngs]
    fields["concepts"] = [Concept(c["phrase"], tuple(c["box"]) if c["box"] is not None else None)
                          for c in fields.get("concepts", [])]
    return TrainingSpec(images=images, **fields)


class Personalize:
    """What the `personalize` model runs: one training job on this instance's private base model,
    reporting through callbacks that the model turns into streamed responses."""

    def __init__(self, model_dir: Path, device: str):
        self.base = FrozenBase.from_pretrained(model_dir, device=device)

    def __call__(self, spec: TrainingSpec, resume: bytes | None, progress) -> bytes:
        flush_denormals()
        return serialize_adapter(train(self.base, spec, progress, resume))


# -- editing: an edit on the wire, and what the `edit` model runs ---------------------------------------


def edit_spec_to_wire(spec: "EditSpec") -> tuple[bytes, np.ndarray]:
    """(JSON of every EditSpec field but the source, the source image uint8 [H, W, 3])."""
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in ("source", "options", "adapter")}
    fields["options"] = dataclasses.asdict(spec.options)
    fields["adapter"] = [spec.adapter.key, spec.adapter.weight] if spec.adapter is not None else None
    return json.dumps(fields).encode(), np.ascontiguousarray(spec.source, dtype=np.uint8)


def edit_spec_from_wire(raw: bytes | str, source: np.ndarray) -> "EditSpec":
    from service.edit import EditOptions, EditSpec

    fields = json.loads(raw)
    fields["options"] = EditOptions(**fields["options"])
    adapter = fields.pop("adapter")
    fields["adapter"] = AdapterUse(key=str(adapter[0]), weight=float(adapter[1])) if adapter else None
    return EditSpec(source=np.asarray(source, dtype=np.uint8), **fields)


class EditWorker:
    """What the `edit` model runs: the edit loop (service.edit, the same one the in-process backend
    runs), each model call executed where it can be.

    - `Encode`, `Denoise`, `Decode` whose rows name only stored adapters go to the shared models
      through `remote` (BLS): DDS iterations batch with Generate's steps in the `unet` model;
    - DreamSteerer's workbench calls run on this instance's private model copy, and calls whose rows
      name the request's steered copy run on this instance's own engine, whose adapter bank holds
      that copy in a per-request slot (it exists nowhere else and is dropped when the edit ends);
    - `EncodeImage` runs here (one VAE encoder pass).
    """

    def __init__(self, engine: Engine, workbench):
        self.engine = engine
        self.workbench = workbench

    async def __call__(self, spec: "EditSpec", remote, should_stop, progress):
        import asyncio
        import contextlib

        from service.edit import WORKBENCH_CALLS, EditRefused, Steer, editor
        from service.edit.runner import steered_result
        from service.engine.sampling import EncodeImage, run_async

        # Only DreamSteerer needs this instance's bank (the steered copy); plain DDS runs without one.
        manager = getattr(self.engine.adapters, "manager", None)
        loop = editor(spec)(spec, self.engine.facts, should_stop, progress)
        local_keys: set[str] = set()
        with contextlib.ExitStack() as request:
            async def execute(call):
                if isinstance(call, WORKBENCH_CALLS):
                    if manager is None:
                        raise EditRefused("DreamSteerer needs the edit model's adapter bank (STEERSERVE_ADAPTER_DIR)")
                    adapter = await asyncio.to_thread(manager.get, call.adapter.key)
                    result = await asyncio.to_thread(self.workbench.execute, call, adapter, should_stop, progress)
                    answer = steered_result(call, result, manager, request)
                    if isinstance(call, Steer):
                        local_keys.add(answer[0].key)
                    return answer
                rows = getattr(call, "rows", ())
                if isinstance(call, EncodeImage) or any(use.key in local_keys for row in rows for use in row):
                    return await asyncio.to_thread(self._local, call)
                return await remote(call)

            return await run_async(loop, execute)

    def _local(self, call):
        """A model call on this instance's engine. The loop keeps its tensors on the CPU (they
        also travel to the shared models over BLS): inputs move to the engine's device, results
        come back as CPU float32."""
        flush_denormals()
        engine = self.engine
        if isinstance(call, Denoise):
            call = dataclasses.replace(call, latents=call.latents.to(engine.device, engine.dtype),
                                       timesteps=call.timesteps.to(engine.device),
                                       embeds=call.embeds.to(engine.device, engine.dtype))
        elif isinstance(call, Decode):
            call = dataclasses.replace(call, latents=call.latents.to(engine.device, engine.dtype))
        result = engine.execute(call)
        if isinstance(result, StepResult):
            return dataclasses.replace(result, noise=result.noise.float().cpu())
        return result.float().cpu() if isinstance(result, torch.Tensor) else result


# -- errors on the wire ------------------------------------------------------------------------------


def status_message(exc: BaseException) -> str:
    """'<gRPC code name>: message', the form every model's errors take so the gateway can map them
    (Triton's python backend has no code for e.g. NOT_FOUND or DEADLINE_EXCEEDED)."""
    from service.adapters import AdapterBankFull, AdapterFormatError, AdapterNotFoundError

    from service.edit import EditRefused

    if isinstance(exc, RemoteError):
        return str(exc)
    if isinstance(exc, EditRefused):
        code = "FAILED_PRECONDITION"
    elif isinstance(exc, AdapterNotFoundError):
        code = "NOT_FOUND"
    elif isinstance(exc, (AdapterFormatError, ValueError, LookupError)):
        code = "INVALID_ARGUMENT"
    elif isinstance(exc, AdapterBankFull):
        code = "RESOURCE_EXHAUSTED"
    elif isinstance(exc, (GenerationCancelled, TrainingStopped)):
        code = "CANCELLED"
    else:
        code = "INTERNAL"
    return f"{code}: {type(exc).__name__}: {exc}" if code == "INTERNAL" else f"{code}: {exc}"


class RemoteError(RuntimeError):
    """An error a BLS call returned, already in status_message form; passed on unchanged."""


STATUS_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "CANCELLED",
                "UNAVAILABLE", "INTERNAL")


def parse_status(message: str) -> tuple[str, str]:
    """(code name, rest) of a status_message; ('INTERNAL', message) for anything else Triton says."""
    for code in STATUS_CODES:
        marker = f"{code}: "
        at = message.find(marker)
        if at != -1:
            return code, message[at + len(marker):]
    return "INTERNAL", message
