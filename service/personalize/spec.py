"""What a training job is given and what it reports: the contract between the methods and whoever
runs them (the in-process job runner, the Triton `personalize` model, a benchmark, a test).

The methods know nothing of gRPC, jobs or Triton: they get a `TrainingSpec` and a `Progress`, and
return an `Adapter`. Durability is the caller's: a method hands it a checkpoint (`bytes`) every
`checkpoint_every` steps and accepts one back to resume from.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image

DREAMBOOTH_LORA = "DREAMBOOTH_LORA"
TEXTUAL_INVERSION = "TEXTUAL_INVERSION"
CUSTOM_DIFFUSION = "CUSTOM_DIFFUSION"
FINESTYLE = "FINESTYLE"
SUBJECT_METHODS = (DREAMBOOTH_LORA, TEXTUAL_INVERSION, CUSTOM_DIFFUSION)
STYLE_METHODS = (FINESTYLE,)


@dataclass
class Concept:
    """A concept of a FineStyle style image: the phrase naming it ("a yellow star") and, when the
    caller knows it, its box in the image's pixels (x0, y0, x1, y1; x1/y1 exclusive)."""

    phrase: str
    box: tuple[int, int, int, int] | None = None


@dataclass
class TrainingSpec:
    method: str
    images: list[Image.Image]  # the subject photos (3-5) or the one style image, any size: resized and centre-cropped
    token: str  # the word that invokes the concept ("sks", or a placeholder such as "<sks>")
    class_word: str  # the subject's class ("dog"); prompts are "a <token> <class_word>"
    steps: int
    learning_rate: float
    rank: int
    batch_size: int
    seed: int = 0
    # Prior preservation (DreamBooth's class-specific prior): > 0 adds this weight times the loss on
    # the base model's own images of "a <class_word>"; 0 disables it.
    prior_loss_weight: float = 0.0
    num_class_images: int = 16
    train_text_encoder: bool = False  # DreamBooth-LoRA: LoRA on the text encoder's attention too
    checkpoint_every: int = 100  # steps between checkpoints handed to Progress.checkpoint
    # FineStyle: the style image's concepts and the words that name the style ("in zwx style").
    concepts: list[Concept] = field(default_factory=list)
    style_phrase: str = ""
    extra: dict = field(default_factory=dict)  # method-specific switches (see each method's module)

    @property
    def prompt(self) -> str:
        return concept_prompt(self.token, self.class_word)


def concept_prompt(token: str, class_word: str) -> str:
    """The prompt that names a learned subject: "a <token> <class_word>"."""
    return f"a {token} {class_word}".strip()


class Progress(Protocol):
    """How a method reports; every call happens on the training thread."""

    def step(self, step: int, total: int, loss: float) -> None:
        """After each optimisation step (1-based)."""

    def checkpoint(self, step: int, state: bytes) -> None:
        """A resumable state after `step` steps; keep the latest."""

    def should_stop(self) -> bool:
        """Checked before every step: True ends training with TrainingStopped (cancel, shutdown)."""

    # Optional: `step_turn() -> context manager` around every step, which may wait before entering
    # (training beside serving waits for serving's gaps: service/engine/priority.TurnTaking).


class TrainingStopped(Exception):
    """Training was told to stop (Progress.should_stop); nothing was produced."""


class NoProgress:
    """A Progress that reports nowhere and never stops (tests, benchmarks)."""

    def step(self, step, total, loss):
        pass

    def checkpoint(self, step, state):
        pass

    def should_stop(self):
        return False


# -- checkpoints ---------------------------------------------------------------------------------


def pack_checkpoint(step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> bytes:
    """The trainable tensors and the optimizer state after `step` steps, as bytes."""
    buffer = io.BytesIO()
    torch.save(
        {"step": step, "params": {k: v.detach().cpu() for k, v in params.items()}, "optimizer": optimizer.state_dict()},
        buffer,
    )
    return buffer.getvalue()


def unpack_checkpoint(data: bytes) -> dict:
    """The dict pack_checkpoint wrote. weights_only: a checkpoint is data, never code to run."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
