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
from service.profiles import EMBEDDED, ModelProfile, TrainingDefaults

from . import custom_diffusion, dreambooth_lora, finestyle, lora, textual_inversion
from .common import FrozenBase
from .spec import (
    CUSTOM_DIFFUSION,
    DREAMBOOTH_LORA,
    FINESTYLE,
    STYLE_METHODS,
    SUBJECT_METHODS,
    TEXTUAL_INVERSION,
    Concept,
    NoProgress,
    Progress,
    TrainingSpec,
    TrainingStopped,
    concept_prompt,
    unpack_checkpoint,
)

METHODS: dict[str, ModuleType] = {
    DREAMBOOTH_LORA: dreambooth_lora,
    TEXTUAL_INVERSION: textual_inversion,
    CUSTOM_DIFFUSION: custom_diffusion,
    FINESTYLE: finestyle,
}


def defaults(method: str, profile: ModelProfile = EMBEDDED) -> TrainingDefaults:
    """The method's training defaults in a model profile (by default the embedded model's): they
    belong to the base model, not to the method (service/profiles.py)."""
    if method not in METHODS:
        raise ValueError(f"unknown personalization method {method!r}; one of {', '.join(METHODS)}")
    return profile.training_defaults(method)


def learns_token(method: str) -> bool:
    """Whether the method learns a new placeholder word (its token is then "<...>")."""
    if method not in METHODS:
        raise ValueError(f"unknown personalization method {method!r}; one of {', '.join(METHODS)}")
    return METHODS[method].LEARNS_TOKEN


def train(base: FrozenBase, spec: TrainingSpec, progress: Progress = NoProgress(), resume: bytes | None = None) -> Adapter:
    """Runs spec.method on `base` (one job at a time per base) and returns the adapter."""
    method = METHODS.get(spec.method)
    if method is None:
        raise ValueError(f"unknown personalization method {spec.method!r}; one of {', '.join(METHODS)}")
    with base.lock:
        return method.train(base, spec, progress, resume)


def adapter_from_checkpoint(spec: TrainingSpec, state: bytes) -> Adapter:
    """The adapter a job would have returned had it ended at a checkpoint's step: what the methods
    return, built from the checkpoint's trainable tensors (LoRA pairs under their layer names, the
    learned token as "token"). A sweep over step counts trains once and reads each count here."""
    params = dict(unpack_checkpoint(state)["params"])
    token = params.pop("token", None)
    return Adapter(
        lora=lora.modules_from_parameters(params, alpha=spec.rank),
        token_embeddings={spec.token: token.clone()} if token is not None else {},
        kind="style" if spec.method in STYLE_METHODS else "subject",
    )


__all__ = [
    "CUSTOM_DIFFUSION", "DREAMBOOTH_LORA", "FINESTYLE", "METHODS", "STYLE_METHODS", "SUBJECT_METHODS",
    "TEXTUAL_INVERSION", "Concept", "adapter_from_checkpoint", "FrozenBase", "TrainingDefaults", "NoProgress", "Progress", "TrainingSpec", "TrainingStopped",
    "concept_prompt", "defaults", "learns_token", "train",
]
