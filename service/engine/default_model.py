"""The embedded default model: which local folder the engine serves when none is configured.

Order of preference:
1. the trained world model shipped with the package (service/research/basemodel/weights/steerserve-world-v1),
   our own small Stable-Diffusion-architecture model trained on the synthetic world;
2. otherwise a small seeded SD-architecture pipeline built from config (random weights, so it draws
   noise-like images, but every code path is the real one), written once to a cache folder.
Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.basemodel.config import SD_SCHEDULER_CONFIG

from .publish import publish_folder
from .tokenizer import build_clip_tokenizer

SEEDED_MODEL_NAME = "steerserve-seeded-tiny"


def trained_model_dir() -> Path | None:
    path = Path(DEFAULT_MODEL_DIR)
    return path if (path / "model_index.json").is_file() else None


def build_seeded_tiny_pipeline_components(seed: int = 0) -> dict:
    """UNet (1.4 M params), VAE (0.7 M), CLIP text encoder (hidden 32): a 64x64 SD-architecture model.

    Each part is seeded before construction so the weights, and thus images, are bit-exact across
    machines and runs.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)  # SD 1.x's schedule
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), scheduler=scheduler
    )


def seeded_model_dir(cache_root: Path) -> Path:
    """Writes the seeded tiny pipeline once under cache_root and returns its folder."""
    from diffusers import StableDiffusionPipeline

    path = Path(cache_root) / SEEDED_MODEL_NAME
    if (path / "model_index.json").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pipe = StableDiffusionPipeline(
        **build_seeded_tiny_pipeline_components(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    publish_folder(tmp, path)  # a concurrent builder either wins or finds it done
    return path


def default_model_dir(cache_root: Path) -> Path:
    return trained_model_dir() or seeded_model_dir(cache_root)
