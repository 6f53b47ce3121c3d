"""What a Stable Diffusion generation is, as far as serving it differs from another one.

A family says how prompts become the UNet's conditioning (which text encoders, which hidden state,
what added conditioning) and which folders it is. Everything else (the sampling loop, DDS, the
trainers, the adapter bank, the step batcher, the wire) is written once and carries the
conditioning as one tensor per row, `embeds` [rows, L, D]: a family whose UNet takes more than the
token states (SDXL's pooled text embedding and size `time_ids`) packs it into trailing tokens of
that tensor (`pack`) and unpacks it on the UNet's way in (`install`), so no other module knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch


class UnsupportedModel(ValueError):
    """A model folder of an architecture SteerServe does not serve (said at start, in one line)."""


@dataclass(frozen=True)
class TextTower:
    """One tokenizer + text encoder pair of a model folder, by their subfolder names."""

    tokenizer: str
    text_encoder: str


@dataclass(frozen=True)
class ModelFamily:
    """Stable Diffusion 1.x's way, the default: one CLIP text encoder, its last hidden state (after
    the final layer norm) is the cross-attention conditioning, nothing added."""

    name: ClassVar[str] = "sd1"
    title: ClassVar[str] = "Stable Diffusion 1.x"
    towers: ClassVar[tuple[TextTower, ...]] = (TextTower("tokenizer", "text_encoder"),)
    # Each family's `matches` is asked in FAMILIES' order; the first that says yes serves the folder.

    text_width: int = 768  # the UNet's cross_attention_dim: D of embeds
    text_tokens: int = 77  # the tokenizer's model_max_length

    @classmethod
    def matches(cls, index: Mapping, unet: Mapping) -> bool:
        return "text_encoder_2" not in index and not unet.get("addition_embed_type") and _cross_width(unet) != 1024

    @classmethod
    def from_configs(cls, index: Mapping, unet: Mapping, text_tokens: int = 77) -> "ModelFamily":
        return cls(text_width=_cross_width(unet), text_tokens=text_tokens)

    # -- prompts -> conditioning -----------------------------------------------------------------

    @property
    def added_tokens(self) -> int:
        """Trailing tokens of `embeds` that carry added conditioning (0: none)."""
        return 0

    @property
    def text_length(self) -> int:
        """L of `embeds` [rows, L, D]."""
        return self.text_tokens + self.added_tokens

    def encode_tower(self, encoder: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One text encoder's token states [B, 77, d] and pooled embedding (None: not used)."""
        return encoder(ids)[0], None

    def conditioning(
        self, states: Sequence[torch.Tensor], pooled: torch.Tensor | None, prompts: Sequence[str],
        size: tuple[int, int],
    ) -> torch.Tensor:
        """`embeds` [B, L, D] of the towers' outputs for prompts to be drawn at size (h, w)."""
        return states[0]

    def vae_dtype(self, vae_config: Mapping, dtype: torch.dtype) -> torch.dtype:
        """The dtype the VAE runs in (the engine's; SDXL's overflows in float16)."""
        return dtype

    def install(self, unet: torch.nn.Module) -> None:
        """Makes `unet(x, t, encoder_hidden_states=embeds)` take this family's `embeds` as they are."""
        return None


def _cross_width(unet: Mapping) -> int:
    width = unet.get("cross_attention_dim", 768)
    return int(width[0] if isinstance(width, (list, tuple)) else width)


def added_tokens_for(width: int, text_width: int) -> int:
    return math.ceil(width / text_width) if width else 0
