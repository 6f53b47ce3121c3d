"""Stable Diffusion XL (base and its fine-tunes), as diffusers' `StableDiffusionXLPipeline` runs it.

- Two text encoders: CLIP ViT-L (`text_encoder`) and OpenCLIP ViT-bigG with projection
  (`text_encoder_2`), each with its own tokenizer. The token conditioning is both encoders'
  penultimate hidden states concatenated ([B, 77, 768 + 1280]); the pooled conditioning is
  `text_encoder_2`'s projected `text_embeds` ([B, 1280]).
- `time_ids`: (original height, width, crop top, left, target height, width); for generation
  (h, w, 0, 0, h, w), diffusers' defaults; trainers pass their images' own.
- The VAE runs in float32 when the engine runs float16 (`force_upcast`, as diffusers does).
- `force_zeros_for_empty_prompt` (model_index.json, true for SDXL base): an empty prompt's
  conditioning, token states and pooled alike, is zeros; diffusers does so when no negative prompt
  is given, which for us is the empty negative prompt (a Generate prompt cannot be empty).

The pooled embedding and time_ids ride in trailing tokens of `embeds` (see base): flattened
[pooled, time_ids], zero-padded to whole D-wide tokens; a forward pre-hook on the UNet unpacks them
into diffusers' `added_cond_kwargs`. So Denoise rows, the wire, the step batcher, the compiled
runtimes and the trainers carry SDXL's conditioning per row without knowing it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch

from .base import ModelFamily, TextTower, _cross_width, added_tokens_for


@dataclass(frozen=True)
class SDXL(ModelFamily):
    name: ClassVar[str] = "sdxl"
    title: ClassVar[str] = "Stable Diffusion XL"
    towers: ClassVar[tuple[TextTower, ...]] = (
        TextTower("tokenizer", "text_encoder"), TextTower("tokenizer_2", "text_encoder_2"))

    text_width: int = 2048
    text_tokens: int = 77
    pooled_width: int = 1280  # text_encoder_2's projection_dim
    time_ids: int = 6
    force_zeros_for_empty_prompt: bool = True

    @classmethod
    def matches(cls, index: Mapping, unet: Mapping) -> bool:
        return unet.get("addition_embed_type") == "text_time" and "text_encoder_2" in index

    @classmethod
    def from_configs(cls, index: Mapping, unet: Mapping, text_tokens: int = 77) -> "SDXL":
        # The refiner: no first text encoder and 5 time ids (an aesthetic score for the target
        # size), conditioning this family does not produce.
        first = index.get("text_encoder")
        if index.get("requires_aesthetics_score") or (isinstance(first, list) and first[0] is None):
            raise ValueError("it is an SDXL refiner (no first text encoder, an aesthetic-score time id), which is not served")
        time_width = int(unet["addition_time_embed_dim"])
        total = int(unet["projection_class_embeddings_input_dim"])
        # projection_class_embeddings_input_dim = pooled width + time_ids x addition_time_embed_dim
        # (2816 = 1280 + 6 x 256 for SDXL base); `detect` checks the pooled width against
        # text_encoder_2's projection_dim, so another time-id count cannot pass unnoticed.
        pooled = total - 6 * time_width
        if pooled <= 0:
            raise ValueError(f"its UNet's added conditioning ({total} wide) does not take 6 time ids")
        return cls(
            text_width=_cross_width(unet), text_tokens=text_tokens, pooled_width=pooled,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )

    @property
    def added_tokens(self) -> int:
        return added_tokens_for(self.pooled_width + self.time_ids, self.text_width)

    def encode_tower(self, encoder: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = encoder(ids, output_hidden_states=True)
        # Only the projection model's first output is 2-D: the pooled embedding (diffusers' test).
        return out.hidden_states[-2], (out[0] if out[0].ndim == 2 else None)

    def conditioning(
        self, states: Sequence[torch.Tensor], pooled: torch.Tensor | None, prompts: Sequence[str],
        size: tuple[int, int],
    ) -> torch.Tensor:
        tokens = torch.cat(list(states), dim=-1)
        if pooled is None:
            raise ValueError("SDXL conditioning needs text_encoder_2's pooled embedding")
        if self.force_zeros_for_empty_prompt:
            keep = torch.tensor([bool(p) for p in prompts], device=tokens.device).to(tokens.dtype)
            tokens = tokens * keep[:, None, None]
            pooled = pooled * keep[:, None]
        h, w = size
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=tokens.device, dtype=tokens.dtype).expand(len(prompts), -1)
        return self.pack(tokens, pooled, time_ids)

    def pack(self, tokens: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """embeds [B, 77 + k, D] of token states [B, 77, D], pooled [B, P] and time_ids [B, 6]."""
        b, _, d = tokens.shape
        extra = tokens.new_zeros(b, self.added_tokens * d)
        extra[:, : self.pooled_width] = pooled.to(tokens.dtype)
        extra[:, self.pooled_width : self.pooled_width + self.time_ids] = time_ids.to(tokens.dtype)
        return torch.cat([tokens, extra.view(b, self.added_tokens, d)], dim=1)

    def unpack(self, embeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(token states, diffusers' added_cond_kwargs) of packed embeds."""
        k = self.added_tokens
        flat = embeds[:, -k:].reshape(embeds.shape[0], -1)
        p = self.pooled_width
        return embeds[:, :-k], {"text_embeds": flat[:, :p], "time_ids": flat[:, p : p + self.time_ids]}

    def with_time_ids(self, embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """embeds with other time_ids [B, 6] (a trainer's images' sizes and crops)."""
        tokens, added = self.unpack(embeds)
        return self.pack(tokens, added["text_embeds"], time_ids.to(embeds).expand(embeds.shape[0], -1))

    def vae_dtype(self, vae_config: Mapping, dtype: torch.dtype) -> torch.dtype:
        # SDXL's VAE overflows in float16 (its config says force_upcast): StableDiffusionXLPipeline
        # runs it in float32, and so do we; the UNet and text encoders keep the engine's dtype.
        if dtype == torch.float16 and vae_config.get("force_upcast", True):
            return torch.float32
        return dtype

    def install(self, unet: torch.nn.Module) -> None:
        if getattr(unet, "_steerserve_family", None) == self:
            return
        family = self

        def unpack_added(module, args, kwargs):
            if kwargs.get("added_cond_kwargs") is not None:
                return None  # called diffusers' way (the equality tests' reference does)
            if "encoder_hidden_states" in kwargs:
                embeds = kwargs["encoder_hidden_states"]
            else:
                embeds, args = args[2], args[:2]
            tokens, added = family.unpack(embeds)
            return args, {**kwargs, "encoder_hidden_states": tokens, "added_cond_kwargs": added}

        unet.register_forward_pre_hook(unpack_added, with_kwargs=True)
        unet._steerserve_family = self
