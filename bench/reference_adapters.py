"""Reference adapters for tests and benchmarks, written by peft + diffusers themselves.

A LoRA here is what a user would bring from elsewhere: peft's ``add_adapter`` on a copy of the
model, non-zero random weights (peft initializes B to zero, which would hide any bug), saved with
diffusers' ``save_lora_weights`` including the LoraConfig metadata that carries lora_alpha.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def peft_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str], seed: int, std: float = 0.1):
    """peft's LoRA layers on a copy of model, with random non-zero A and B (peft starts B at zero,
    which would hide any bug), and the config, as diffusers' trainers hand them to save_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return get_peft_model_state_dict(model), config.to_dict()


def write_reference_lora(
    directory: str | Path,
    unet: nn.Module,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    std: float = 0.05,
    targets: Sequence[str] = UNET_LORA_TARGETS,
    text_encoder: nn.Module | None = None,
    text_encoder_rank: int | None = None,
) -> Path:
    """Write ``<directory>/pytorch_lora_weights.safetensors`` the way diffusers' trainers do."""
    from diffusers import StableDiffusionPipeline

    unet_layers, unet_config = peft_lora(unet, rank, alpha, targets, seed, std)
    kwargs = {}
    if text_encoder is not None:
        te_layers, te_config = peft_lora(
            text_encoder, text_encoder_rank or rank, alpha, TEXT_ENCODER_LORA_TARGETS, seed + 10_000, std
        )
        kwargs = dict(text_encoder_lora_layers=te_layers, text_encoder_lora_adapter_metadata=te_config)
    StableDiffusionPipeline.save_lora_weights(
        str(directory), unet_lora_layers=unet_layers, unet_lora_adapter_metadata=unet_config, **kwargs
    )
    return Path(directory) / "pytorch_lora_weights.safetensors"


def tiny_pipeline(seed: int = 0):
    """The seeded tiny SD-architecture StableDiffusionPipeline (CPU, fp32, eval)."""
    from diffusers import StableDiffusionPipeline

    from service.engine.default_model import build_seeded_tiny_pipeline_components

    pipe = StableDiffusionPipeline(
        **build_seeded_tiny_pipeline_components(seed),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe
