"""An IP-Adapter served: photos turned into an ImagePrompt (ImagePromptEncoder: the image encoder
and the file's projection, which need no UNet, so a gateway in front of Triton encodes photos
itself), and the model side (ServedImagePrompts: the decoupled cross-attention installed on an
engine's UNet, and the packing every encoded prompt then goes through, `engine.image_prompts.pack`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from . import files
from .encoder import ImageEncoder
from .packing import ImagePrompt, ImagePromptLayout

MAX_IMAGES = 5  # reference photos one image prompt takes


def identity(adapter_file: str | Path, encoder_folder: str | Path | None) -> str:
    """What an image prompt's tokens depend on, and so what a stored one belongs to (stored.py
    refuses tokens of another): the IP-Adapter file (its projection; its K/V read the tokens) and
    the image encoder's weights. Not the model folder's name or path: moving a folder keeps them."""
    digest = hashlib.sha256(Path(adapter_file).read_bytes())
    if encoder_folder is not None:
        digest.update(_fingerprint(Path(encoder_folder)))
    return f"{Path(adapter_file).name} + encoder (sha256 {digest.hexdigest()[:16]})"


def _fingerprint(folder: Path) -> bytes:
    """The encoder folder's config and weights: whole files up to 64 MiB; for larger ones (a ViT-H
    is 2.5 GB) their size and first and last MiB, read in milliseconds at start."""
    out = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        size = path.stat().st_size
        out.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            if size <= 64 << 20:
                out.update(f.read())
            else:
                out.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                out.update(f.read())
    return out.digest()


class ImagePromptEncoder:
    """1..max_images photos -> ImagePrompt (their tokens, the model's unconditional tokens, a scale)."""

    def __init__(self, projection: torch.nn.Module, kind: str, encoder: ImageEncoder | None, identity: str,
                 max_images: int = MAX_IMAGES, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.projection, self.kind, self.encoder = projection.to(device), kind, encoder
        self.identity, self.max_images, self.device, self.dtype = identity, max_images, device, dtype

    @classmethod
    def from_files(cls, adapter_file: str | Path, encoder_folder: str | Path, width: int,
                   device: str = "cpu", max_images: int = MAX_IMAGES) -> "ImagePromptEncoder":
        """`width`: the served UNet's cross-attention width (its config's cross_attention_dim)."""
        projection, _, kind, _ = files.load_projection(files.read(adapter_file)["image_proj"], width)
        return cls(projection, kind, ImageEncoder.from_folder(encoder_folder, device), identity(adapter_file, encoder_folder),
                   max_images, device)

    @torch.no_grad()
    def prompt(self, images: Sequence[Image.Image], scale: float = 1.0) -> ImagePrompt:
        if not 1 <= len(images) <= self.max_images:
            raise ValueError(f"an image prompt takes 1 to {self.max_images} images, got {len(images)}")
        if self.encoder is None:
            raise ValueError("no image encoder is loaded for this IP-Adapter")
        positive, negative = self.encoder.embed(images, self.kind)
        return ImagePrompt(self.tokens(positive), self.tokens(negative), scale)

    def tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """[n x T, D] of n photos' embeddings (their tokens side by side, as diffusers puts them)."""
        dtype = next(self.projection.parameters()).dtype
        return self.projection(embeds.to(self.device, dtype)).flatten(0, 1).to(self.dtype)


class ServedImagePrompts:
    def __init__(self, engine, adapter: files.IPAdapter, encoder: ImageEncoder | None, max_images: int = MAX_IMAGES,
                 identity: str = ""):
        self.adapter, self.max_images = adapter, max_images
        self.photos = ImagePromptEncoder(adapter.projection, adapter.kind, encoder,
                                         identity or "an IP-Adapter given in memory",
                                         max_images, engine.device, engine.dtype)
        self.family = engine.family
        self.layout = ImagePromptLayout(text_tokens=engine.family.text_tokens, max_tokens=adapter.tokens * max_images)
        files.install(engine.unet, adapter, self.layout)
        engine.image_prompts = self

    @property
    def identity(self) -> str:
        return self.photos.identity

    @classmethod
    def from_files(cls, engine, adapter_file: str | Path, encoder_folder: str | Path | None,
                   max_images: int = MAX_IMAGES) -> "ServedImagePrompts":
        encoder = ImageEncoder.from_folder(encoder_folder, engine.device) if encoder_folder is not None else None
        return cls(engine, files.load(adapter_file, engine.unet), encoder, max_images,
                   identity=identity(adapter_file, encoder_folder))

    def prompt(self, images: Sequence[Image.Image], scale: float = 1.0) -> ImagePrompt:
        """An image prompt of 1..max_images photos."""
        return self.photos.prompt(images, scale)

    def tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.photos.tokens(embeds)

    def pack(self, embeds: torch.Tensor, image_prompts: Sequence[ImagePrompt | None]) -> torch.Tensor:
        return self.layout.pack_rows(embeds, image_prompts, trailing=self.family.added_tokens)
