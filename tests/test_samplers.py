"""Every sampler a request may pick samples as diffusers' StableDiffusionPipeline does with that
scheduler: on an SD 1.5-structured folder (random weights), the same prompt, guidance and initial
latents, our loop's latents after several steps equal the pipeline's. The reference schedulers are
made here the way diffusers' docs swap one in (`X.from_config(pipe.scheduler.config, ...)`, the
A1111 names as diffusers issues #1887 and #4167 map them), not from service/engine/samplers.py, so a
wrong class or setting there fails here. The stochastic samplers draw each image's step noise from
its seed's generator (after its initial noise): the pipeline gets the same generators."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from service.engine import samplers
from service.engine.pipeline import Engine, GenerationSpec
from tests.test_profiles import sd_structured_folder
from tests.test_sdxl import denoised_latents

# name -> (diffusers scheduler, its settings), as diffusers' docs name A1111's samplers.
REFERENCE = {
    "ddim": (DDIMScheduler, {"clip_sample": False}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}

CASES = [(name, False) for name in REFERENCE] + [(name, True) for name in ("euler", "dpmpp_2m", "dpmpp_2m_sde", "unipc")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd_structured_folder(tmp_path_factory.mktemp("sd15-samplers"))


@pytest.fixture(scope="module")
def engine(folder):
    return Engine.from_pretrained(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_sampler_is_tested_here():
    assert set(REFERENCE) == set(samplers.SAMPLERS)
    assert {name for name, karras in CASES if karras} == {s.name for s in samplers.SAMPLERS.values() if s.karras}


@pytest.mark.parametrize("name, karras", CASES, ids=[f"{n}{'-karras' if k else ''}" for n, k in CASES])
def test_latents_equal_diffusers_pipeline_with_that_scheduler(engine, pipe, name, karras):
    # LCM samples at guidance 1 (no CFG: one prediction per step), as with an LCM-LoRA.
    guidance = 1.0 if name == "lcm" else 5.0
    steps = 4 if name == "lcm" else 6
    spec = GenerationSpec(prompt="a red barn", steps=steps, guidance_scale=guidance, width=16, height=16, seed=3,
                          num_images=2, sampler=name, karras_sigmas=karras)
    ours = denoised_latents(engine, spec)

    scheduler, settings = REFERENCE[name]
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **settings,
                                           **({"use_karras_sigmas": True} if karras else {}))
    generators = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]
    initial = engine.initial_latents(generators, 16, 16)  # each generator goes on to the step noise
    theirs = pipe("a red barn", num_inference_steps=steps, guidance_scale=guidance, height=16, width=16,
                  num_images_per_prompt=2, latents=initial, generator=generators, output_type="latent").images
    assert ours.abs().mean() > 0.1  # latents, not a degenerate zero
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "lcm"])
def test_stochastic_samplers_reproduce_and_image_i_is_seed_plus_i(engine, name):
    spec = GenerationSpec(prompt="a red barn", steps=4, guidance_scale=4.0, width=16, height=16, seed=10,
                          num_images=2, sampler=name)
    both = denoised_latents(engine, spec)
    again = denoised_latents(engine, spec)
    second = denoised_latents(engine, GenerationSpec(**{**spec.__dict__, "seed": 11, "num_images": 1}))
    other_seed = denoised_latents(engine, GenerationSpec(**{**spec.__dict__, "seed": 12}))
    torch.testing.assert_close(both, again, rtol=0, atol=0)
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-5)
    assert (both - other_seed).abs().mean() > 0.05


def test_guidance_one_runs_one_prediction_per_image(engine):
    calls = []

    def count(call):
        calls.append(call)
        return engine.execute(call)

    from service.engine.sampling import Denoise, generation, run

    run(generation(GenerationSpec(prompt="a red barn", steps=2, guidance_scale=1.0, width=16, height=16,
                                  num_images=3, sampler="lcm"), engine.facts), count)
    assert [c.latents.shape[0] for c in calls if isinstance(c, Denoise)] == [3, 3]


def test_a_step_count_a_sampler_cannot_take_is_named():
    assert samplers.check("lcm", 50, False) is None
    field, message = samplers.check("lcm", 51, False)
    assert field == "steps" and "1 to 50" in message
    field, message = samplers.check("unknown", 10, False)
    assert field == "sampler" and all(name in message for name in samplers.SAMPLERS)
