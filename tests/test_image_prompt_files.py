"""IP-Adapter files in the published layout, applied as diffusers' `load_ip_adapter` applies them
(issue 40, item 3): random weights on SD 1.x- and SDXL-structured UNets, base and plus projections.

One UNet call holds rows with different image prompts and scales and a row without any; diffusers
runs each row on its own (one image prompt and scale per call, its IPAdapterAttnProcessor2_0).
"""

from __future__ import annotations

import copy

import pytest
import torch

from service.image_prompt import files
from service.image_prompt.packing import ImagePromptLayout

E, HIDDEN = 24, 40  # image embedding width (base) and encoder hidden width (plus): a tiny CLIP vision


def published(unet, kind: str, seed: int = 0) -> dict:
    """A random IP-Adapter state dict in the published (nested) layout for `unet`."""
    g = torch.Generator().manual_seed(seed)
    d = unet.config.cross_attention_dim
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    if kind == "base":
        proj = {"proj.weight": rand(4 * d, E), "proj.bias": rand(4 * d), "norm.weight": 1 + rand(d), "norm.bias": rand(d)}
    else:  # the original Resampler's names: 4 layers, 64-wide heads, 16 queries
        hid, heads = 64, 1
        proj = {"latents": rand(1, 16, hid), "proj_in.weight": rand(hid, HIDDEN), "proj_in.bias": rand(hid),
                "proj_out.weight": rand(d, hid), "proj_out.bias": rand(d), "norm_out.weight": 1 + rand(d), "norm_out.bias": rand(d)}
        for i in range(4):
            proj |= {f"layers.{i}.0.norm1.weight": 1 + rand(hid), f"layers.{i}.0.norm1.bias": rand(hid),
                     f"layers.{i}.0.norm2.weight": 1 + rand(hid), f"layers.{i}.0.norm2.bias": rand(hid),
                     f"layers.{i}.0.to_q.weight": rand(heads * 64, hid), f"layers.{i}.0.to_kv.weight": rand(2 * heads * 64, hid),
                     f"layers.{i}.0.to_out.weight": rand(hid, heads * 64),
                     f"layers.{i}.1.0.weight": 1 + rand(hid), f"layers.{i}.1.0.bias": rand(hid),
                     f"layers.{i}.1.1.weight": rand(4 * hid, hid), f"layers.{i}.1.3.weight": rand(hid, 4 * hid)}
    modules = dict(unet.named_modules())
    ip = {}
    for key, name in files.cross_attention_layers(unet).items():
        inner = modules[name].to_k.out_features
        ip[f"{key}.to_k_ip.weight"], ip[f"{key}.to_v_ip.weight"] = rand(inner, d), rand(inner, d)
    return {"image_proj": proj, "ip_adapter": ip}


@pytest.fixture(scope="module")
def sd1_unet(tiny_pipe):
    return tiny_pipe.unet


@pytest.fixture(scope="module")
def sdxl_unet(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from bench.model_folders import sdxl_folder

    folder = sdxl_folder(tmp_path_factory.mktemp("models") / "sdxl-tiny")
    return UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval().requires_grad_(False)


def embeddings(kind: str, rows: int, images: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "base":
        return torch.randn(rows, images, E, generator=g)
    return torch.randn(rows, images, 9, HIDDEN, generator=g)  # penultimate hidden states, 9 tokens


def sdxl_added(rows: int, unet) -> dict:
    g = torch.Generator().manual_seed(3)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {"text_embeds": torch.randn(rows, pooled, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * rows)}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["base", "plus"])
def test_rows_with_their_own_image_prompts_equal_diffusers_per_row(family, kind, request):
    base_unet = request.getfixturevalue(f"{family}_unet")
    state = published(base_unet, kind)
    theirs = copy.deepcopy(base_unet)
    theirs._load_ip_adapter_weights([state])  # what pipe.load_ip_adapter calls with the file's dict
    ours = copy.deepcopy(base_unet)
    adapter = files.load(state, ours)
    assert adapter.kind == kind and adapter.tokens == (4 if kind == "base" else 16)
    images = 2  # a prompt of two reference images: their tokens side by side, as diffusers does
    layout = ImagePromptLayout(text_tokens=77, max_tokens=adapter.tokens * 3)
    files.install(ours, adapter, layout)

    g = torch.Generator().manual_seed(1)
    d = base_unet.config.cross_attention_dim
    rows = 3
    latents = torch.randn(rows, base_unet.config.in_channels, 16, 16, generator=g)
    t = torch.tensor([999, 500, 20])
    text = torch.randn(rows, 77, d, generator=g)
    embeds = embeddings(kind, rows, images, seed=2)
    scales = [1.0, 0.0, 0.6]  # row 1: no image prompt
    added = sdxl_added(rows, base_unet) if family == "sdxl" else None

    with torch.no_grad():
        flat = embeds.flatten(0, 1)  # [rows * images, ...] -> tokens [rows, images * T, D]
        tokens = adapter.projection(flat).reshape(rows, images * adapter.tokens, d)
        packed = torch.cat([layout.pack(text[i : i + 1], None if scales[i] == 0 else tokens[i : i + 1], scales[i])
                            for i in range(rows)])
        kwargs = {"added_cond_kwargs": added} if added else {}
        got = ours(latents, t, encoder_hidden_states=packed, **kwargs).sample
        expected = []
        for i in range(rows):
            theirs.set_attn_processor({n: p for n, p in theirs.attn_processors.items()})  # fresh state per call
            for p in theirs.attn_processors.values():
                if hasattr(p, "scale"):
                    p.scale = [scales[i]]
            row_added = {k: v[i : i + 1] for k, v in added.items()} if added else {}
            expected.append(theirs(latents[i : i + 1], t[i : i + 1], encoder_hidden_states=text[i : i + 1],
                                   added_cond_kwargs={"image_embeds": [embeds[i : i + 1]], **row_added}).sample)
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)
    # The image prompt matters (the equality is not of two base UNets), and a row without one is the
    # base UNet's result.
    with torch.no_grad():
        plain = base_unet(latents, t, encoder_hidden_states=text, **({"added_cond_kwargs": added} if added else {})).sample
    assert (got[0] - plain[0]).abs().max() > 1e-3
    torch.testing.assert_close(got[1], plain[1], rtol=0, atol=1e-6)


def test_a_file_for_another_model_is_refused_by_name(sd1_unet, sdxl_unet, tmp_path):
    from safetensors.torch import save_file

    state = published(sdxl_unet, "base")
    flat = {f"{part}.{k}": v for part, weights in state.items() for k, v in weights.items()}
    save_file(flat, tmp_path / "ip-adapter_sdxl.safetensors")
    assert files.load(tmp_path / "ip-adapter_sdxl.safetensors", sdxl_unet).kind == "base"  # the flat layout reads
    with pytest.raises(files.ImagePromptFileError, match="wide|made for another model"):
        files.load(tmp_path / "ip-adapter_sdxl.safetensors", sd1_unet)
    with pytest.raises(files.ImagePromptFileError, match="both `image_proj` and `ip_adapter`"):
        files.load({"image_proj": state["image_proj"]}, sdxl_unet)
    face = {"image_proj": {"norm.weight": torch.ones(4), "proj.0.weight": torch.ones(8, 4)}, "ip_adapter": state["ip_adapter"]}
    with pytest.raises(files.ImagePromptFileError, match="Face-ID"):
        files.load(face, sdxl_unet)


def vision_folder(path):
    """A tiny CLIP vision encoder with projection, saved as a local folder (as published IP-Adapter
    repositories hold theirs, e.g. models/image_encoder): embeddings E wide, hidden states HIDDEN."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    config = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=48, projection_dim=E, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=4, num_channels=3)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_reference_photos_through_a_local_encoder_equal_diffusers_pipeline_path(kind, tiny_pipe, tmp_path):
    """From PIL photos: our encoder (local folder), the file's projection, one packed UNet call with
    guidance's two rows, against diffusers' pipeline after `load_ip_adapter` of the same repository
    layout (its image encoder, feature extractor, `prepare_ip_adapter_image_embeds`, unconditional
    embeddings and UNet)."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from service.image_prompt.encoder import ImageEncoder

    repo = tmp_path / "ip-adapter"
    vision_folder(repo / "models" / "image_encoder")
    state = published(tiny_pipe.unet, kind, seed=4)
    save_file({f"{part}.{k}": v for part, weights in state.items() for k, v in weights.items()},
              repo / "models" / "ip-adapter.safetensors")
    rng = np.random.RandomState(0)
    photos = [Image.fromarray((rng.rand(40 + 8 * i, 48, 3) * 255).astype(np.uint8)) for i in range(2)]

    pipe = copy.deepcopy(tiny_pipe)
    pipe.load_ip_adapter(str(repo), subfolder="models", weight_name="ip-adapter.safetensors")
    pipe.set_ip_adapter_scale(0.8)
    theirs_embeds = pipe.prepare_ip_adapter_image_embeds([photos], None, "cpu", 1, True)[0]  # [neg; pos]

    encoder = ImageEncoder.from_folder(repo / "models" / "image_encoder")
    adapter = files.load(repo / "models" / "ip-adapter.safetensors", copy.deepcopy(tiny_pipe.unet))
    positive, negative = encoder.embed(photos, kind)
    ours_embeds = torch.stack([negative, positive])  # one prompt of two photos: [2 (neg, pos), 2 photos, ...]
    torch.testing.assert_close(ours_embeds, theirs_embeds, rtol=1e-5, atol=1e-6)

    ours = copy.deepcopy(tiny_pipe.unet)
    layout = ImagePromptLayout(text_tokens=77, max_tokens=adapter.tokens * 5)
    files.install(ours, adapter, layout)
    d = ours.config.cross_attention_dim
    g = torch.Generator().manual_seed(6)
    text, latents, t = torch.randn(2, 77, d, generator=g), torch.randn(1, 4, 16, 16, generator=g).repeat(2, 1, 1, 1), torch.tensor([700, 700])
    with torch.no_grad():
        tokens = adapter.projection(ours_embeds.flatten(0, 1)).reshape(2, 2 * adapter.tokens, d)
        got = ours(latents, t, encoder_hidden_states=layout.pack(text, tokens, 0.8)).sample
        expected = pipe.unet(latents, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [theirs_embeds]}).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_generate_with_reference_photos_equals_diffusers_pipeline_with_ip_adapter_image(tiny_pipe, tmp_path):
    """The engine's whole sampling loop (guidance's unconditional row with the model's unconditional
    image tokens) against StableDiffusionPipeline(ip_adapter_image=...) after load_ip_adapter, same
    latents, 4 DDIM steps; and a row of another request without an image prompt, batched with it,
    stays the plain engine's."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from bench.model_folders import ddim_like_ours
    from service.engine.pipeline import Engine, GenerationSpec
    from service.image_prompt.served import ServedImagePrompts
    from tests.test_sdxl import denoised_latents

    repo = tmp_path / "ip-adapter"
    vision_folder(repo / "models" / "image_encoder")
    state = published(tiny_pipe.unet, "base", seed=5)
    save_file({f"{part}.{k}": v for part, weights in state.items() for k, v in weights.items()},
              repo / "models" / "ip-adapter.safetensors")
    rng = np.random.RandomState(1)
    photos = [Image.fromarray((rng.rand(48, 40, 3) * 255).astype(np.uint8)) for _ in range(2)]

    c = copy.deepcopy(tiny_pipe)
    engine = Engine(c.tokenizer, c.text_encoder, c.unet, c.vae, c.scheduler)
    served = ServedImagePrompts.from_files(engine, repo / "models" / "ip-adapter.safetensors", repo / "models" / "image_encoder")
    spec = GenerationSpec(prompt="a red dotted star", steps=4, guidance_scale=5.0, seed=3, num_images=1,
                          image_prompt=served.prompt(photos, scale=0.8))
    ours = denoised_latents(engine, spec)

    pipe = copy.deepcopy(tiny_pipe)
    ddim_like_ours(pipe)
    pipe.load_ip_adapter(str(repo), subfolder="models", weight_name="ip-adapter.safetensors")
    pipe.set_ip_adapter_scale(0.8)
    theirs = pipe("a red dotted star", num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                  latents=engine.initial_latents([3], 64, 64), ip_adapter_image=[photos], output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # Packed conditioning of a row without an image prompt gives the engine's plain noise.
    plain_engine = Engine(*(copy.deepcopy(getattr(tiny_pipe, n)) for n in ("tokenizer", "text_encoder", "unet", "vae", "scheduler")))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([900, 900])
    with_prompt = engine.encode_prompts(["a star", "a star"], image_prompts=[spec.image_prompt, None])
    mixed = engine.predict_noise(latents, t, with_prompt, [(), ()])
    plain = plain_engine.predict_noise(latents, t, plain_engine.encode_prompts(["a star", "a star"]), [(), ()])
    torch.testing.assert_close(mixed[1], plain[1], rtol=0, atol=1e-6)
    assert (mixed[0] - plain[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="serves no image prompts"):
        plain_engine.encode_prompts(["a star"], image_prompts=[spec.image_prompt])


def test_an_image_prompt_travels_in_a_triton_generate_request():
    from service.engine.pipeline import GenerationSpec
    from service.image_prompt.packing import ImagePrompt
    from service.triton import wire

    prompt = ImagePrompt(torch.randn(8, 48), torch.randn(8, 48), 0.6)
    tensors = wire.generate_request(GenerationSpec(prompt="a star", image_prompt=prompt), progress=False, timeout_s=None)
    assert tensors["IMAGE_PROMPT"].shape == (2, 8, 48)
    spec, _, _ = wire.read_generate_request(tensors.get)
    assert torch.equal(spec.image_prompt.tokens, prompt.tokens) and spec.image_prompt.scale == pytest.approx(0.6)
    assert torch.equal(spec.image_prompt.unconditional_tokens, prompt.unconditional_tokens)
    plain = wire.generate_request(GenerationSpec(prompt="a star"), progress=False, timeout_s=None)
    assert "IMAGE_PROMPT" not in plain and wire.read_generate_request(plain.get)[0].image_prompt is None


def test_image_prompts_are_refused_by_name_on_the_triton_wire_not_dropped():
    """The text_encoder part serves the edit loops only; they take no image prompts yet."""
    from service.engine.sampling import Encode
    from service.image_prompt.packing import ImagePrompt
    from service.triton import wire

    prompt = ImagePrompt(torch.zeros(4, 8), torch.zeros(4, 8), 1.0)
    assert "PROMPTS" in wire.encode_call(Encode(["a star"], [()], None, [None]))
    with pytest.raises(ValueError, match="image prompts do not travel to Triton's text_encoder"):
        wire.encode_call(Encode(["a star"], [()], None, [prompt]))
