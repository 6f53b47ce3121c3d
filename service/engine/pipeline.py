"""The engine: text -> image with a Stable Diffusion 1.x/2.x/XL-architecture model, on one device.

What differs between those generations (text encoders, conditioning) is the model's family
(service/engine/families); the engine holds the family's parts and asks it, nothing else here knows.

The sampling algorithm itself is `service.engine.sampling.generation`, written once; the engine
runs it with every model call executed here, in the caller's thread (`Engine.execute`). The Triton
`generate` model runs the same loop with its UNet steps sent to the batched `unet` model. This is
plain library code with no gRPC in it, so the in-process backend, the Triton models, the trainers
and the tests all call the same functions.

Per-user adapters plug in through `AdapterHook`: before each UNet call the engine tells the hook
which batch rows belong to which request, and the hook makes the UNet apply each request's adapters
to its own rows (see service/adapters for the bank that implements it).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Protocol, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import families
from .construction import MODULE_CONSTRUCTION
from .text import PromptEncoder

from .unet import EagerUNet, UNetRuntime

from .sampling import (
    AdapterUse,
    Decode,
    Denoise,
    Encode,
    EncodeImage,
    GenerationCancelled,
    GenerationSpec,
    ModelCall,
    ModelFacts,
    ModelLimits,
    StepResult,
    classifier_free_guidance,
    ddim_config,
    generation,
    run,
)

__all__ = [
    "AdapterHook", "AdapterUse", "Engine", "GenerationCancelled", "GenerationResult", "GenerationSpec",
    "ModelLimits", "NoAdapters", "classifier_free_guidance", "flush_denormals",
]


COMPONENTS = ("text_encoder", "unet", "vae")  # text_encoder: all of the family's text encoders


def _place(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    if next(module.parameters()).device.type == "meta":  # a component this engine did not load
        return module.eval().requires_grad_(False)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device).eval().requires_grad_(False)


def flush_denormals() -> None:
    """Small weights drive activations into float denormals, which make x86 CPU kernels ~50x
    slower (measured: a tiny-UNet call 76 ms -> 4.1 s). Flushing them to zero changes results by
    < 1e-38 and is what GPUs do anyway. The flag lives in a per-thread CPU register, so every
    compute entry point sets it for the thread it runs on."""
    torch.set_flush_denormal(True)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class AdapterHook(Protocol):
    """How adapters reach the UNet (and text encoder). The default applies none.

    `bank` and `manager` are the adapter bank (service.adapters.AdapterBank: the slots the layers
    read) and the manager that owns their residency (AdapterManager), or None without a bank."""

    bank: object | None
    manager: object | None

    def hold(self, rows: Sequence[Sequence[AdapterUse]]) -> ContextManager[object]:
        """Keeps the rows' adapters resident for a whole request (pinned in their slots)."""

    def activate(self, rows: Sequence[Sequence[AdapterUse]]) -> ContextManager[None]:
        """Within the context, UNet batch row i applies the adapters in rows[i]."""

    def encode_prompts(
        self, engine: "Engine", prompts: Sequence[str], rows: Sequence[Sequence[AdapterUse]],
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor | None:
        """Prompt embeddings with learned tokens (textual inversion), or None to use the plain encoder."""

    # Distinct adapters one model call can apply (None: no bound).
    slot_capacity: int | None

    def prefetch(self, rows: Sequence[Sequence[AdapterUse]]) -> None:
        """Start making the rows' adapters ready without waiting (off the request path)."""


class NoAdapters:
    bank = None
    manager = None
    slot_capacity = None

    def prefetch(self, rows):
        return None

    def hold(self, rows):
        if any(rows):
            raise LookupError("this engine has no adapter bank; adapters cannot be applied")
        return contextlib.nullcontext()

    activate = hold

    def encode_prompts(self, engine, prompts, rows, size=None):
        return None


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
        *,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        family: families.ModelFamily | None = None,
    ):
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = _place(text_encoder_2, device, dtype) if text_encoder_2 is not None else None
        self._counting_tokenizer = None  # count_tokens' own copy (see there)
        self.text_encoder = _place(text_encoder, device, dtype)
        self.unet = _place(unet, device, dtype)
        self.family = family if family is not None else families.of_configs(
            {"text_encoder_2": True} if text_encoder_2 is not None else {}, unet.config, name or "model",
            tokenizer.model_max_length)
        self.vae_dtype = self.family.vae_dtype(vae.config, dtype)
        self.vae = _place(vae, device, self.vae_dtype)
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.adapters: AdapterHook = NoAdapters()
        # service.image_prompt.served.ServedImagePrompts once an IP-Adapter is installed: its
        # `pack(embeds, image_prompts)` adds every row's image-prompt tokens to its conditioning.
        self.image_prompts = None
        # How a UNet forward executes (eager, torch.compile, onnxruntime): service.compiled. The
        # trainers and the edit workbench call self.unet directly (they need gradients).
        self.unet_runtime: UNetRuntime = EagerUNet(self.unet)
        self.unet_runtime_choice = None  # service.compiled.selection.RuntimeChoice once configured
        self.family.install(self.unet)  # the UNet takes the family's embeds as they are
        self.facts = ModelFacts.from_configs(name, self.unet.config, self.vae.config, scheduler.config)
        self.scheduler_config = self.facts.scheduler_config
        self.limits = self.facts.limits
        self.vae_scale_factor = self.limits.vae_scale_factor
        # The text encoder is cheap and shared; one lock keeps tokenizer/encoder use simple.
        self._text_lock = threading.Lock()
        self.prompt_encoder = PromptEncoder.of_engine(self)

    @property
    def text_length(self) -> int:
        """L of the conditioning `embeds` [rows, L, D] the UNet takes: the family's, and the packed
        image-prompt tokens where an IP-Adapter is installed (every encoded prompt carries them, so
        compiled runtimes and warm-ups see this one shape)."""
        extra = self.image_prompts.layout.extra_tokens if self.image_prompts is not None else 0
        return self.family.text_length + extra

    @property
    def text_width(self) -> int:
        return self.family.text_width

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
        components: Sequence[str] = COMPONENTS,
    ) -> "Engine":
        """Loads a diffusers-format SD 1.x/2.x/XL folder from local disk only (never the hub); a
        folder of another architecture is refused (families.UnsupportedModel) before any weight.

        `components`: the models whose weights this engine needs; the others are built on the meta
        device from their configs (their architecture, config and layer names, no memory), e.g. a
        Triton `vae_decode` instance loads the VAE alone: on an SD 1.5 folder, 0.3 GB instead of 4.3."""
        model_dir = Path(model_dir)
        family = families.detect(model_dir)
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
        kw = dict(local_files_only=True)
        scheduler = DDIMScheduler.from_config(ddim_config(DDIMScheduler.load_config(model_dir / "scheduler", **kw)))

        def load(name, load_weights, skeleton):
            if name in components:
                with MODULE_CONSTRUCTION:  # from_pretrained patches process-wide functions while it runs
                    return load_weights()
            with torch.device("meta"):
                return skeleton()

        def text_encoder(tower: families.TextTower, model_class):
            path = model_dir / tower.text_encoder
            return load("text_encoder", lambda: model_class.from_pretrained(path, dtype=dtype, **kw),
                        lambda: model_class(model_class.config_class.from_pretrained(path, **kw)))

        second = {}
        if len(family.towers) > 1:
            tower = family.towers[1]
            second = dict(tokenizer_2=CLIPTokenizer.from_pretrained(model_dir / tower.tokenizer, **kw),
                          text_encoder_2=text_encoder(tower, CLIPTextModelWithProjection))
        return cls(
            **second,
            family=family,
            tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer", **kw),
            text_encoder=text_encoder(family.towers[0], CLIPTextModel),
            unet=load("unet", lambda: UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=dtype, **kw),
                      lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet", **kw))),
            vae=load("vae", lambda: AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=dtype, **kw),
                     lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(model_dir / "vae", **kw))),
            scheduler=scheduler,
            name=model_dir.name,
            device=device,
            dtype=dtype,
        )

    # -- the algorithm (service.engine.sampling), every model call run here ----------------------

    def generate(
        self, spec: GenerationSpec, should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        flush_denormals()
        rows = [tuple(spec.adapters)] * spec.num_images
        loop = generation(
            spec, self.facts, should_stop or (lambda: False),
            on_step=(lambda info: on_step(info.step, info.total)) if on_step is not None else None,
            device=self.device, dtype=self.dtype,
        )
        # Pin the request's adapters for all of its steps (a per-step miss would reload them).
        with self.adapters.hold(rows):
            out = run(loop, self.execute)
        return GenerationResult([Image.fromarray(a) for a in out.images], out.seeds, out.timings)

    def execute(self, call: ModelCall):
        """One model call of a sampling loop, in this thread."""
        if isinstance(call, Encode):
            return self.encode_prompts(call.prompts, call.rows, call.size, call.image_prompts)
        if isinstance(call, Denoise):
            noise = self.predict_noise(call.latents, call.timesteps, call.embeds, call.rows)
            return StepResult(noise, batch_size=call.latents.shape[0], compute_seconds=0.0)
        if isinstance(call, Decode):
            return self.decode_array(call.latents)
        if isinstance(call, EncodeImage):
            return self.encode_image(Image.fromarray(call.image))
        raise TypeError(f"unknown model call {type(call).__name__}")

    # -- the steps, usable on their own (batched serving, editing, training) ---------------------

    def new_scheduler(self, steps: int) -> DDIMScheduler:
        return self.facts.new_scheduler(steps, self.device)

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], rows: Sequence[Sequence[AdapterUse]] | None = None,
        size: tuple[int, int] | None = None, image_prompts: Sequence | None = None,
    ) -> torch.Tensor:
        """The UNet's conditioning [len(prompts), L, D] for images of size (h, w) (default: the
        model's own), row i with the adapters of rows[i] (learned tokens, text-encoder LoRA) and
        the image prompt image_prompts[i] (where the model serves image prompts: then every row's
        conditioning carries the image-prompt tokens, empty where it has none, one shape for all)."""
        rows = rows if rows is not None else [()] * len(prompts)
        if image_prompts is not None and any(p is not None for p in image_prompts) and self.image_prompts is None:
            raise ValueError(f"model {self.name or 'model'} serves no image prompts: no IP-Adapter is loaded where it "
                             "runs (STEERSERVE_IMAGE_PROMPT_ADAPTER, read by the gateway and the model server alike)")
        with self._text_lock:
            embeds = None
            if any(rows):
                embeds = self.adapters.encode_prompts(self, prompts, rows, size)
            if embeds is None:
                embeds = self.prompt_encoder.encode(prompts, None, size)
        if self.image_prompts is not None:
            embeds = self.image_prompts.pack(embeds, image_prompts or [None] * len(prompts))
        return embeds

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def count_tokens(self, prompt: str) -> int:
        """Tokens in a prompt, without the start/end markers (for prompt-length validation).

        On its own copy of the tokenizer: validation runs on the gateway's event loop while engine
        threads tokenize under _text_lock, and a fast tokenizer's padding/truncation settings are
        state of the one Rust object, so two callers with different settings on one object can get
        each other's (seen as a batch of mismatched lengths under load)."""
        if self._counting_tokenizer is None:
            self._counting_tokenizer = copy.deepcopy(self.tokenizer)
        return len(self._counting_tokenizer(prompt, add_special_tokens=False).input_ids)

    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        return self.facts.initial_latents(seeds, height, width).to(self.device, self.dtype)

    @torch.no_grad()
    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        rows: Sequence[Sequence[AdapterUse]],
    ) -> torch.Tensor:
        """One UNet call on m independent rows: latents [m, C, h, w], timesteps [m], embeds
        [m, L, D], rows: each row's adapters (the bank applies them to that row only). [m, C, h, w]."""
        flush_denormals()
        with self.adapters.activate(list(rows)):
            return self.unet_runtime(latents, timesteps, embeds)

    def predict_noise_cfg(
        self,
        latents: torch.Tensor,
        t: torch.Tensor | int,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        rows: Sequence[Sequence[AdapterUse]],
    ) -> torch.Tensor:
        """Guided noise for a hand-written loop: prompt_embeds is [uncond x n; cond x n]."""
        n = latents.shape[0]
        timesteps = torch.as_tensor(t, device=self.device).reshape(-1).expand(2 * n)
        noise = self.predict_noise(torch.cat([latents, latents]), timesteps, prompt_embeds, list(rows) + list(rows))
        return classifier_free_guidance(noise[:n], noise[n:], guidance_scale)

    @torch.no_grad()
    def decode_array(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 [n, H, W, 3] images of latents."""
        flush_denormals()
        scaling = self.vae.config.scaling_factor
        pixels = self.vae.decode(latents.to(self.device, self.vae_dtype) / scaling).sample
        pixels = (pixels / 2 + 0.5).clamp(0, 1)
        return (pixels.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self.decode_array(latents)]

    @torch.no_grad()
    def encode_image(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latent (mean of the posterior) of an RGB image, scaled like the UNet expects."""
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(self.device, self.vae_dtype)
        latent = self.vae.encode(pixels).latent_dist.mean
        return (latent * self.vae.config.scaling_factor).to(self.dtype)
