"""Stable Diffusion 2.x: OpenCLIP ViT-H (1024-wide conditioning), 768 px, v-prediction at 768.

Its conditioning is built like SD 1.x's (diffusers' SD 2 text encoder folder already leaves out
the last layer, which is how SD 2 uses the penultimate state). v-prediction comes from the
scheduler's `prediction_type`, which the sampling loop and DDS read (sampling.noise_prediction)."""

from __future__ import annotations

from typing import ClassVar, Mapping

from .base import ModelFamily, _cross_width


class SD2(ModelFamily):
    name: ClassVar[str] = "sd2"
    title: ClassVar[str] = "Stable Diffusion 2.x"

    @classmethod
    def matches(cls, index: Mapping, unet: Mapping) -> bool:
        return "text_encoder_2" not in index and not unet.get("addition_embed_type") and _cross_width(unet) == 1024
