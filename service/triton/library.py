"""What the Triton models in model_repo/ compute, as plain library code (no pb_utils, no gRPC).

Each `model_repo/<name>/1/model.py` only converts Triton tensors to and from numpy and calls into here,
so tests and the benchmark exercise the same code without a server.

- `TextEncode`, `UNetStep`, `VaeDecode`: the engine's parts, one call each.
- `UNetStep` is the step-level batching point: one call runs ONE denoising step for any number of
  samples from different requests, each with its own latents, timestep, prompt embeddings and
  adapters (rows of the adapter bank), in a single UNet forward.
- `run_generation`: the sampling loop of Engine.generate written against awaitable calls to those
  parts, so the `generate` model can keep many requests in flight on one event loop.

Models are configured from the environment (see docs/triton.md): STEERSERVE_MODEL_DIR (diffusers
folder), STEERSERVE_ADAPTER_DIR (the adapter store's blob folder), STEERSERVE_ADAPTER_SLOTS (bank
size), STEERSERVE_ADAPTER_MAX_RANK.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from service.engine.pipeline import (
    AdapterUse,
    Engine,
    GenerationCancelled,
    GenerationSpec,
    ModelLimits,
    classifier_free_guidance,
    flush_denormals,
)

ENV_MODEL_DIR = "STEERSERVE_MODEL_DIR"
ENV_ADAPTER_DIR = "STEERSERVE_ADAPTER_DIR"
ENV_ADAPTER_SLOTS = "STEERSERVE_ADAPTER_SLOTS"
ENV_ADAPTER_MAX_RANK = "STEERSERVE_ADAPTER_MAX_RANK"
ENV_TORCH_THREADS = "STEERSERVE_TORCH_THREADS"

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


def load_engine_from_env(args: dict, max_rows: int, adapters: bool = True) -> Engine:
    """The engine of one model instance (on its instance_group's device); with an adapter bank when
    `adapters` and STEERSERVE_ADAPTER_DIR is set.

    `max_rows`: the largest number of rows one model call routes (UNet: 2 x max_batch_size).
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
        )
    return engine


# -- adapters on the wire: one JSON string per sample ----------------------------------------------


def encode_adapters(uses: Sequence[AdapterUse]) -> bytes:
    return json.dumps([[u.key, u.weight] for u in uses]).encode()


def decode_adapters(raw: bytes | str) -> tuple[AdapterUse, ...]:
    return tuple(AdapterUse(key=str(k), weight=float(w)) for k, w in json.loads(raw or "[]"))


# -- the parts ---------------------------------------------------------------------------------------


class TextEncode:
    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, prompts: Sequence[str], rows: Rows) -> np.ndarray:
        flush_denormals()
        return self.engine.encode_prompts(list(prompts), list(rows)).float().cpu().numpy()


@dataclass
class StepSample:
    """The part of one UNet call that belongs to one Triton request (n samples of one request)."""

    latents: np.ndarray  # [n, C, h, w]
    timesteps: np.ndarray  # [n]
    embeds: np.ndarray  # [n, 2, L, D]: (unconditional, conditional) prompt embeddings
    adapters: list[tuple[AdapterUse, ...]]  # n rows


class UNetStep:
    """One denoising step for a batch of samples from any requests: one UNet forward per latent shape.

    Rows are laid out [uncond of every sample; cond of every sample] like Engine.predict_noise_cfg,
    so a single-sample call computes exactly what the in-process engine computes.
    Guidance is left to the caller (it is per request); returns per request [n, 2, C, h, w].
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
            with self.engine.adapters.activate(rows + rows):
                noise = self.engine.unet(
                    torch.cat([latents, latents]),
                    torch.cat([t, t]),
                    encoder_hidden_states=torch.cat([embeds[:, 0], embeds[:, 1]]),
                ).sample
            uncond, cond = noise.chunk(2)
            pairs = torch.stack([uncond, cond], dim=1).float().cpu().numpy()
            start = 0
            for i, s in zip(indices, group):
                n = s.latents.shape[0]
                out[i] = pairs[start : start + n]
                start += n
        return out  # type: ignore[return-value]


class VaeDecode:
    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        flush_denormals()
        images = self.engine.decode(torch.from_numpy(latents).to(self.engine.device, self.engine.dtype))
        return np.stack([np.asarray(img) for img in images])  # [n, H, W, 3] uint8


# -- the loop ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the orchestrator and the gateway need of the model without loading its weights."""

    name: str
    scheduler_config: dict
    latent_channels: int
    limits: ModelLimits

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelFacts":
        model_dir = Path(model_dir)
        kw = dict(local_files_only=True)
        unet = UNet2DConditionModel.load_config(model_dir / "unet", **kw)
        vae = AutoencoderKL.load_config(model_dir / "vae", **kw)
        scheduler = DDIMScheduler.from_config(
            DDIMScheduler.load_config(model_dir / "scheduler", **kw), steps_offset=1, clip_sample=False
        )
        vsf = 2 ** (len(vae["block_out_channels"]) - 1)
        return cls(
            name=model_dir.name,
            scheduler_config=dict(scheduler.config),
            latent_channels=int(unet["in_channels"]),
            limits=ModelLimits(vae_scale_factor=vsf, default_size=int(unet["sample_size"]) * vsf),
        )

    def new_scheduler(self, steps: int) -> DDIMScheduler:
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        return scheduler

    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        # Must equal Engine.initial_latents (tests compare the images of both backends).
        vsf = self.limits.vae_scale_factor
        shape = (self.latent_channels, height // vsf, width // vsf)
        return torch.stack(
            [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32) for s in seeds]
        )


@dataclass
class StepInfo:
    """What one UNet step looked like from a request: the batch it shared and its wait."""

    step: int
    total: int
    batch_size: int  # samples in the UNet call this request's step ran in
    queue_seconds: float  # round trip minus the UNet call's own compute time


@dataclass
class GenerationOutput:
    images: np.ndarray  # [n, H, W, 3] uint8
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)


EncodeCall = Callable[[list[str], list[tuple[AdapterUse, ...]]], Awaitable[np.ndarray]]
# (latents [n,C,h,w], timesteps [n], embeds [n,2,L,D], adapters) -> (noise [n,2,C,h,w], batch size, compute s)
StepCall = Callable[[np.ndarray, np.ndarray, np.ndarray, list], Awaitable[tuple[np.ndarray, int, float]]]
DecodeCall = Callable[[np.ndarray], Awaitable[np.ndarray]]


async def run_generation(
    facts: ModelFacts,
    spec: GenerationSpec,
    encode: EncodeCall,
    unet_step: StepCall,
    decode: DecodeCall,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[StepInfo], Awaitable[None]] | None = None,
) -> GenerationOutput:
    """Engine.generate's algorithm, one awaited UNet step at a time (same numbers, same order)."""
    flush_denormals()
    t_start = time.perf_counter()
    n = spec.num_images
    seeds = [spec.seed + i for i in range(n)]
    rows = [tuple(spec.adapters)] * n

    t0 = time.perf_counter()
    prompt_embeds = await encode([spec.negative_prompt] * n + [spec.prompt] * n, rows + rows)
    pairs = np.stack([prompt_embeds[:n], prompt_embeds[n:]], axis=1)  # [n, 2, L, D]
    t_text = time.perf_counter() - t0

    t0 = time.perf_counter()
    latents = facts.initial_latents(seeds, spec.height, spec.width)
    scheduler = facts.new_scheduler(spec.steps)
    for i, t in enumerate(scheduler.timesteps):
        if should_stop():
            raise GenerationCancelled(f"stopped before step {i + 1} of {spec.steps}")
        sent = time.perf_counter()
        noise_pairs, batch_size, compute_s = await unet_step(
            latents.numpy(), np.full((n,), int(t), dtype=np.int64), pairs, rows
        )
        round_trip = time.perf_counter() - sent
        noise = torch.from_numpy(noise_pairs)
        uncond, cond = noise[:, 0], noise[:, 1]
        noise = classifier_free_guidance(uncond, cond, spec.guidance_scale)
        latents = scheduler.step(noise, t, latents).prev_sample
        if on_step is not None:
            await on_step(StepInfo(i + 1, spec.steps, batch_size, max(0.0, round_trip - compute_s)))
    t_denoise = time.perf_counter() - t0

    t0 = time.perf_counter()
    images = await decode(latents.numpy())
    t_decode = time.perf_counter() - t0
    return GenerationOutput(
        images=images,
        seeds=seeds,
        timings=dict(
            text_encode_seconds=t_text,
            denoise_seconds=t_denoise,
            decode_seconds=t_decode,
            total_seconds=time.perf_counter() - t_start,
        ),
    )


# -- errors on the wire ------------------------------------------------------------------------------


def status_message(exc: BaseException) -> str:
    """'<gRPC code name>: message', the form every model's errors take so the gateway can map them
    (Triton's python backend has no code for e.g. NOT_FOUND or DEADLINE_EXCEEDED)."""
    from service.adapters import AdapterBankFull, AdapterFormatError, AdapterNotFoundError

    if isinstance(exc, RemoteError):
        return str(exc)
    if isinstance(exc, AdapterNotFoundError):
        code = "NOT_FOUND"
    elif isinstance(exc, (AdapterFormatError, ValueError, LookupError)):
        code = "INVALID_ARGUMENT"
    elif isinstance(exc, AdapterBankFull):
        code = "RESOURCE_EXHAUSTED"
    elif isinstance(exc, GenerationCancelled):
        code = "CANCELLED"
    else:
        code = "INTERNAL"
    return f"{code}: {type(exc).__name__}: {exc}" if code == "INTERNAL" else f"{code}: {exc}"


class RemoteError(RuntimeError):
    """An error a BLS call returned, already in status_message form; passed on unchanged."""


STATUS_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED", "UNAVAILABLE", "INTERNAL")


def parse_status(message: str) -> tuple[str, str]:
    """(code name, rest) of a status_message; ('INTERNAL', message) for anything else Triton says."""
    for code in STATUS_CODES:
        marker = f"{code}: "
        at = message.find(marker)
        if at != -1:
            return code, message[at + len(marker):]
    return "INTERNAL", message
