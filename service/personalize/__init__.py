"""Personalization: learn a user's concept as a small adapter on the frozen base model.

One module per method, each reading top to bottom as its algorithm:

- dreambooth_lora:     LoRA on the UNet's attention (+ text encoder), rare token, prior preservation
- textual_inversion:   one new token embedding, nothing else
- custom_diffusion:    cross-attention K/V (as LoRA) + a new token, scale augmentation, masked loss
- finestyle:           a style from ONE image: concept-oriented data scaling, LoRA on attn2 K/V,
                       a style adapter for two-scale guidance at sampling

The methods know nothing of gRPC, jobs or Triton. Whoever runs one (service/jobs through a backend,
the Triton `personalize` model, benchmarks, tests) calls

    adapter = train(base, spec, progress, resume=None)

with a FrozenBase (the base model, private to the training worker), a TrainingSpec, and a Progress
that receives steps, losses and checkpoints (spec.py). The result is an `Adapter` in the adapter
store's format: the adapter bank serves it as soon as it is stored.
"""

from __future__ import annotations

from types import ModuleType

from service.adapters import Adapter

from . import custom_diffusion, dreambooth_lora, finestyle, textual_inversion
from .common import FrozenBase
from .spec import (
    CUSTOM_DIFFUSION,
    DREAMBOOTH_LORA,
    FINESTYLE,
    STYLE_METHODS,
    SUBJECT_METHODS,
    TEXTUAL_INVERSION,
    Concept,
    MethodDefaults,
    NoProgress,
    Progress,
    TrainingSpec,
    TrainingStopped,
    concept_prompt,
)

METHODS: dict[str, ModuleType] = {
    DREAMBOOTH_LORA: dreambooth_lora,
    TEXTUAL_INVERSION: textual_inversion,
    CUSTOM_DIFFUSION: custom_diffusion,
    FINESTYLE: finestyle,
}


def defaults(method: str) -> MethodDefaults:
    if method not in METHODS:
        raise ValueError(f"unknown personalization method {method!r}; one of {', '.join(METHODS)}")
    return METHODS[method].DEFAULTS


def train(base: FrozenBase, spec: TrainingSpec, progress: Progress = NoProgress(), resume: bytes | None = None) -> Adapter:
    """Runs spec.method on `base` (one job at a time per base) and returns the adapter."""
    method = METHODS.get(spec.method)
    if method is None:
        raise ValueError(f"unknown personalization method {spec.method!r}; one of {', '.join(METHODS)}")
    with base.lock:
        return method.train(base, spec, progress, resume)


__all__ = [
    "CUSTOM_DIFFUSION", "DREAMBOOTH_LORA", "FINESTYLE", "METHODS", "STYLE_METHODS", "SUBJECT_METHODS",
    "TEXTUAL_INVERSION", "Concept", "FrozenBase", "MethodDefaults", "NoProgress", "Progress", "TrainingSpec", "TrainingStopped",
    "concept_prompt", "defaults", "train",
]
