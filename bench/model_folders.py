"""Architecture-true model folders with random weights, built here (no download), for tests and benches.

`sdxl_folder`: diffusers' `StableDiffusionXLPipeline` layout (two text encoders, the second with a
projection; a UNet with `text_time` added conditioning), at the reduced widths diffusers' own SDXL
tests use, so a test runs it in seconds on a CPU. Every part is seeded: the same folder, bit for bit,
on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from service.engine.publish import publish_folder
from service.engine.tokenizer import build_clip_tokenizer

# SDXL base's schedule (scaled_linear 0.00085 -> 0.012, 1000 steps, epsilon); it ships Euler.
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def sdxl_components(seed: int = 0, text_width: int = 32, sample_size: int = 32) -> dict:
    """The parts of a tiny SDXL: UNet (cross-attention 2 x text_width wide, `text_time` added
    conditioning with 6 time ids of width 8), VAE (scale factor 2), CLIP-L-like and
    CLIP-G-like-with-projection text encoders."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + text_width, cross_attention_dim=2 * text_width,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=2 * sample_size,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.13025,  # SDXL's VAE scaling
    )
    text = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_size=text_width, intermediate_size=37,
                layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=text_width)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0), the first with <|endoftext|>
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=build_clip_tokenizer(), tokenizer_2=tokenizer_2,
                scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER))


def sdxl_folder(path: str | Path, seed: int = 0, **sizes) -> Path:
    """Writes a tiny SDXL folder once at path (atomically) and returns it."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pipe = StableDiffusionXLPipeline(**sdxl_components(seed, **sizes), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    publish_folder(tmp, path)
    return path


def sdxl_reference_pipeline(folder: str | Path):
    """diffusers' StableDiffusionXLPipeline on a folder, as the equality tests' reference: local
    files only, eval, no gradients, no progress bar."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    return pipe


def ddim_like_ours(pipe) -> None:
    """Gives a diffusers pipeline the DDIM scheduler SteerServe samples with (same betas)."""
    from service.engine.sampling import ddim_config

    pipe.scheduler = DDIMScheduler.from_config(ddim_config(pipe.scheduler.config))


def sdxl_base_unet_config(**overrides) -> dict:
    """UNet2DConditionModel kwargs of SDXL base's UNet (stabilityai/stable-diffusion-xl-base-1.0
    unet/config.json: 2.6 B parameters, 128x128 latents = 1024 px), for building it with random
    weights; overrides replace single entries (a reduced-width copy of the same architecture)."""
    config = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, upcast_attention=False, norm_num_groups=32,
    )
    unknown = set(overrides) - set(config)
    if unknown:
        raise TypeError(f"not an SDXL base UNet setting: {sorted(unknown)}")
    return {**config, **overrides}
