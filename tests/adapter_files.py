"""Small LoRA files for tests, in the format diffusers' save_lora_weights writes."""

from __future__ import annotations

import torch
from safetensors.torch import save


def tiny_lora_file(rank: int = 2, seed: int = 0) -> bytes:
    """A diffusers-format LoRA on one attn2 projection of the tiny UNet (in 32 -> out 64)."""
    g = torch.Generator().manual_seed(seed)
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {
        f"{prefix}.lora_A.weight": torch.randn(rank, 32, generator=g),
        f"{prefix}.lora_B.weight": torch.randn(64, rank, generator=g),
    }
    return save(tensors, metadata={"format": "pt"})
