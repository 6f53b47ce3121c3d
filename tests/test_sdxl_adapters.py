"""SDXL adapters served through the bank, each row equal to diffusers with that adapter (issue 35).

On the tiny SDXL folder (bench/model_folders.py): LoRA files written the way diffusers + peft write
them (UNet and both text encoders), a batch of different users' LoRAs in one UNet call, SDXL's
published textual-inversion layout (`clip_l` + `clip_g`), and adapters made for another model
family refused in one line that names both families, leaving nothing loaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save as save_safetensors

from bench.model_folders import sdxl_folder
from bench.reference_adapters import peft_lora, write_reference_lora
from service.adapters import Adapter, AdapterFormatError, BankedAdapters, parse_adapter
from service.adapters.loading import adapter_checker
from service.engine.pipeline import AdapterUse, Engine
from tests.adapter_files import dict_loader

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SIZE = (64, 64)
TIME_IDS = torch.tensor([[64.0, 64, 0, 0, 64, 64]])

def write_sdxl_lora(directory: Path, pipe, rank: int, alpha: float, seed: int) -> Path:
    """A user's SDXL LoRA on the UNet and both text encoders, saved by diffusers' SDXL pipeline."""
    from diffusers import StableDiffusionXLPipeline

    unet, unet_config = peft_lora(pipe.unet, rank, alpha, UNET_TARGETS, seed)
    te, te_config = peft_lora(pipe.text_encoder, rank, alpha, TEXT_ENCODER_TARGETS, seed + 1)
    te2, te2_config = peft_lora(pipe.text_encoder_2, rank, alpha, TEXT_ENCODER_TARGETS, seed + 2)
    StableDiffusionXLPipeline.save_lora_weights(
        str(directory), unet_lora_layers=unet, text_encoder_lora_layers=te, text_encoder_2_lora_layers=te2,
        unet_lora_adapter_metadata=unet_config, text_encoder_lora_adapter_metadata=te_config,
        text_encoder_2_lora_adapter_metadata=te2_config)
    return directory / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sdxl_folder(tmp_path_factory.mktemp("models") / "sdxl-tiny")


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    return pipe


@pytest.fixture(scope="module")
def lora_dirs(reference, tmp_path_factory):
    """Two users' SDXL LoRAs of different ranks and alphas."""
    dirs = {}
    for name, (rank, alpha, seed) in {"a": (4, 8.0, 1), "b": (2, 3.0, 11)}.items():
        dirs[name] = tmp_path_factory.mktemp(f"sdxl_lora_{name}")
        write_sdxl_lora(dirs[name], reference, rank, alpha, seed)
    return dirs


@pytest.fixture(scope="module")
def store(lora_dirs):
    """What the loader serves, by key (tests add theirs)."""
    return {k: parse_adapter(str(d / "pytorch_lora_weights.safetensors")) for k, d in lora_dirs.items()}




@pytest.fixture(scope="module")
def engine(folder, store):
    engine = Engine.from_pretrained(folder)
    BankedAdapters.attach(engine, dict_loader(store), num_slots=4, max_rank=8, registry=CollectorRegistry())
    return engine


def with_adapters(reference, lora_dirs, uses):
    """diffusers' pipeline with these adapters loaded by load_lora_weights (weighted: set_adapters)."""
    pipe = copy.deepcopy(reference)
    if uses:
        for use in uses:
            pipe.load_lora_weights(str(lora_dirs[use.key]), adapter_name=use.key)
        pipe.set_adapters([u.key for u in uses], [u.weight for u in uses])
    return pipe


def diffusers_encode(pipe, prompt: str):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt([prompt], device="cpu", do_classifier_free_guidance=False)
    return embeds, pooled


def _count_calls(module, calls: list):
    return module.register_forward_pre_hook(lambda m, args: calls.append(m))


# -- LoRA per row, one UNet call ---------------------------------------------------------------------


def test_lora_file_covers_unet_and_both_text_encoders(store, folder):
    components = {m.partition(".")[0] for m in store["a"].lora}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    assert {m.alpha for m in store["a"].lora.values()} == {8.0} and store["b"].max_rank == 2
    # The gateway's import check (a bank on the model's skeleton) serves text_encoder_2's LoRA too.
    assert adapter_checker(folder, 8)(store["a"]).lora.keys() == store["a"].lora.keys()


def test_mixed_batch_of_sdxl_loras_equals_diffusers_per_row(engine, reference, lora_dirs):
    """Rows [a, b, base, 0.7 a + 0.5 b]: the conditioning (both text encoders' LoRA) and the noise
    prediction (UNet LoRA) of each row equal diffusers' with that row's adapters alone; the UNet and
    each text encoder run once for the whole batch."""
    rows = [(AdapterUse("a"),), (AdapterUse("b"),), (), (AdapterUse("a", 0.7), AdapterUse("b", 0.5))]
    prompts = ["a photo of a dog on a beach", "an oil painting of a red barn", "a photo of a dog on a beach",
               "a watercolor of a lighthouse"]
    calls = {"unet": [], "text_encoder": [], "text_encoder_2": []}
    handles = [_count_calls(getattr(engine, name), calls[name]) for name in calls]
    try:
        embeds = engine.encode_prompts(prompts, rows, size=SIZE)
        g = torch.Generator().manual_seed(3)
        latents = torch.randn(len(rows), 4, 32, 32, generator=g)
        t = torch.tensor([999, 500, 500, 250])
        noise = engine.predict_noise(latents, t, embeds, rows)
    finally:
        for h in handles:
            h.remove()
    assert {name: len(c) for name, c in calls.items()} == {"unet": 1, "text_encoder": 1, "text_encoder_2": 1}

    tokens, added = engine.family.unpack(embeds)
    base_embeds, base_pooled = diffusers_encode(reference, prompts[0])
    for i, (prompt, uses) in enumerate(zip(prompts, rows)):
        pipe = with_adapters(reference, lora_dirs, uses)
        ref_embeds, ref_pooled = diffusers_encode(pipe, prompt)
        torch.testing.assert_close(tokens[i : i + 1], ref_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(added["text_embeds"][i : i + 1], ref_pooled, rtol=0, atol=1e-5)
        torch.testing.assert_close(added["time_ids"][i : i + 1], TIME_IDS)
        with torch.no_grad():
            ref_noise = pipe.unet(latents[i : i + 1], t[i : i + 1], encoder_hidden_states=ref_embeds,
                                  added_cond_kwargs={"text_embeds": ref_pooled, "time_ids": TIME_IDS}).sample
        torch.testing.assert_close(noise[i : i + 1], ref_noise, rtol=0, atol=1e-4)
        if i == 0:
            # The adapter changes both encoders' columns, the pooled embedding and the noise.
            width = engine.text_encoder.config.hidden_size
            assert (ref_embeds[..., :width] - base_embeds[..., :width]).abs().max() > 1e-3
            assert (ref_embeds[..., width:] - base_embeds[..., width:]).abs().max() > 1e-3
            assert (ref_pooled - base_pooled).abs().max() > 1e-3
            with torch.no_grad():
                plain = reference.unet(latents[:1], t[:1], encoder_hidden_states=ref_embeds,
                                       added_cond_kwargs={"text_embeds": ref_pooled, "time_ids": TIME_IDS}).sample
            assert (ref_noise - plain).abs().max() > 1e-2


# -- SDXL textual inversion -------------------------------------------------------------------------


def sdxl_embedding(n: int, widths=(32, 32), seed: int = 5) -> dict[str, torch.Tensor]:
    """A learned token in SDXL's published layout: one [n, width] tensor per text encoder."""
    g = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(n, widths[0], generator=g), "clip_g": torch.randn(n, widths[1], generator=g)}


def test_sdxl_embedding_parses_to_one_token_vector():
    state = sdxl_embedding(2)
    adapter = parse_adapter(save_safetensors(state), token="<xl-cat>")
    assert list(adapter.token_embeddings) == ["<xl-cat>"] and not adapter.lora
    assert torch.equal(adapter.token_embeddings["<xl-cat>"], torch.cat([state["clip_l"], state["clip_g"]], dim=1))


@pytest.mark.parametrize("state, token, match", [
    ({"clip_l": torch.randn(1, 32)}, "<t>", "clip_l: an SDXL embedding .* clip_g is missing"),
    ({"clip_g": torch.randn(1, 32)}, "<t>", "clip_g: .* clip_l is missing"),
    (sdxl_embedding(1), None, "needs a token name"),
    ({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(3, 32)}, "<t>", "the same number of vectors"),
    ({"clip_l": torch.ones(1, 32, dtype=torch.int32), "clip_g": torch.ones(1, 32, dtype=torch.int32)}, "<t>",
     "not floating-point"),
])
def test_malformed_sdxl_embeddings_are_refused(state, token, match):
    with pytest.raises(AdapterFormatError, match=match):
        parse_adapter(save_safetensors(state), token=token)


def test_sdxl_embedding_equals_diffusers_load_textual_inversion(engine, reference, store, folder):
    token, state = "<xl-cat>", sdxl_embedding(2)
    adapter = parse_adapter(save_safetensors(state), token=token)
    adapter = adapter_checker(folder, 8)(adapter)  # what the gateway's import checks: accepted
    store["ti"] = adapter
    prompt = f"a photo of {token} on a mat"
    embeds = engine.encode_prompts([prompt, prompt], [(AdapterUse("ti"),), ()], size=SIZE)
    tokens, added = engine.family.unpack(embeds)

    pipe = copy.deepcopy(reference)  # diffusers' documented way to load an SDXL embedding
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    ref_embeds, ref_pooled = diffusers_encode(pipe, prompt)
    torch.testing.assert_close(tokens[:1], ref_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(added["text_embeds"][:1], ref_pooled, rtol=0, atol=1e-6)
    # Row 1 names the token as plain text: nothing of row 0's vectors leaks into it (the pooled
    # projection of a batch of 2 differs from one of 1 by kernel rounding alone).
    plain_embeds, plain_pooled = diffusers_encode(reference, prompt)
    assert torch.equal(tokens[1:], plain_embeds)
    torch.testing.assert_close(added["text_embeds"][1:], plain_pooled, rtol=0, atol=1e-6)
    assert (ref_embeds - plain_embeds).abs().max() > 1e-2


# -- adapters made for another family ---------------------------------------------------------------


def _snapshot(bank):
    return {name: (layer.lora_A.clone(), layer.lora_Bt.clone()) for name, layer in bank.layers.items()}


def _assert_refused_leaving_nothing(engine, store, key, adapter, match):
    """Refused by the gateway-side check, the bank and a request, and nothing of it loaded."""
    hook = engine.adapters
    before, resident = _snapshot(hook.bank), hook.manager.resident()
    with pytest.raises(AdapterFormatError, match=match) as caught:
        hook.bank.prepare(adapter)
    assert "\n" not in str(caught.value)
    store[key] = adapter
    try:
        with pytest.raises(AdapterFormatError, match=match):
            engine.encode_prompts(["a photo of <x>"], [(AdapterUse(key),)])
    finally:
        del store[key]
    assert hook.manager.resident() == resident
    after = _snapshot(hook.bank)
    assert all(torch.equal(after[n][0], a) and torch.equal(after[n][1], b) for n, (a, b) in before.items())
    return str(caught.value)


def _lora_file(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()})


# An SD 1.5 cross-attention LoRA module, at SD 1.5's real sizes (320 channels, 768-wide text).
SD15_ATTN2_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def sd1_lora(tiny_pipe, tmp_path_factory):
    """A LoRA of the embedded SD 1.x-architecture model (UNet and text encoder), by diffusers + peft."""
    d = tmp_path_factory.mktemp("sd1_lora")
    return parse_adapter(str(write_reference_lora(d, tiny_pipe.unet, text_encoder=tiny_pipe.text_encoder, seed=3)))


def test_an_sd1_lora_on_sdxl_names_both_families(engine, store, folder, sd1_lora):
    message = _assert_refused_leaving_nothing(
        engine, store, "sd1", sd1_lora, r"made for a model with 32-wide text conditioning .*attn2\.to_[kv] takes 32 "
        r"inputs\); this model is Stable Diffusion XL \(64-wide text conditioning\)")
    with pytest.raises(AdapterFormatError) as gateway:
        adapter_checker(folder, 8)(sd1_lora)
    assert str(gateway.value) == message

    sd15 = {}
    for module in (SD15_ATTN2_K, SD15_ATTN2_K.replace("to_k", "to_v")):
        sd15 |= {f"{module}.lora_A.weight": torch.randn(4, 768), f"{module}.lora_B.weight": torch.randn(320, 4)}
    with pytest.raises(AdapterFormatError, match=r"made for a model with 768-wide text conditioning "
                       r"\(Stable Diffusion 1\.x\?\) .*; this model is Stable Diffusion XL \(64-wide"):
        engine.adapters.bank.prepare(parse_adapter(_lora_file(sd15)))
    # One odd cross-attention module is a damaged file, not another family: the module is named.
    one = {k: v for k, v in sd15.items() if ".to_k." in k}
    with pytest.raises(AdapterFormatError, match=rf"^{SD15_ATTN2_K}: not a module this model serves"):
        engine.adapters.bank.prepare(parse_adapter(_lora_file(one)))


@pytest.mark.parametrize("width, guess", [(32, ""), (768, r" \(Stable Diffusion 1\.x\?\)")])
def test_an_sd1_embedding_on_sdxl_names_the_widths_expected(engine, store, width, guess):
    adapter = Adapter(token_embeddings={"<x>": torch.randn(1, width)})
    _assert_refused_leaving_nothing(
        engine, store, "sd1-ti", adapter,
        rf"token '<x>': vectors of shape \(1, {width}\) were made for a model with {width}-wide token "
        rf"embeddings{guess}; this model is Stable Diffusion XL: expected \[n, 64\] \(text_encoder 32 \+ "
        r"text_encoder_2 32 columns; SDXL's layout: a file with clip_l \[n, 32\] and clip_g \[n, 32\]")


@pytest.fixture(scope="module")
def sd1_store():
    return {}


@pytest.fixture(scope="module")
def sd1_engine(tiny_pipe, sd1_store):
    """The embedded SD 1.x-architecture model, served with a bank."""
    c = copy.deepcopy(tiny_pipe)
    engine = Engine(c.tokenizer, c.text_encoder, c.unet, c.vae, c.scheduler)
    BankedAdapters.attach(engine, dict_loader(sd1_store), num_slots=2, max_rank=8, registry=CollectorRegistry())
    return engine


def test_an_sdxl_lora_on_sd1_names_both_families(sd1_engine, sd1_store, store):
    _assert_refused_leaving_nothing(
        sd1_engine, sd1_store, "xl", store["a"],
        r"made for a model with 64-wide text conditioning and a second text encoder \(text_encoder_2\) "
        r"\(Stable Diffusion XL\?\) \(e\.g\. unet\..*attn2\.to_[kv] takes 64 inputs, text_encoder_2\..*\); "
        r"this model is Stable Diffusion 1\.x \(32-wide text conditioning, one text encoder\)")
    from service.research.basemodel import DEFAULT_MODEL_DIR

    # The gateway's import check on the bundled SD 1.x-architecture model (48-wide) says it alike.
    with pytest.raises(AdapterFormatError, match=r"made for a model with 64-wide text conditioning and a second "
                       r"text encoder .*; this model is Stable Diffusion 1\.x \(48-wide text conditioning"):
        adapter_checker(DEFAULT_MODEL_DIR, 8)(store["a"])
    # Only text_encoder_2 LoRA (no UNet modules to measure): the second encoder says it.
    te2_only = Adapter(lora={k: v for k, v in store["a"].lora.items() if k.startswith("text_encoder_2.")})
    with pytest.raises(AdapterFormatError, match=r"made for a model with a second text encoder \(text_encoder_2\) "
                       r"\(Stable Diffusion XL\?\) .*; this model is Stable Diffusion 1\.x \(32-wide text "
                       r"conditioning, one text encoder\)"):
        sd1_engine.adapters.bank.prepare(te2_only)


@pytest.mark.parametrize("widths, guess", [((32, 32), ""), ((768, 1280), r" \(Stable Diffusion XL\?\)")])
def test_an_sdxl_embedding_on_sd1_names_the_width_expected(sd1_engine, sd1_store, widths, guess):
    adapter = parse_adapter(save_safetensors(sdxl_embedding(1, widths)), token="<x>")
    width = sum(widths)
    _assert_refused_leaving_nothing(
        sd1_engine, sd1_store, "xl-ti", adapter,
        rf"token '<x>': vectors of shape \(1, {width}\) were made for a model with {width}-wide token "
        rf"embeddings{guess}; this model is Stable Diffusion 1\.x: expected \[n, 32\]$")
