"""SDXL served as diffusers' StableDiffusionXLPipeline runs it (issue 35).

On an SDXL-architecture folder with random weights at reduced widths (bench/model_folders.py): our
conditioning, one noise prediction and the latents after several DDIM steps equal diffusers' for the
same inputs; folders of other architectures are refused in one line.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bench.model_folders import ddim_like_ours, sdxl_folder
from service.engine import families
from service.engine.pipeline import Engine, GenerationSpec
from service.engine.sampling import Decode, generation, run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sdxl_folder(tmp_path_factory.mktemp("models") / "sdxl-tiny")


@pytest.fixture(scope="module")
def engine(folder):
    return Engine.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    ddim_like_ours(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["a photo of a dog on a beach", "an oil painting of a red barn"]


def test_the_folder_is_sdxl(engine):
    assert isinstance(engine.family, families.SDXL)
    assert engine.family.pooled_width == 32 and engine.family.text_width == 64
    assert engine.text_length == 77 + 1  # 32 pooled + 6 time ids ride in one extra 64-wide token
    assert families.SDXL().added_tokens == 1  # SDXL base: 1280 + 6 in one 2048-wide token


def test_conditioning_equals_diffusers(engine, reference):
    ours = engine.encode_prompts(PROMPTS, size=(64, 48))
    tokens, added = engine.family.unpack(ours)
    embeds, negative, pooled, negative_pooled = reference.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    torch.testing.assert_close(tokens, embeds, rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(added["time_ids"], torch.tensor([[64.0, 48, 0, 0, 64, 48]] * 2))
    # force_zeros_for_empty_prompt: diffusers zeroes the negative when none is given; our "" is that.
    empty_tokens, empty_added = engine.family.unpack(engine.encode_prompts(["", ""], size=(64, 48)))
    assert torch.equal(empty_tokens, negative) and torch.equal(empty_added["text_embeds"], negative_pooled)
    assert not negative.any()


def test_a_folder_without_force_zeros_encodes_the_empty_prompt(folder, tmp_path, reference):
    copy = tmp_path / "sdxl-no-zeros"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    engine = Engine.from_pretrained(copy)
    tokens, added = engine.family.unpack(engine.encode_prompts([""]))
    embeds, _, pooled, _ = reference.encode_prompt([""], device="cpu", do_classifier_free_guidance=False)
    assert tokens.abs().sum() > 0
    torch.testing.assert_close(tokens, embeds, rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)


def test_noise_prediction_equals_diffusers(engine, reference):
    embeds = engine.encode_prompts(PROMPTS, size=(64, 64))
    tokens, added = engine.family.unpack(embeds)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500])
    ours = engine.predict_noise(latents, t, embeds, [(), ()])
    theirs = reference.unet(latents, t, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def denoised_latents(engine, spec: GenerationSpec) -> torch.Tensor:
    """The latents our sampling loop hands to the VAE (the loop run on the engine, stopped there)."""
    captured = {}

    def execute(call):
        if isinstance(call, Decode):
            captured["latents"] = call.latents
        return engine.execute(call)

    run(generation(spec, engine.facts), execute)
    return captured["latents"]


def test_denoised_latents_after_several_steps_equal_diffusers(engine, reference):
    spec = GenerationSpec(prompt=PROMPTS[0], steps=4, guidance_scale=5.0, width=64, height=48, seed=7, num_images=2)
    ours = denoised_latents(engine, spec)
    initial = engine.initial_latents([7, 8], 48, 64)
    theirs = reference(PROMPTS[0], num_inference_steps=4, guidance_scale=5.0, height=48, width=64,
                       num_images_per_prompt=2, latents=initial, output_type="latent").images
    # Equal to float32 rounding (seen: 1 element of 6144 off by 1.4e-5 after 4 steps).
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_generate_is_deterministic_at_other_sizes(engine):
    a = engine.generate(GenerationSpec(prompt="a cat", steps=2, width=48, height=64, seed=3))
    b = engine.generate(GenerationSpec(prompt="a cat", steps=2, width=48, height=64, seed=3))
    assert a.images[0].size == (48, 64) and a.images[0].tobytes() == b.images[0].tobytes()


# -- what is not served ----------------------------------------------------------------------------


def _folder(tmp_path, index: dict, unet: dict | None, denoiser: str = "unet"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    if unet is not None:
        (tmp_path / denoiser).mkdir()
        (tmp_path / denoiser / "config.json").write_text(json.dumps(unet))
    return tmp_path


@pytest.mark.parametrize("index, unet, denoiser, found", [
    ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]},
     None, "unet", "StableDiffusion3Pipeline (transformer: SD3Transformer2DModel)"),
    ({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]},
     None, "unet", "FluxPipeline (transformer: FluxTransformer2DModel)"),
    ({"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
     {"_class_name": "UNet2DConditionModel", "addition_embed_type": "image", "cross_attention_dim": 768},
     "unet", "added conditioning 'image'"),
    ({"_class_name": "CustomPipeline", "unet": ["diffusers", "UNetSpatioTemporalConditionModel"]},
     {"_class_name": "UNetSpatioTemporalConditionModel"}, "unet", "UNetSpatioTemporalConditionModel"),
])
def test_an_architecture_not_served_is_refused_in_one_line(tmp_path, index, unet, denoiser, found):
    folder = _folder(tmp_path / "m", index, unet, denoiser)
    with pytest.raises(families.UnsupportedModel) as caught:
        Engine.from_pretrained(folder)
    message = str(caught.value)
    assert "\n" not in message and found in message
    assert "Stable Diffusion 1.x, Stable Diffusion 2.x, Stable Diffusion XL" in message


def test_sd_folders_keep_their_families(tmp_path):
    sd1 = families.of_configs({}, {"cross_attention_dim": 768})
    sd2 = families.of_configs({}, {"cross_attention_dim": 1024})
    assert type(sd1) is families.SD1 and type(sd2) is families.SD2
    assert sd1.text_length == 77 and sd2.added_tokens == 0


# -- the compiled runtimes take SDXL's added conditioning -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["onnx"])
def test_compiled_runtimes_equal_eager_on_sdxl(folder, kind, tmp_path, one_torch_thread):
    """The packed added conditioning is part of `embeds`, so the exported graph (the bank as its
    inputs) takes it as it takes the token states: rows with different time ids and an adapter
    routed to one row equal the eager UNet. torch.compile traces the same forward (hook included);
    it passed this test too (max difference 2.5e-6) but costs ~90 s of CI here, so it is left out."""
    from prometheus_client import CollectorRegistry

    from service.adapters import BankedAdapters, parse_adapter
    from service.compiled.configure import build_runtime
    from service.compiled.runtime import RuntimeOptions

    engine = Engine.from_pretrained(folder)
    adapter = parse_adapter(_random_unet_lora(engine))
    BankedAdapters.attach(engine, lambda key: adapter, num_slots=3, max_rank=4, max_rows=4, registry=CollectorRegistry())
    runtime = build_runtime(engine, kind, RuntimeOptions(kind=kind, cache_dir=tmp_path), [4])
    runtime.warmup([(4, 32, 32)])
    embeds = torch.cat([engine.encode_prompts(["a dog", ""], size=(64, 64)),
                        engine.encode_prompts(["a dog", ""], size=(48, 32))])
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 900, 300, 300])
    rows = [(), ("user",), (), ("user",)]
    with torch.no_grad(), engine.adapters.activate([[type("Use", (), {"key": k, "weight": 1.0})() for k in r] for r in rows]):
        want = engine.unet(latents, t, encoder_hidden_states=embeds).sample
        got = runtime(latents, t, embeds)
    assert runtime.stats.fallback_calls == 0  # it ran compiled, not eager
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want[1] - want[0]).abs().max() > 0  # the adapter and the sizes matter


def _random_unet_lora(engine) -> bytes:
    from safetensors.torch import save

    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, module in engine.unet.named_modules():
        if name.endswith("attn2.to_k"):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
    return save(tensors)


def test_the_vae_runs_in_float32_under_a_float16_engine(folder):
    """SDXL's VAE overflows in float16; diffusers' SDXL pipeline upcasts it (force_upcast), so do we.
    SD 1.x keeps the engine's dtype, as diffusers' SD pipeline does."""
    engine = Engine.from_pretrained(folder, dtype=torch.bfloat16)  # not float16: no upcast asked
    assert engine.vae_dtype == torch.bfloat16
    assert engine.family.vae_dtype(engine.vae.config, torch.float16) == torch.float32
    assert families.SD1().vae_dtype(engine.vae.config, torch.float16) == torch.float16


def test_the_sdxl_refiner_is_refused_in_one_line(tmp_path, folder):
    """The refiner has no first text encoder and 5 time ids; its folder says requires_aesthetics_score."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    refiner = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
               "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "unet": ["diffusers", "UNet2DConditionModel"]}
    with pytest.raises(families.UnsupportedModel, match="SDXL refiner") as caught:
        families.detect(_folder(tmp_path / "refiner", refiner, {**unet, "projection_class_embeddings_input_dim": 5 * 8 + 32}))
    assert "\n" not in str(caught.value)
    # Without those keys, a pooled width that differs from text_encoder_2's projection gives it away.
    odd = shutil.copytree(folder, tmp_path / "odd")
    (odd / "unet" / "config.json").write_text(json.dumps({**unet, "projection_class_embeddings_input_dim": 5 * 8 + 32}))
    with pytest.raises(families.UnsupportedModel, match="projects to 32"):
        Engine.from_pretrained(odd)


def test_size_limits_follow_the_model():
    from service.config import Settings
    from service.engine.sampling import ModelLimits
    from service.gateway.validation import Limits

    sdxl = Limits(Settings(), ModelLimits(vae_scale_factor=8, default_size=1024))
    assert (sdxl.max_size, sdxl.max_pixels) == (2048, 1024 * 1024)
    embedded = Limits(Settings(), ModelLimits(vae_scale_factor=2, default_size=64))
    assert (embedded.max_size, embedded.max_pixels) == (512, 512 * 512)  # as before
    pinned = Limits(Settings(max_size=768, max_pixels=640 * 640), ModelLimits(vae_scale_factor=8, default_size=1024))
    assert (pinned.max_size, pinned.max_pixels) == (768, 640 * 640)
