"""Model families: one small module per Stable Diffusion generation (see base.py for the seam).

`detect(model_dir)` reads a diffusers folder's configs and names its family, or refuses it at
start with one line naming what was found and what is served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .base import ModelFamily, TextTower, UnsupportedModel
from .sd1 import SD1
from .sd2 import SD2
from .sdxl import SDXL

FAMILIES: tuple[type[ModelFamily], ...] = (SDXL, SD2, SD1)
SERVED = "served: " + ", ".join(f.title for f in reversed(FAMILIES)) + " (diffusers folders)"

__all__ = ["FAMILIES", "ModelFamily", "SD1", "SD2", "SDXL", "TextTower", "UnsupportedModel", "detect", "of_configs"]


def of_configs(index: Mapping, unet: Mapping | None, where: str = "model", text_tokens: int = 77) -> ModelFamily:
    """The family of a folder's model_index.json and UNet config (None: the folder has no unet/)."""
    pipeline = index.get("_class_name", "?")
    if unet is None:
        denoiser = next((f"{k}: {v[1]}" for k, v in index.items()
                         if k in ("transformer", "prior", "decoder") and isinstance(v, list)), "no unet/ folder")
        raise UnsupportedModel(f"{where}: a {pipeline} ({denoiser}) is not an architecture SteerServe serves; {SERVED}")
    kind = unet.get("_class_name", "UNet2DConditionModel")
    if kind != "UNet2DConditionModel":
        raise UnsupportedModel(f"{where}: a {pipeline} with a {kind} is not an architecture SteerServe serves; {SERVED}")
    for family in FAMILIES:
        if family.matches(index, unet):
            try:
                return family.from_configs(index, unet, text_tokens)
            except (KeyError, ValueError) as e:
                raise UnsupportedModel(f"{where}: a {pipeline} that looks like {family.title} but {e}; {SERVED}") from None
    added = unet.get("addition_embed_type")
    raise UnsupportedModel(
        f"{where}: a {pipeline} whose UNet takes added conditioning {added!r} is not an architecture SteerServe serves; {SERVED}")


def detect(model_dir: str | Path) -> ModelFamily:
    model_dir = Path(model_dir)
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_path.read_text())
    unet_path = model_dir / "unet" / "config.json"
    unet = json.loads(unet_path.read_text()) if unet_path.is_file() else None
    tokens = 77
    tok_cfg = model_dir / "tokenizer" / "tokenizer_config.json"
    if tok_cfg.is_file():
        tokens = int(json.loads(tok_cfg.read_text()).get("model_max_length", 77))
        tokens = tokens if tokens <= 512 else 77  # some tokenizer configs say "no limit" (1e30)
    family = of_configs(index, unet, str(model_dir), tokens)
    pooled = getattr(family, "pooled_width", None)
    te2 = model_dir / "text_encoder_2" / "config.json"
    if pooled is not None and te2.is_file():
        projection = json.loads(te2.read_text()).get("projection_dim")
        if projection is not None and int(projection) != pooled:
            raise UnsupportedModel(
                f"{model_dir}: an SDXL-like UNet whose pooled conditioning is {pooled} wide but text_encoder_2 "
                f"projects to {projection} (not 6 time ids: a refiner-like model) is not served; {SERVED}")
    return family
