"""The embedded model's image-prompt adapter (IP-Adapter class), trained by train.py; its shipped
weights are in weights/ in the published layout (docs/ip_adapter/README.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
FILE_NAME = "ip-adapter_steerserve-world-v1.safetensors"
SHIPPED_ADAPTER = WEIGHTS / FILE_NAME
SHIPPED_ENCODER = WEIGHTS / "image_encoder"
UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def unet_digest(model_dir: str | Path) -> str:
    return hashlib.sha256((Path(model_dir) / UNET_FILE).read_bytes()).hexdigest()


def shipped_for(model_dir: str | Path) -> tuple[Path, Path] | None:
    """The shipped adapter and encoder when `model_dir` holds the UNet they were trained on (the
    embedded model, wherever its folder is: its UNet's digest is in training.json), else None."""
    record = WEIGHTS / "training.json"
    unet = Path(model_dir) / UNET_FILE
    if not (SHIPPED_ADAPTER.exists() and record.exists() and unet.is_file()):
        return None
    wanted = json.loads(record.read_text()).get("base_unet_sha256")
    if unet.stat().st_size > 64 << 20:  # a real-size model is not the embedded one: no hashing of GBs
        return None
    return (SHIPPED_ADAPTER, SHIPPED_ENCODER) if wanted == unet_digest(model_dir) else None
