"""Architecture of steerserve-world-v1: Stable Diffusion's components, sized for 2 CPU cores.

64x64 RGB images <-> 8x16x16 latents (VAE with three blocks: downsample 4x). The latent has 8
channels rather than SD's 4 because a 16x16 grid has to carry stripes and dots with a period of a
few pixels; 8x16x16 is still a 6x compression of the image. The UNet's 16x16 level has attention
on the way up only (the way down stays convolutional to keep it cheap): object outlines live at
16x16, and with text entering at 8x8 and 4x4 alone the model drew every shape as a blob. The text encoder is a 4-layer CLIP transformer of width 48 over the exact CLIP vocabulary, so
prompts tokenize as for any SD checkpoint; its 49,408-row embedding table is most of its size.
"""

from __future__ import annotations

IMAGE_SIZE = 64
LATENT_CHANNELS = 8
TEXT_HIDDEN = 48

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
)

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 4,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    cross_attention_dim=TEXT_HIDDEN,
    # Heads per level, 16x16 first (diffusers' name for a head count); 16x16 has 32 channels: 4x8.
    attention_head_dim=(4, 8, 8),
    norm_num_groups=16,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TEXT_HIDDEN,
    intermediate_size=4 * TEXT_HIDDEN,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=TEXT_HIDDEN,
    # CLIP's ids for <|startoftext|>, <|endoftext|> (also the pad token of our tokenizer).
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# DDPM's linear schedule (Ho et al.; 0.0001-0.02), not SD's scaled_linear: at 16x16 the low
# frequencies of an image survive SD's last step (sqrt(alphas_cumprod[-1]) = 0.068; averaged over
# the grid that is about as strong as the noise), so a model trained with it learns to read the
# background colour and the object's layout out of the starting noise instead of the caption, and
# at sampling, pure noise gives random colours and blob-shaped objects. Linear ends at 0.0066, ten
# times lower. DDIM for sampling, steps_offset=1 as SD ships it.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# Stable Diffusion 1.x's schedule, for the seeded stand-in model (service.engine.default_model).
SD_SCHEDULER_CONFIG = dict(SCHEDULER_CONFIG, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
