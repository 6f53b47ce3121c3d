"""The sampling loop, written once for every place that generates images.

`generation(spec, facts)` is the algorithm of text-to-image sampling as a generator: it *yields*
each model call (`Encode`, `Denoise`, `Decode`) and is sent back the result; everything else
(seeded noise, the request's sampler, classifier-free guidance, deadline checks, timings) it does
itself. Who runs it decides only how a model call executes:

- `run(loop, execute)`: each call in this thread (the in-process engine, which also serves the
  trainers' class images and previews);
- `await run_async(loop, execute)`: each call awaited (the Triton `edit` model, whose `Denoise`
  is a BLS call to the `unet` model that batches steps of many requests);
- `await StepBatcher.run(loop)` (service/engine/batching.py): Generate on both backends, the
  steps of every request in flight batched into shared UNet calls in one process.

So the two paths cannot drift apart: same numbers, same order, same checks. The time a call takes
is the time the generator is suspended at its `yield`, so timings are measured here too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Generator, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from . import samplers


# -- what a request asks for -------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterUse:
    """One adapter applied to one request, with its mixing weight.

    `style` marks a FineStyle adapter: with a request's style_guidance_scale > 0 it is applied only
    to the third, style-conditional prediction of each step (see `style_guidance`).
    """

    key: str
    weight: float = 1.0
    style: bool = False
    # The tenant whose adapter it is: the adapter bank's eviction is fair between tenants. "" when
    # unknown (tests, tools); never used to decide access (the gateway already has).
    tenant: str = ""


Rows = Sequence[Sequence[AdapterUse]]


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
    # > 0: FineStyle's two-scale guidance with the request's style adapters (0: ordinary CFG with
    # every adapter on both predictions).
    style_guidance_scale: float = 0.0
    # A name of samplers.SAMPLERS (diffusers' scheduler of that name); Karras sigmas where it applies.
    sampler: str = samplers.DEFAULT_SAMPLER
    karras_sigmas: bool = False
    # Reference photos' tokens and scale (service.image_prompt.packing.ImagePrompt), on every
    # prediction of every step; guidance's unconditional one gets the model's unconditional tokens.
    image_prompt: object | None = None

    @property
    def uses_style_guidance(self) -> bool:
        return self.style_guidance_scale > 0 and any(a.style for a in self.adapters)


class GenerationCancelled(Exception):
    """Raised between denoising steps when the caller's `should_stop` says so (deadline, cancel)."""


def noise_prediction(prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """The noise a UNet prediction implies at x_t (cumulative alpha `alpha_bar`): itself for an
    epsilon model, from the velocity for a v-prediction one (SD 2.x 768):
    eps = sqrt(abar) v + sqrt(1 - abar) x_t. Score-distillation methods (DDS, DreamSteerer) are
    written for noise predictions; this is their one conversion."""
    if prediction_type != "v_prediction":
        return prediction
    alpha = torch.as_tensor(alpha_bar).to(x_t)
    return alpha.sqrt() * prediction + (1 - alpha).sqrt() * x_t


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Moves the unconditional prediction toward the prompt's by `scale` (1 = no guidance)."""
    return uncond + scale * (cond - uncond)


def style_guidance(
    uncond: torch.Tensor, cond: torch.Tensor, styled: torch.Tensor, guidance_scale: float, style_scale: float
) -> torch.Tensor:
    """FineStyle's / StyleDrop's two-scale guidance from three predictions of one step:

        eps = eps(c, style) + l1 * (eps(c, style) - eps(c)) + l2 * (eps(c) - eps(uncond))

    uncond and cond are the model without the style adapter, styled the conditional one with it.
    l1 = style_scale pushes along the style adapter's direction (more style, and more of the style
    image's content); l2 = guidance_scale - 1 pushes along the prompt's direction as the base model
    reads it (follows the prompt, leaks less). With l2 = g - 1, a request without a style adapter
    (styled == cond) gets exactly ordinary CFG at scale g.
    """
    return styled + style_scale * (styled - cond) + (guidance_scale - 1.0) * (cond - uncond)


# -- what the loop needs of the model without its weights ---------------------------------------


@dataclass(frozen=True)
class ModelLimits:
    """Image-size facts of the loaded model that request validation needs."""

    vae_scale_factor: int
    default_size: int  # the resolution the model was trained at


@dataclass(frozen=True)
class ModelFacts:
    """The schedule and latent geometry of a model: all the loop itself computes with."""

    name: str
    scheduler_config: dict
    latent_channels: int
    limits: ModelLimits

    @classmethod
    def from_configs(cls, name: str, unet_config, vae_config, scheduler_config) -> "ModelFacts":
        vsf = 2 ** (len(vae_config["block_out_channels"]) - 1)
        return cls(
            name=name,
            scheduler_config=dict(scheduler_config),
            latent_channels=int(unet_config["in_channels"]),
            limits=ModelLimits(vae_scale_factor=vsf, default_size=int(unet_config["sample_size"]) * vsf),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelFacts":
        """From a diffusers folder's configs alone (the gateway and the Triton orchestrator); a
        folder of an architecture not served raises families.UnsupportedModel."""
        from .families import detect

        model_dir = Path(model_dir)
        detect(model_dir)
        kw = dict(local_files_only=True)
        return cls.from_configs(
            model_dir.name,
            UNet2DConditionModel.load_config(model_dir / "unet", **kw),
            AutoencoderKL.load_config(model_dir / "vae", **kw),
            ddim_config(DDIMScheduler.load_config(model_dir / "scheduler", **kw)),
        )

    def new_scheduler(self, steps: int, device: torch.device | str = "cpu", sampler: str = samplers.DEFAULT_SAMPLER,
                      karras_sigmas: bool = False):
        """A fresh scheduler per request (set_timesteps mutates it, so it must not be shared): DDIM
        unless a sampler is named (samplers.SAMPLERS)."""
        return samplers.new_scheduler(sampler, self.scheduler_config, steps, karras_sigmas, device)

    def initial_latents(self, seeds: Sequence[int | torch.Generator], height: int, width: int) -> torch.Tensor:
        """Per-image seeded noise on the CPU in float32, so image i of a request equals a one-image
        request with seed + i on any device (unit variance: the loop scales it by the sampler's
        initial sigma). A seed may be given as its generator, which then goes on to draw that
        image's noise of a stochastic sampler's steps."""
        vsf = self.limits.vae_scale_factor
        shape = (self.latent_channels, height // vsf, width // vsf)
        return torch.stack([torch.randn(shape, generator=seeded(s), dtype=torch.float32) for s in seeds])


def seeded(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator("cpu").manual_seed(int(seed))


def ddim_config(scheduler_config) -> dict:
    """DDIM with the checkpoint's beta schedule. SD checkpoints ship PNDM and others; DDIM reads the
    same betas. steps_offset=1 matches SD's training timesteps (and silences diffusers' warning)."""
    return dict(DDIMScheduler.from_config(scheduler_config, steps_offset=1, clip_sample=False).config)


# -- the model calls the loop yields ------------------------------------------------------------


@dataclass(frozen=True)
class Encode:
    """Prompt embeddings [len(prompts), L, D], row i with the adapters of rows[i], for images of
    `size` (h, w): SDXL's conditioning carries it (None: the model's own size)."""

    prompts: list[str]
    rows: list[tuple[AdapterUse, ...]]
    size: tuple[int, int] | None = None
    # Per prompt, an image prompt (service.image_prompt.packing.ImagePrompt) or None; None for all:
    # no request in this call has one.
    image_prompts: list | None = None


@dataclass(frozen=True)
class Denoise:
    """One UNet call on m independent predictions: row i predicts the noise of latents[i] at
    timesteps[i] given embeds[i], with the adapters rows[i].

    latents [m, C, h, w]; timesteps [m]; embeds [m, L, D]; rows: m tuples of adapters. Answered with
    a `StepResult` whose noise is [m, C, h, w]. A loop puts every prediction one step needs into one
    Denoise (CFG's unconditional and conditional rows; FineStyle's third, styled row; an edit's
    source and target rows), so they share one UNet call, and the Triton `unet` model batches the
    rows of many requests together whatever each loop's mix.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    rows: list[tuple[AdapterUse, ...]]


@dataclass(frozen=True)
class StepResult:
    noise: torch.Tensor  # [m, C, h, w]
    batch_size: int  # rows in the UNet call this step ran in (other requests' included)
    compute_seconds: float  # the UNet call's own time (the rest of the round trip was waiting)


@dataclass(frozen=True)
class EncodeImage:
    """The VAE latent [1, C, h, w] (posterior mean, scaled for the UNet) of a uint8 [H, W, 3] image
    (an edit's source)."""

    image: np.ndarray


@dataclass(frozen=True)
class Decode:
    """Images of latents: uint8 [n, H, W, 3]."""

    latents: torch.Tensor


@dataclass(frozen=True)
class StepInfo:
    """What one denoising step looked like from a request: the batch it shared and its wait."""

    step: int
    total: int
    batch_size: int
    queue_seconds: float  # round trip minus the UNet call's own compute time


@dataclass
class Generated:
    images: np.ndarray  # [n, H, W, 3] uint8
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    steps: list[StepInfo] = field(default_factory=list)


ModelCall = Encode | Denoise | Decode | EncodeImage
Loop = Generator[ModelCall, Any, Generated]


# -- the algorithm --------------------------------------------------------------------------------


def generation(
    spec: GenerationSpec,
    facts: ModelFacts,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[StepInfo], None] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Loop:
    """Text to image: encode, the request's sampler with classifier-free guidance (or FineStyle's
    two-scale guidance), decode. Yields each model call."""
    t_start = time.perf_counter()
    n = spec.num_images
    seeds = [spec.seed + i for i in range(n)]
    adapters = tuple(spec.adapters)

    # The predictions of every step, each a (prompt, adapters) pair for all n samples:
    #   CFG:       (negative, adapters), (prompt, adapters)
    #   FineStyle: (negative, without style), (prompt, without style), (prompt, all adapters)
    #   guidance 1: (prompt, adapters) alone: CFG at scale 1 IS the conditional prediction (what
    #              few-step LCM sampling runs at), so the unconditional row would be wasted work.
    if spec.uses_style_guidance:
        plain = tuple(a for a in adapters if not a.style)
        predictions = [(spec.negative_prompt, plain), (spec.prompt, plain), (spec.prompt, adapters)]
    elif spec.guidance_scale == 1.0:
        predictions = [(spec.prompt, adapters)]
    else:
        predictions = [(spec.negative_prompt, adapters), (spec.prompt, adapters)]
    k = len(predictions)
    rows = [use for _, use in predictions for _ in range(n)]  # prediction-major: [k * n]

    # 1. Text: every prediction's prompt for every sample, each row with its adapters (learned tokens).
    t0 = time.perf_counter()
    image_prompts = None
    if spec.image_prompt is not None:  # the first of two or three predictions is the unconditional one
        per_prediction = [spec.image_prompt.unconditional() if k > 1 and j == 0 else spec.image_prompt for j in range(k)]
        image_prompts = [p for p in per_prediction for _ in range(n)]
    embeds = yield Encode([prompt for prompt, _ in predictions for _ in range(n)], rows, (spec.height, spec.width),
                          image_prompts)
    t_text = time.perf_counter() - t0

    # 2. Denoise from per-image seeded noise, as diffusers' pipelines drive a scheduler: noise
    # scaled by its initial sigma, the UNet's input by scale_model_input, each image's step noise
    # (ancestral, SDE, LCM) from its own seed's generator, so a request reproduces and image i
    # equals a one-image request with seed + i. A row carries its own timestep (a float for the
    # sigma-based samplers), so steps of requests with any samplers share one UNet call.
    t0 = time.perf_counter()
    generators = [seeded(s) for s in seeds]
    scheduler = facts.new_scheduler(spec.steps, device, spec.sampler, spec.karras_sigmas)
    latents = facts.initial_latents(generators, spec.height, spec.width).to(device, dtype) * scheduler.init_noise_sigma
    step_kwargs = {"generator": generators} if samplers.get(spec.sampler).stochastic else {}
    steps: list[StepInfo] = []
    for i, t in enumerate(scheduler.timesteps):
        if should_stop():
            raise GenerationCancelled(f"stopped before step {i + 1} of {spec.steps}")
        sent = time.perf_counter()
        model_input = scheduler.scale_model_input(latents, t)
        result: StepResult = yield Denoise(model_input.repeat(k, 1, 1, 1),
                                           t.reshape(1).to(torch.float32).expand(k * n), embeds, rows)
        round_trip = time.perf_counter() - sent
        noise = result.noise.reshape(k, n, *result.noise.shape[1:])
        if k == 3:
            guided = style_guidance(noise[0], noise[1], noise[2], spec.guidance_scale, spec.style_guidance_scale)
        elif k == 2:
            guided = classifier_free_guidance(noise[0], noise[1], spec.guidance_scale)
        else:
            guided = noise[0]
        latents = scheduler.step(guided, t, latents, **step_kwargs).prev_sample
        info = StepInfo(i + 1, spec.steps, result.batch_size, max(0.0, round_trip - result.compute_seconds))
        steps.append(info)
        if on_step is not None:
            on_step(info)
    t_denoise = time.perf_counter() - t0

    # 3. Decode.
    t0 = time.perf_counter()
    images = yield Decode(latents)
    t_decode = time.perf_counter() - t0
    return Generated(
        images=images,
        seeds=seeds,
        timings=dict(
            text_encode_seconds=t_text,
            denoise_seconds=t_denoise,
            decode_seconds=t_decode,
            total_seconds=time.perf_counter() - t_start,
        ),
        steps=steps,
    )


# -- the two ways to run it -----------------------------------------------------------------------


def run(loop: Generator[ModelCall, Any, Any], execute: Callable[[ModelCall], Any]):
    """Runs a loop with each model call executed synchronously; returns the loop's result."""
    try:
        call = next(loop)
        while True:
            call = loop.send(execute(call))
    except StopIteration as done:
        return done.value


async def run_async(loop: Generator[ModelCall, Any, Any], execute: Callable[[ModelCall], Awaitable[Any]]):
    """Runs a loop with each model call awaited; returns the loop's result."""
    try:
        call = next(loop)
        while True:
            call = loop.send(await execute(call))
    except StopIteration as done:
        return done.value


class SideBySide:
    """Several loops driven together, one call of each at a time: `pending` holds each unfinished
    loop's current call (by index), `results` each finished loop's value. Whoever drives them
    decides how a round's calls execute (run_together here; the edit workbench's shared calls)."""

    def __init__(self, loops: Sequence[Generator]):
        self.loops = list(loops)
        self.pending: dict[int, Any] = {}
        self.results: list[Any] = [None] * len(self.loops)
        for i in range(len(self.loops)):
            self._step(i, lambda loop: next(loop))

    def advance(self, i: int, answer) -> None:
        """Sends loop i the answer to its pending call."""
        self._step(i, lambda loop: loop.send(answer))

    def _step(self, i: int, resume) -> None:
        try:
            self.pending[i] = resume(self.loops[i])
        except StopIteration as done:
            self.pending.pop(i, None)
            self.results[i] = done.value


def run_together(loops: Sequence[Generator[ModelCall, Any, Any]], execute: Callable[[ModelCall], Any]) -> list:
    """Runs several loops side by side, as the Triton `unet` model batches requests: each round,
    the loops' pending `Denoise` calls become ONE UNet call (rows concatenated, answers split back),
    every other call runs on its own. Returns each loop's result, in order. Loops of any mix (and
    length) may run together; a loop that finishes early simply leaves the batch."""
    together = SideBySide(loops)
    pending, advance = together.pending, together.advance
    while pending:
        denoise = {i: c for i, c in pending.items() if isinstance(c, Denoise)}
        others = {i: c for i, c in pending.items() if not isinstance(c, Denoise)}
        for i, call in others.items():
            advance(i, execute(call))
        if not denoise:
            continue
        order = list(denoise)
        calls = [denoise[i] for i in order]
        merged = Denoise(torch.cat([c.latents for c in calls]), torch.cat([c.timesteps for c in calls]),
                         torch.cat([c.embeds for c in calls]), [r for c in calls for r in c.rows])
        out = execute(merged)
        start = 0
        for i, call in zip(order, calls):
            m = call.latents.shape[0]
            advance(i, StepResult(out.noise[start : start + m], out.batch_size, out.compute_seconds))
            start += m
    return together.results
