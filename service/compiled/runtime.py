"""What every compiled UNet runtime shares: the runtime names, batch buckets, row padding, warm-up
inputs and the options. The runtime interface and the eager runtime are the engine's
(service/engine/unet.py); building and choosing one is service/compiled/configure.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from service.engine.unet import EagerUNet, RuntimeStats, UNetRuntime

__all__ = ["AUTO_CANDIDATES", "RUNTIMES", "EagerUNet", "RuntimeOptions", "RuntimeStats", "UNetRuntime",
           "batch_buckets", "bucket_for", "pad_rows", "row_timesteps", "warmup_inputs"]

# triton_engine: only inside Triton (the `generate` and `unet` models), each UNet call a BLS call to
# `unet_engine` (the graph as a TensorRT plan at deploy; see triton_engine.py).
# auto: the fastest of eager / compile / onnx on this model and device, read from the cached
# measurement or measured in the background while eager serves (configure.py, selection.py).
RUNTIMES = ("auto", "eager", "compile", "onnx", "triton_engine")
# What `auto` may choose from (STEERSERVE_UNET_RUNTIME_CANDIDATES narrows it).
AUTO_CANDIDATES = ("eager", "onnx", "compile")


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
    # auto: "background" serves eager at once and switches to the measured winner once it is built
    # and warmed up (start-up never waits on measurement); "blocking" measures before returning
    # (`steerserve prepare-runtime`, at image build or by a Job, and tests).
    measure: str = "background"
    threads: int | None = None  # torch intra-op threads of the thread that serves: measured with the same
    ready_file: Path | None = None  # background measurement waits for this file (Triton: all models loaded)
    ready_timeout_s: float = 600.0  # ... at most this long, then measures anyway
    failure_ttl_s: float = 86400.0  # a cached choice with failed candidates is measured again after this

    @property
    def compiled_dir(self) -> Path:
        return Path(self.cache_dir or Path("var") / "compiled")

    def __post_init__(self):
        if self.kind not in RUNTIMES:
            raise ValueError(f"unknown UNet runtime {self.kind!r}; use one of {', '.join(RUNTIMES)}")
        if self.measure not in ("background", "blocking"):
            raise ValueError(f"unknown measure mode {self.measure!r}; use background or blocking")
