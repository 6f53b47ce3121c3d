"""Model profiles: the embedded model gets the profile tuned on it, a Stable Diffusion folder the
published settings, a setting overrides both, and a Personalize job resolves its defaults from it."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.research.basemodel.config import SD_SCHEDULER_CONFIG
from service.config import Settings
from service.engine.pipeline import Engine, GenerationSpec
from service.engine.tokenizer import build_clip_tokenizer
from service.jobs import requests
from service.profiles import PROFILES, SD1, SD2, SDXL, WORLD, choose


def sd_structured_folder(path, text_width: int = 768):
    """A folder laid out and configured like Stable Diffusion 1.5 (StableDiffusionPipeline, its
    block types, scheduler, CLIP tokenizer, a text encoder and cross-attention of SD 1.5's width
    768) but with few, narrow layers and random weights: the structure is SD's, the size is not."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=text_width, intermediate_size=64, num_attention_heads=8, num_hidden_layers=1, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
                                   scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_embedded_model_uses_its_own_profile():
    chosen = choose(None)
    assert chosen.profile is WORLD and chosen.source == "model folder"
    assert Settings().profile().profile is WORLD


def test_sd15_folder_gets_the_published_settings(tmp_path):
    folder = sd_structured_folder(tmp_path / "sd15")
    chosen = choose(str(folder))
    assert chosen.profile is SD1 and chosen.source.startswith("detected")
    # The folder is a real model the engine serves (nothing downloaded).
    engine = Engine.from_pretrained(folder)
    out = engine.generate(GenerationSpec(prompt="a photo of a dog", steps=2, width=16, height=16))
    assert out.images[0].size == (16, 16)
    # SD 1.x values are the diffusers examples' (docs/profiles.md cites each).
    assert SD1.training["DREAMBOOTH_LORA"].learning_rate == 1e-4 and SD1.training["DREAMBOOTH_LORA"].steps == 500
    assert SD1.training["TEXTUAL_INVERSION"].steps == 3000
    assert SD1.edit["guidance_scale"] == 7.5
    # A setting wins over what the folder says.
    assert choose(str(folder), "steerserve-world").profile is WORLD
    assert Settings(model_dir=folder, model_profile="steerserve-world").profile().source == "setting"


def test_sd2_width_and_unknown_models(tmp_path):
    for name, width, expected in (("sd2", 1024, SD2), ("odd", 96, SD1)):
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": width}))
        chosen = choose(str(tmp_path / name))
        assert chosen.profile is expected
    assert choose(str(tmp_path / "odd")).source.startswith("guessed")
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "steerserve_profile.json").write_text('{"profile": "stable-diffusion-2"}')
    assert choose(str(tmp_path / "marked")).profile is SD2
    with pytest.raises(ValueError, match="unknown profile"):
        choose(None, "no-such-profile")
    with pytest.raises(ValueError, match="model_profile"):
        Settings(model_profile="no-such-profile")
    assert set(PROFILES) == {"steerserve-world", "stable-diffusion-1", "stable-diffusion-2", "stable-diffusion-xl"}


def test_sdxl_folders_get_the_sdxl_settings(tmp_path):
    """SDXL by the model families' test (two text encoders, `text_time` added conditioning) at any
    width (a tiny one: 64), or by SDXL base's text width 2048 alone."""
    tiny = tmp_path / "sdxl-tiny"
    (tiny / "unet").mkdir(parents=True)
    (tiny / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    (tiny / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 64, "addition_embed_type": "text_time"}))
    wide = tmp_path / "sdxl-width"
    (wide / "unet").mkdir(parents=True)
    (wide / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 2048}))
    for folder in (tiny, wide):
        chosen = choose(str(folder))
        assert chosen.profile is SDXL and chosen.source.startswith("detected"), chosen
    # An SD 1.x-width folder with text_time conditioning but one text encoder is not SDXL.
    (tiny / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tiny / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768, "addition_embed_type": "text_time"}))
    choose.cache_clear()
    assert choose(str(tiny)).profile is SD1
    # The published SDXL recipes (docs/profiles.md cites each); every default names its source.
    db, ti = SDXL.training["DREAMBOOTH_LORA"], SDXL.training["TEXTUAL_INVERSION"]
    assert (db.steps, db.learning_rate, db.rank, db.batch_size) == (500, 1e-4, 4, 4)  # README_sdxl, 1 x 4 accumulation
    assert (ti.steps, ti.learning_rate, ti.batch_size) == (500, 2e-3, 4)  # 5e-4 x --scale_lr x 4
    assert SDXL.training["CUSTOM_DIFFUSION"] == SD1.training["CUSTOM_DIFFUSION"]
    assert "carried over from the SD 1.x profile" in SDXL.sources["CUSTOM_DIFFUSION"]
    assert SDXL.edit["guidance_scale"] == 5.0
    assert set(SDXL.sources) >= set(SDXL.training) | {"edit"}


def test_job_defaults_come_from_the_profile():
    tokenizer = build_clip_tokenizer()
    request = pb.PersonalizeRequest(method=pb.CUSTOM_DIFFUSION, name="x", class_word="dog")
    sd = requests.resolve(request, taken_tokens=[], tokenizer=tokenizer, profile=SD1)
    d = SD1.training["CUSTOM_DIFFUSION"]
    assert (sd.options.steps, sd.options.learning_rate, sd.options.rank, sd.options.batch_size) == \
        (d.steps, pytest.approx(d.learning_rate), d.rank, d.batch_size)
    assert sd.options.prior_loss_weight == 1.0 and sd.options.num_class_images == 200  # the paper's prior
    world = requests.resolve(request, taken_tokens=[], tokenizer=tokenizer, profile=WORLD)
    w = WORLD.training["CUSTOM_DIFFUSION"]
    assert (world.options.steps, world.options.batch_size) == (w.steps, w.batch_size)
    assert world.options.prior_loss_weight == pytest.approx(w.prior_loss_weight)
    # What the request says stays; an explicit 0 / false turns a profile's default off.
    request.options.steps, request.options.prior_loss_weight = 7, 0.5
    mine = requests.resolve(request, taken_tokens=[], tokenizer=tokenizer, profile=SD1)
    assert mine.options.steps == 7 and mine.options.prior_loss_weight == pytest.approx(0.5)
    assert mine.options.num_class_images == requests.DEFAULT_NUM_CLASS_IMAGES
    request.options.prior_loss_weight = 0.0
    assert request.options.HasField("prior_loss_weight")
    off = requests.resolve(request, taken_tokens=[], tokenizer=tokenizer, profile=SD1)
    assert off.options.prior_loss_weight == 0.0
    db = pb.PersonalizeRequest(method=pb.DREAMBOOTH_LORA, name="y", class_word="dog")
    assert requests.resolve(db, taken_tokens=[], tokenizer=tokenizer, profile=WORLD).options.train_text_encoder == \
        WORLD.training["DREAMBOOTH_LORA"].train_text_encoder
    db.options.train_text_encoder = False
    assert not requests.resolve(db, taken_tokens=[], tokenizer=tokenizer, profile=WORLD).options.train_text_encoder
