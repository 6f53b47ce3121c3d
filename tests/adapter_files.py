"""Small LoRA files for tests, in the format diffusers' save_lora_weights writes, shaped for the
model a test serves (the seeded tiny model and the trained world model differ in width)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

# The mid block's cross-attention exists in every SD 1.x/2.x UNet: in = text width, out = last block width.
MODULE = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"


def lora_file(model_dir: Path, rank: int = 2, seed: int = 0, scale: float = 1.0) -> bytes:
    config = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    in_features, out_features = config["cross_attention_dim"], config["block_out_channels"][-1]
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"{MODULE}.lora_A.weight": torch.randn(rank, in_features, generator=g) * scale,
        f"{MODULE}.lora_B.weight": torch.randn(out_features, rank, generator=g) * scale,
    }
    return save(tensors, metadata={"format": "pt"})


def served_model_dir(gateway) -> Path:
    return gateway.gateway.servicer.backend.model_dir


def dict_loader(store: dict):
    """An adapter manager's loader over a dict of parsed adapters (key -> Adapter)."""
    from service.adapters import AdapterNotFoundError

    def load(key):
        if key not in store:
            raise AdapterNotFoundError(key)
        return store[key]

    return load
