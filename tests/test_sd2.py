"""Stable Diffusion 2.x, v-prediction included, as diffusers' StableDiffusionPipeline runs it.

An SD 2-structured folder (1024-wide text conditioning) with random weights, its scheduler switched
to v-prediction as SD 2.x 768 ships: the family is SD 2.x, and the latents after several DDIM steps
equal diffusers' for the same initial latents.
"""

from __future__ import annotations

import json

import torch

from bench.model_folders import ddim_like_ours
from service.engine import families
from service.engine.pipeline import Engine, GenerationSpec
from tests.test_profiles import sd_structured_folder
from tests.test_sdxl import denoised_latents


def test_v_prediction_latents_equal_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = sd_structured_folder(tmp_path / "sd2-v", text_width=1024)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    engine = Engine.from_pretrained(folder)
    assert type(engine.family) is families.SD2
    assert engine.facts.scheduler_config["prediction_type"] == "v_prediction"

    spec = GenerationSpec(prompt="a red barn", steps=4, guidance_scale=6.0, width=16, height=16, seed=3)
    ours = denoised_latents(engine, spec)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    ddim_like_ours(pipe)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    theirs = pipe("a red barn", num_inference_steps=4, guidance_scale=6.0, height=16, width=16,
                  latents=engine.initial_latents([3], 16, 16), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
