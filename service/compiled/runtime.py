"""The UNet runtime interface, the eager default, batch buckets and the one place that picks a runtime."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from service.engine.pipeline import Engine

log = logging.getLogger(__name__)

# triton_engine: only inside Triton's `unet` model, each step a BLS call to `unet_engine` (the
# graph as a TensorRT plan at deploy; see triton_engine.py).
# auto: the fastest of eager / compile / onnx on this model and device, measured at start or read
# from the cached measurement (selection.py).
RUNTIMES = ("auto", "eager", "compile", "onnx", "triton_engine")
# What `auto` may choose from (STEERSERVE_UNET_RUNTIME_CANDIDATES narrows it).
AUTO_CANDIDATES = ("eager", "onnx", "compile")


class UNetRuntime(Protocol):
    """One UNet forward: latents [m, C, h, w], timesteps [m], embeds [m, L, D] -> noise [m, C, h, w].

    Called by Engine.predict_noise inside the adapter bank's ``activate`` block, so row i's adapters
    are already routed; a runtime never decides residency or routing, it only executes.
    """

    name: str

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor: ...

    def warmup(self, shapes: Sequence[tuple[int, int, int]]) -> None:
        """Prepare (compile, capture, build) for these (rows, latent height, latent width) shapes."""


@dataclass
class RuntimeStats:
    """Counters a runtime keeps; exported by the gateway (steerserve_unet_*)."""

    calls: int = 0
    fallback_calls: int = 0  # shapes the compiled form does not cover, run eager
    warmup_seconds: float = 0.0
    shapes: set = field(default_factory=set)  # distinct (rows or bucket, h, w) run in the compiled form
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, fallback: bool = False) -> None:
        with self._lock:
            self.calls += 1
            self.fallback_calls += int(fallback)


class EagerUNet:
    """The banked UNet module called as it is."""

    name = "eager"

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.stats = RuntimeStats()

    def __call__(self, latents, timesteps, embeds):
        self.stats.count()
        return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample

    def warmup(self, shapes) -> None:
        return None


def batch_buckets(max_rows: int, buckets: Sequence[int] = ()) -> tuple[int, ...]:
    """The batch sizes compiled graphs are built for: ``buckets`` if given (capped at max_rows, which
    is always included), else powers of two up to max_rows. A call with m rows runs in the smallest
    bucket >= m, its extra rows zero latents routed to slot 0 (the base model), their output dropped."""
    chosen = sorted({b for b in buckets if 0 < b <= max_rows}) if buckets else []
    if not chosen:
        b = 1
        while b < max_rows:
            chosen.append(b)
            b *= 2
    if chosen[-1] != max_rows:
        chosen.append(max_rows)
    return tuple(chosen)


def bucket_for(rows: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if b >= rows:
            return b
    return None


def row_timesteps(timesteps, rows: int, device) -> torch.Tensor:
    """[rows] float32 timesteps: one dtype for every call (the UNet embeds them as float anyway; a
    long here and a float there would be two graphs), a scalar broadcast to the rows."""
    timesteps = torch.as_tensor(timesteps, device=device).to(torch.float32).reshape(-1)
    # contiguous: an expanded (stride-0) tensor would be another graph under Dynamo's stride guard.
    return (timesteps.expand(rows) if timesteps.numel() == 1 else timesteps).contiguous()


def pad_rows(
    latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pads a call to ``rows`` rows (zeros; the bank routes rows past the real ones to slot 0).
    ``timesteps``: one per row (row_timesteps)."""
    extra = rows - latents.shape[0]
    if extra <= 0:
        return latents, timesteps, embeds
    return (
        torch.cat([latents, latents.new_zeros((extra, *latents.shape[1:]))]),
        torch.cat([timesteps, timesteps[:1].expand(extra)]),
        torch.cat([embeds, embeds.new_zeros((extra, *embeds.shape[1:]))]),
    )


def warmup_inputs(unet: torch.nn.Module, rows: int, height: int, width: int, text_length: int):
    """Zero latents and embeddings and a late timestep for a warm-up call of this shape."""
    param, config = next(unet.parameters()), unet.config
    like = dict(device=param.device, dtype=param.dtype)
    return (torch.zeros(rows, config.in_channels, height, width, **like),
            torch.full((rows,), 999.0, device=param.device),
            torch.zeros(rows, text_length, config.cross_attention_dim, **like))


@dataclass
class RuntimeOptions:
    """How the engine's UNet runs (Settings.unet_* / STEERSERVE_UNET_* on both backends)."""

    kind: str = "eager"  # one of RUNTIMES (Settings default: auto)
    candidates: tuple[str, ...] = AUTO_CANDIDATES  # what `auto` measures
    buckets: tuple[int, ...] = ()  # batch buckets for compiled graphs; () = powers of two up to max_rows
    compile_mode: str = "auto"  # torch.compile mode; auto = reduce-overhead (CUDA graphs) on CUDA, default on CPU
    warmup: bool = True  # compile / export / build every bucket at the default resolution at start
    cache_dir: Path | None = None  # where exported ONNX graphs are kept (keyed by model and bank layout)

    def __post_init__(self):
        if self.kind not in RUNTIMES:
            raise ValueError(f"unknown UNet runtime {self.kind!r}; use one of {', '.join(RUNTIMES)}")


def _max_rows(engine: "Engine") -> int:
    bank = engine.adapters.bank
    return bank.state.max_rows if bank is not None else 64


def warmup_shapes(engine: "Engine", buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    size = engine.limits.default_size // engine.vae_scale_factor
    return [(b, size, size) for b in buckets]


def build_runtime(engine: "Engine", kind: str, options: RuntimeOptions, buckets: Sequence[int]) -> UNetRuntime:
    """`kind`'s runtime for this engine (its adapter bank attached: compiled forms must see the
    banked layers), not yet warmed up."""
    if kind == "eager":
        return EagerUNet(engine.unet)
    if kind == "compile":
        from .torch_compile import CompiledUNet

        # Inductor's compiled kernels and FX graphs, kept beside the ONNX exports so a restart
        # reuses them (torch's default is a /tmp folder that does not survive a new pod).
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(options.cache_dir or Path("var") / "compiled") / "inductor"))

        return CompiledUNet(engine.unet, buckets, mode=options.compile_mode, text_length=engine.tokenizer.model_max_length)
    if kind == "onnx":
        from .onnx_runtime import OnnxUNet

        return OnnxUNet.for_engine(engine, options.cache_dir or Path("var") / "compiled", max_rows=buckets[-1])
    if kind == "triton_engine":
        from .triton_engine import TritonEngineUNet

        return TritonEngineUNet.for_engine(engine, options.cache_dir or Path("var") / "compiled", max_rows=buckets[-1])
    raise ValueError(f"unknown UNet runtime {kind!r}")


def configure_unet_runtime(engine: "Engine", options: RuntimeOptions) -> UNetRuntime:
    """Puts ``options.kind``'s runtime on ``engine`` (after its adapter bank is attached) and warms
    it up; `auto` first picks the fastest candidate by measurement (selection.py). Returns the
    runtime; `engine.unet_runtime_choice` says what was chosen and why, `stats.warmup_seconds` how
    long the start took (measurement included)."""
    from .selection import RuntimeChoice, choose_runtime

    buckets = batch_buckets(_max_rows(engine), options.buckets)
    started = time.perf_counter()
    if options.kind == "auto":
        runtime, choice = choose_runtime(engine, options, buckets,
                                         lambda kind: build_runtime(engine, kind, options, buckets),
                                         candidates=options.candidates)
    else:
        runtime, choice = build_runtime(engine, options.kind, options, buckets), RuntimeChoice(options.kind, "setting")
    engine.unet_runtime = runtime
    engine.unet_runtime_choice = choice
    if options.warmup:
        runtime.warmup(warmup_shapes(engine, buckets))
    runtime.stats.warmup_seconds = time.perf_counter() - started
    log.info("UNet runtime %s ready in %.1f s: %s", runtime.name, runtime.stats.warmup_seconds, choice.describe())
    return runtime
