"""The engine: text -> image with a Stable Diffusion 1.x/2.x-architecture model, on one device.

Reads top to bottom as the algorithm (encode text, sample DDIM with classifier-free guidance, decode
with the VAE). It is plain library code with no gRPC in it, so the in-process backend, a Triton
`model.py` and the tests all call the same functions.

Per-user adapters plug in through `AdapterHook`: before each UNet call the engine tells the hook
which batch rows belong to which request, and the hook makes the UNet apply each request's adapters
to its own rows (see service/adapters for the bank that implements it).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Protocol, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer


def _place(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device).eval().requires_grad_(False)


def flush_denormals() -> None:
    """Small weights drive activations into float denormals, which make x86 CPU kernels ~50x
    slower (measured: a tiny-UNet call 76 ms -> 4.1 s). Flushing them to zero changes results by
    < 1e-38 and is what GPUs do anyway. The flag lives in a per-thread CPU register, so every
    compute entry point sets it for the thread it runs on."""
    torch.set_flush_denormal(True)


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Moves the unconditional prediction toward the prompt's by `scale` (1 = no guidance)."""
    return uncond + scale * (cond - uncond)


class GenerationCancelled(Exception):
    """Raised between denoising steps when the caller's `should_stop` says so (deadline, cancel)."""


@dataclass(frozen=True)
class AdapterUse:
    """One adapter applied to one request, with its mixing weight."""

    key: str
    weight: float = 1.0


@dataclass
class GenerationSpec:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 64
    height: int = 64
    seed: int = 0
    num_images: int = 1
    adapters: tuple[AdapterUse, ...] = ()


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class AdapterHook(Protocol):
    """How adapters reach the UNet (and text encoder). The default applies none."""

    def hold(self, rows: Sequence[Sequence[AdapterUse]]) -> ContextManager[object]:
        """Keeps the rows' adapters resident for a whole request (pinned in their slots)."""

    def activate(self, rows: Sequence[Sequence[AdapterUse]]) -> ContextManager[None]:
        """Within the context, UNet batch row i applies the adapters in rows[i]."""

    def encode_prompts(
        self, engine: "Engine", prompts: Sequence[str], rows: Sequence[Sequence[AdapterUse]]
    ) -> torch.Tensor | None:
        """Prompt embeddings with learned tokens (textual inversion), or None to use the plain encoder."""


class NoAdapters:
    def hold(self, rows):
        if any(rows):
            raise LookupError("this engine has no adapter bank; adapters cannot be applied")
        return contextlib.nullcontext()

    activate = hold

    def encode_prompts(self, engine, prompts, rows):
        return None


@dataclass(frozen=True)
class ModelLimits:
    """Image-size facts of the loaded model that request validation needs."""

    vae_scale_factor: int
    default_size: int  # the resolution the model was trained at


class Engine:
    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: DDIMScheduler,
        name: str = "",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = _place(text_encoder, device, dtype)
        self.unet = _place(unet, device, dtype)
        self.vae = _place(vae, device, dtype)
        self.scheduler_config = scheduler.config
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.adapters: AdapterHook = NoAdapters()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.limits = ModelLimits(
            vae_scale_factor=self.vae_scale_factor,
            default_size=int(self.unet.config.sample_size) * self.vae_scale_factor,
        )
        # The text encoder is cheap and shared; one lock keeps tokenizer/encoder use simple.
        self._text_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> "Engine":
        """Loads a diffusers-format SD 1.x/2.x folder from local disk only (never the hub)."""
        model_dir = Path(model_dir)
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
        kw = dict(local_files_only=True)
        scheduler_config = DDIMScheduler.load_config(model_dir / "scheduler", **kw)
        # SD checkpoints ship PNDM/others; DDIM reads the same beta schedule. steps_offset=1 matches
        # SD's training timesteps (and silences diffusers' deprecation warning for 0).
        scheduler = DDIMScheduler.from_config(scheduler_config, steps_offset=1, clip_sample=False)
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer", **kw),
            text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=dtype, **kw),
            unet=UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=dtype, **kw),
            vae=AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=dtype, **kw),
            scheduler=scheduler,
            name=model_dir.name,
            device=device,
            dtype=dtype,
        )

    # -- the algorithm -------------------------------------------------------------------------

    def generate(
        self, spec: GenerationSpec, should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        flush_denormals()
        t_start = time.perf_counter()
        n = spec.num_images
        seeds = [spec.seed + i for i in range(n)]
        rows = [tuple(spec.adapters)] * n

        # Pin the request's adapters for all of its steps (a per-step miss would reload them).
        with self.adapters.hold(rows):
            # 1. Text: [uncond x n, cond x n]; each row keeps its request's adapters (CFG pair shares).
            t0 = time.perf_counter()
            prompt_embeds = self.encode_prompts([spec.negative_prompt] * n + [spec.prompt] * n, rows + rows)
            t_text = time.perf_counter() - t0

            # 2. Denoise from per-image seeded noise (image i == a one-image request with seed + i).
            t0 = time.perf_counter()
            latents = self.initial_latents(seeds, spec.height, spec.width)
            scheduler = self.new_scheduler(spec.steps)
            for i, t in enumerate(scheduler.timesteps):
                if should_stop is not None and should_stop():
                    raise GenerationCancelled(f"stopped before step {i + 1} of {spec.steps}")
                noise = self.predict_noise_cfg(latents, t, prompt_embeds, spec.guidance_scale, rows)
                latents = scheduler.step(noise, t, latents).prev_sample
                if on_step is not None:
                    on_step(i + 1, spec.steps)
            t_denoise = time.perf_counter() - t0

        # 3. Decode.
        t0 = time.perf_counter()
        images = self.decode(latents)
        t_decode = time.perf_counter() - t0
        return GenerationResult(
            images=images,
            seeds=seeds,
            timings=dict(
                text_encode_seconds=t_text,
                denoise_seconds=t_denoise,
                decode_seconds=t_decode,
                total_seconds=time.perf_counter() - t_start,
            ),
        )

    # -- the steps, usable on their own (batched serving, editing, training) ---------------------

    def new_scheduler(self, steps: int) -> DDIMScheduler:
        """A fresh scheduler per request: set_timesteps mutates it, so it must not be shared."""
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], rows: Sequence[Sequence[AdapterUse]] | None = None
    ) -> torch.Tensor:
        rows = rows if rows is not None else [()] * len(prompts)
        with self._text_lock:
            if any(rows):
                embeds = self.adapters.encode_prompts(self, prompts, rows)
                if embeds is not None:
                    return embeds
            ids = self.tokenize(prompts)
            return self.text_encoder(ids)[0]

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def count_tokens(self, prompt: str) -> int:
        """Tokens in a prompt, without the start/end markers (for prompt-length validation)."""
        return len(self.tokenizer(prompt, add_special_tokens=False).input_ids)

    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        shape = (
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        noise = [
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
            for s in seeds
        ]
        # DDIM's initial sigma is 1, so no init_noise_sigma scaling is needed.
        return torch.stack(noise).to(self.device, self.dtype)

    @torch.no_grad()
    def predict_noise_cfg(
        self,
        latents: torch.Tensor,
        t: torch.Tensor | int,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        rows: Sequence[Sequence[AdapterUse]],
    ) -> torch.Tensor:
        """One UNet call on [uncond; cond] rows, combined with classifier-free guidance."""
        flush_denormals()
        latent_in = torch.cat([latents, latents])
        with self.adapters.activate(list(rows) + list(rows)):
            noise = self.unet(latent_in, t, encoder_hidden_states=prompt_embeds).sample
        uncond, cond = noise.chunk(2)
        return classifier_free_guidance(uncond, cond, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        scaling = self.vae.config.scaling_factor
        pixels = self.vae.decode(latents / scaling).sample
        pixels = (pixels / 2 + 0.5).clamp(0, 1)
        arrays = (pixels.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arrays]

    @torch.no_grad()
    def encode_image(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latent (mean of the posterior) of an RGB image, scaled like the UNet expects."""
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(self.device, self.dtype)
        latent = self.vae.encode(pixels).latent_dist.mean
        return latent * self.vae.config.scaling_factor
