"""An IP-Adapter served on an engine: its decoupled cross-attention installed on the engine's UNet,
its image encoder and projection turning photos into an ImagePrompt, and the packing every encoded
prompt then goes through (`engine.image_prompts.pack`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from . import files
from .encoder import ImageEncoder
from .packing import ImagePrompt, ImagePromptLayout

MAX_IMAGES = 5  # reference photos one image prompt takes


class ServedImagePrompts:
    def __init__(self, engine, adapter: files.IPAdapter, encoder: ImageEncoder | None, max_images: int = MAX_IMAGES):
        self.adapter, self.encoder, self.max_images = adapter, encoder, max_images
        self.family = engine.family
        self.layout = ImagePromptLayout(text_tokens=engine.family.text_tokens, max_tokens=adapter.tokens * max_images)
        self.dtype, self.device = engine.dtype, engine.device
        files.install(engine.unet, adapter, self.layout)
        engine.image_prompts = self

    @classmethod
    def from_files(cls, engine, adapter_file: str | Path, encoder_folder: str | Path | None,
                   max_images: int = MAX_IMAGES) -> "ServedImagePrompts":
        encoder = ImageEncoder.from_folder(encoder_folder, engine.device) if encoder_folder is not None else None
        return cls(engine, files.load(adapter_file, engine.unet), encoder, max_images)

    @torch.no_grad()
    def prompt(self, images: Sequence[Image.Image], scale: float = 1.0) -> ImagePrompt:
        """An image prompt of 1..max_images photos."""
        if not 1 <= len(images) <= self.max_images:
            raise ValueError(f"an image prompt takes 1 to {self.max_images} images, got {len(images)}")
        if self.encoder is None:
            raise ValueError("no image encoder is loaded for this IP-Adapter")
        positive, negative = self.encoder.embed(images, self.adapter.kind)
        return ImagePrompt(self.tokens(positive), self.tokens(negative), scale)

    def tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """[n x T, D] of n photos' embeddings (their tokens side by side, as diffusers puts them)."""
        projection = self.adapter.projection.to(self.device)
        return projection(embeds.to(self.device, next(projection.parameters()).dtype)).flatten(0, 1).to(self.dtype)

    def pack(self, embeds: torch.Tensor, image_prompts: Sequence[ImagePrompt | None]) -> torch.Tensor:
        return self.layout.pack_rows(embeds, image_prompts, trailing=self.family.added_tokens)
