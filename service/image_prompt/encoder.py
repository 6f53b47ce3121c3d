"""The image encoder of an IP-Adapter: a CLIP vision model from a local folder, with the
preprocessing diffusers' `load_ip_adapter` gives it (CLIPImageProcessor at the model's image size:
shortest side resized (bicubic), centre crop, CLIP's mean/std), and what the projection reads of it:
the projected image embedding (base layout) or the penultimate hidden states (plus layout).

Classifier-free guidance's unconditional side is what diffusers' pipelines use: zeros in place of
the image embedding (base), the encoder's states of an all-zero image (plus).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from service.engine.construction import MODULE_CONSTRUCTION


class ImageEncoder:
    def __init__(self, model, processor):
        self.model, self.processor = model.eval().requires_grad_(False), processor

    @classmethod
    def from_folder(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "ImageEncoder":
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        with MODULE_CONSTRUCTION:  # from_pretrained patches process-wide functions while it runs
            model = CLIPVisionModelWithProjection.from_pretrained(Path(path), local_files_only=True, dtype=dtype)
        size = model.config.image_size
        return cls(model.to(device), CLIPImageProcessor(size=size, crop_size=size))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor([image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        return pixels.to(self.device, next(self.model.parameters()).dtype)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings of the images, the unconditional ones), one per image: [n, E] for the base
        projection, [n, S, E] for the plus one."""
        pixels = self.pixels(images)
        if kind == "base":
            embeds = self.model(pixels).image_embeds
            return embeds, torch.zeros_like(embeds)
        if kind == "plus":
            states = self.model(pixels, output_hidden_states=True).hidden_states[-2]
            return states, self.model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        raise ValueError(f"unknown image projection kind {kind!r}")
