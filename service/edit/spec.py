"""What an edit is given, what it reports, and the model calls its loop yields.

The editors (service/edit/dds.py, service/edit/dreamsteerer.py) are generators in the style of
`service.engine.sampling.generation`: they yield each model call and are sent back its result, so
the in-process engine and the Triton `edit` model run the very same loop and differ only in how a
call executes. Besides the sampling loop's calls (`Encode`, `Denoise`, `Decode`) an edit yields

- `EncodeImage`: the source image's VAE latent (service.engine.sampling);
- `SubjectMask`, `GuidedSamples`, `SteeringInputs`, `Steer`: DreamSteerer's steps that need the
  model itself (its attention maps, its features, its gradients). They run on a private copy of
  the base model with the request's adapter applied (`service.edit.workbench.Workbench`), never
  on the serving UNet.
  `Steer` answers with an `AdapterUse` of the steered copy, which the executor has put into the
  adapter bank for this request only (see `service.adapters.AdapterManager.ephemeral`).

The editors know nothing of gRPC, jobs or Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from service.engine.sampling import AdapterUse

DDS = "DDS"
DREAMSTEERER = "DREAMSTEERER"
EDIT_METHODS = (DDS, DREAMSTEERER)


@dataclass(frozen=True)
class EditOptions:
    """Every setting of an edit. Defaults: the DDS notebook's settings scaled to our model, and
    DreamSteerer's parts as docs/edit/dreamsteerer.md reads them (measured on the world's held-out
    concepts: bench/quality_edit.py)."""

    # -- DDS (Hertz et al. 2023; google/prompt-to-prompt DDS_zeroshot.ipynb) ---------------------
    iterations: int = 200  # notebook: 200
    # Notebook: 7.5 in both branches, for SD 1.5. Our world model samples best at 4 (every quality
    # bench here uses 4); on 3-4 world sources DDS at 4 kept structure as well as at 7.5 and drew
    # the concept's colour more often (docs/edit/README.md). Pass 7.5 for SD checkpoints.
    guidance_scale: float = 4.0
    # Step on the latent per unit of the score delta. The notebook's SGD lr 0.1 on a loss scaled by
    # 2000 / (64 * 64) (its sum over SD's 64x64 latent): 0.1 * 2000 / 4096 = 0.049 per iteration.
    learning_rate: float = 0.05
    t_min: int = 50  # notebook: t uniform in [50, 950) of 1000 training steps
    t_max: int = 950
    # -- DreamSteerer (Yu et al., NeurIPS 2024); each part switchable for ablations -------------
    edsd: bool = True  # Editability Driven Score Distillation on a per-request adapter copy
    mode_shifting: bool = True  # denoising loss on spatial-feature-guided samples while steering
    bias_correction: bool = True  # DDS source branch from the pre-trained model, not the adapter
    use_subject_mask: bool = True  # DDS update only inside the concept token's attention mask
    steer_steps: int = 30  # adapter steering iterations
    steer_learning_rate: float = 0.0  # 0: the adapter method's default (workbench/steering.py: STEER_LR)
    preliminary_iterations: int = 40  # DDS iterations of the "slightly edited image" EDSD reads
    guided_samples: int = 2  # spatial-feature-guided samples for mode shifting
    # The samples' spatial guidance (plug-and-play injection of the source's features); off: the
    # same samples drawn from the inverted source without injection (the guidance's ablation).
    feature_injection: bool = True
    # Plug-and-play injection's schedule (workbench/guided.py): the share of the sampling steps that
    # take the source's decoder ResNet features, and the share that take its self-attention q/k.
    guided_feature_fraction: float = 0.8
    guided_attention_fraction: float = 0.5
    guided_steps: int = 20  # DDIM steps of the inversion and of each guided sample
    mode_shifting_weight: float = 1.0
    # Prompt-to-Prompt's local blend thresholds at 0.3 of the maximum; our maps are scaled between
    # their minimum and maximum, and 0.65 kept more background than 0.5 (docs/edit/dreamsteerer.md).
    mask_threshold: float = 0.65

    def replace(self, **changes) -> "EditOptions":
        return replace(self, **changes)


@dataclass
class EditSpec:
    method: str  # DDS or DREAMSTEERER
    source: np.ndarray  # uint8 [H, W, 3]; H and W multiples of the model's latent factor
    source_prompt: str
    target_prompt: str
    adapter: AdapterUse | None = None  # the user's personalized adapter (None: plain DDS, base model)
    adapter_method: str = ""  # DREAMBOOTH_LORA, TEXTUAL_INVERSION or CUSTOM_DIFFUSION
    token: str = ""  # the adapter's token, as in target_prompt
    class_word: str = ""
    seed: int = 0
    options: EditOptions = field(default_factory=EditOptions)
    # DDS: an image prompt (service.image_prompt.packing.ImagePrompt) on the target branch, or None.
    image_prompt: object | None = None

    @property
    def height(self) -> int:
        return int(self.source.shape[0])

    @property
    def width(self) -> int:
        return int(self.source.shape[1])


@dataclass
class Edited:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray | None  # float [H, W] in [0, 1], the subject mask used (None: none)
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    # What steering did (for tests and benchmarks): EDSD / mode-shifting loss per steering step.
    steer_losses: list[dict[str, float]] = field(default_factory=list)
    guided: np.ndarray | None = None  # the guided samples' latents [n, C, h, w]
    latent: np.ndarray | None = None  # the edited latent [C, h, w] (not sent over the wire)


class EditProgress(Protocol):
    def __call__(self, phase: str, step: int, total: int) -> None: ...


# Progress reports an edit hands on: at most one per this many seconds, and the last step of every
# phase always (EditStream's events, the Triton edit model's responses). Decided here only.
PROGRESS_EVERY_S = 0.2


def throttled(progress: EditProgress | None, every_s: float = PROGRESS_EVERY_S) -> EditProgress | None:
    """`progress`, called at most every `every_s` seconds (and at each phase's last step)."""
    if progress is None:
        return None
    import time

    last = [float("-inf")]

    def report(phase: str, step: int, total: int) -> None:
        now = time.monotonic()
        if step >= total or now - last[0] >= every_s:
            last[0] = now
            progress(phase, step, total)

    return report


class EditRefused(ValueError):
    """The request cannot be edited as asked (FAILED_PRECONDITION): e.g. the adapter has nothing to
    steer, or none of its concept's words occurs in the target prompt."""


def phases(spec: EditSpec) -> list[tuple[str, float]]:
    """The phases an edit will go through, each with its rough cost in UNet-row passes (a backward
    pass counted as two), for one progress figure over the whole edit."""
    o = spec.options
    if spec.method != DREAMSTEERER:
        return [("dds", 4.0 * o.iterations)]
    out = []
    if o.use_subject_mask:
        out.append(("mask", 3.0))
    guided = o.mode_shifting and o.guided_samples > 0
    preliminary = o.preliminary_iterations if o.edsd else 0
    # Side by side (SteeringInputs): "guided" while the guided samples' rows are in the calls (the
    # preliminary edit's rows with them), "preliminary" for the iterations left after.
    along = min(preliminary, 2 * o.guided_steps) if guided else 0
    if guided:
        out.append(("guided", o.guided_steps * (2.0 + 2 * o.guided_samples) + 4.0 * along))
    if preliminary > 0:
        out.append(("preliminary", 4.0 * (preliminary - along)))
    if o.edsd or guided:
        out.append(("steer", o.steer_steps * 3.0 * ((3 if o.edsd else 0) + (o.guided_samples if guided else 0))))
    out.append(("dds", 4.0 * o.iterations))
    return out


def overall_progress(plan: list[tuple[str, float]], phase: str, step: int, total: int) -> float:
    """0..1 over the whole edit, from the step within the current phase."""
    done, whole = 0.0, sum(cost for _, cost in plan) or 1.0
    for name, cost in plan:
        if name == phase:
            return min(1.0, (done + cost * step / max(1, total)) / whole)
        done += cost
    return min(1.0, done / whole)


# -- the model calls only an edit yields ----------------------------------------------------------


@dataclass(frozen=True)
class SubjectMask:
    """Where the adapter's concept words attend in the (noised) source latent: [h, w] in [0, 1]."""

    adapter: AdapterUse
    latent: torch.Tensor  # [1, C, h, w]
    prompt: str
    words: tuple[str, ...]  # the concept's words in `prompt` ("<sks>", "circle")
    threshold: float


@dataclass(frozen=True)
class GuidedSamples:
    """Latents [n, C, h, w] with the concept's appearance and the source's spatial structure."""

    adapter: AdapterUse
    latent: torch.Tensor  # the source latent [1, C, h, w]
    source_prompt: str
    prompt: str  # what the samples show ("a <sks> circle on a blue background")
    n: int
    steps: int
    guidance_scale: float
    seed: int
    inject: bool = True  # the source's features injected (plug-and-play); False: plain samples
    feature_fraction: float = 0.8  # share of the steps with the source's ResNet features injected
    attention_fraction: float = 0.5  # share of the steps with its self-attention queries and keys


@dataclass(frozen=True)
class PreliminaryEdit:
    """DreamSteerer's "slightly edited image": plain DDS from the source with the personalized
    adapter in both branches (service.edit.dds.dds_loop), its own seed."""

    iterations: int
    guidance_scale: float
    learning_rate: float
    t_min: int
    t_max: int
    seed: int


@dataclass(frozen=True)
class SteeringInputs:
    """What steering reads, made side by side: the guided samples (`guided`, as `GuidedSamples`
    makes them) and the preliminary edit (`preliminary`) of `latent` with the source and target
    prompts, each UNet call holding both's rows, on the workbench. Answered with (samples
    [n, C, h, w] or None, edited latent [1, C, h, w] or None)."""

    adapter: AdapterUse
    latent: torch.Tensor  # the source latent [1, C, h, w]
    source_prompt: str
    target_prompt: str
    guided: GuidedSamples | None
    preliminary: PreliminaryEdit | None


@dataclass(frozen=True)
class Steer:
    """EDSD (+ mode shifting) on a copy of the adapter's own trainable set; answered with an
    `AdapterUse` of the steered copy, resident in the bank for this request only, and the losses."""

    adapter: AdapterUse
    adapter_method: str
    source: torch.Tensor  # [1, C, h, w]
    edited: torch.Tensor | None  # the slightly edited latent [1, C, h, w] (None: no EDSD term)
    guided: torch.Tensor | None  # guided samples [n, C, h, w] (None: no mode shifting)
    source_prompt: str
    target_prompt: str
    options: EditOptions
    seed: int


WORKBENCH_CALLS = (SubjectMask, GuidedSamples, SteeringInputs, Steer)
