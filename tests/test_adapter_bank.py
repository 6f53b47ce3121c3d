"""The bank serves a different adapter per batch row, like diffusers serves each adapter alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from service.adapters import (
    Adapter,
    AdapterBank,
    AdapterFormatError,
    BankedAdapters,
    LoraModule,
    PromptEncoder,
    parse_adapter,
)
from bench.reference_adapters import write_reference_lora

ATOL = 1e-4  # the bar for fp32; observed differences are ~2e-6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def lora_dirs(pipe, tmp_path_factory):
    """Three users' adapters: different ranks and alphas; "b" also trains the text encoder."""
    specs = {
        "a": dict(rank=4, alpha=8.0, seed=1),
        "b": dict(rank=2, alpha=3.0, seed=2, text_encoder=pipe.text_encoder),
        "c": dict(rank=8, alpha=4.0, seed=3),
    }
    dirs = {}
    for name, kw in specs.items():
        d = tmp_path_factory.mktemp(f"lora_{name}")
        write_reference_lora(d, pipe.unet, std=0.1, **kw)
        dirs[name] = d
    return dirs


@pytest.fixture(scope="module")
def adapters(lora_dirs):
    return {k: parse_adapter(str(d / "pytorch_lora_weights.safetensors")) for k, d in lora_dirs.items()}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 32, 32, generator=g), torch.tensor(500), torch.randn(2, 77, 32, generator=g)


def _run(unet, x, t, ehs):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ehs).sample


def diffusers_reference(pipe, lora_dirs, names, weights, x, t, ehs):
    """The UNet output with diffusers' load_lora_weights + set_adapters for these adapters alone."""
    pipe = copy.deepcopy(pipe)
    for name in names:
        pipe.load_lora_weights(str(lora_dirs[name]), adapter_name=name)
    pipe.set_adapters(list(names), adapter_weights=list(weights))
    return _run(pipe.unet, x, t, ehs)


def unet_part(adapter: Adapter) -> Adapter:
    # A UNet-only bank refuses text-encoder modules (it could not apply them), so tests that
    # compare UNet outputs load just the UNet half of "b".
    return Adapter(lora={k: v for k, v in adapter.lora.items() if k.startswith("unet.")})


@pytest.fixture(scope="module")
def banked(pipe, adapters):
    """A banked copy of the UNet with a in slot 1, b in slot 2, c in slot 3."""
    unet = copy.deepcopy(pipe.unet)
    bank = AdapterBank(unet, num_slots=5, max_rank=8)
    for slot, name in enumerate("abc", start=1):
        bank.load_slot(slot, unet_part(adapters[name]))
    return unet, bank


def test_slot_zero_is_the_base_model_bit_exact(pipe, banked, inputs):
    unet, bank = banked
    x, t, ehs = inputs
    plain = _run(pipe.unet, x, t, ehs)
    assert torch.equal(_run(unet, x, t, ehs), plain)  # outside activate(): every row is base
    with bank.activate([[0], []]):
        assert torch.equal(_run(unet, x, t, ehs), plain)


def test_mixed_batch_matches_diffusers_per_row(pipe, lora_dirs, banked, inputs):
    """One call, rows [a, b, c, base] as CFG pairs == diffusers with each adapter alone."""
    unet, bank = banked
    x, t, ehs = inputs
    # [uncond rows; cond rows] like the engine's CFG batch: row i and i+4 are one request's pair.
    xs = torch.cat([x[:1]] * 4 + [x[1:]] * 4)
    es = torch.cat([ehs[:1]] * 4 + [ehs[1:]] * 4)
    with bank.activate([[1], [2], [3], []], repeat=2):
        out = _run(unet, xs, t, es)
    for i, name in enumerate("abc"):
        ref = diffusers_reference(pipe, lora_dirs, [name], [1.0], x, t, ehs)
        assert (ref - _run(pipe.unet, x, t, ehs)).abs().max() > 1e-2  # the adapter changes the output
        torch.testing.assert_close(out[[i, i + 4]], ref, rtol=0, atol=ATOL)
    # The base row differs from a batch-2 call only by batch-size-dependent kernel rounding.
    torch.testing.assert_close(out[[3, 7]], _run(pipe.unet, x, t, ehs), rtol=0, atol=1e-5)


def test_weighted_mix_matches_diffusers_set_adapters(pipe, lora_dirs, banked, inputs):
    unet, bank = banked
    x, t, ehs = inputs
    with bank.activate([[(1, 0.7), (3, 0.5)]] * 2):
        out = _run(unet, x, t, ehs)
    ref = diffusers_reference(pipe, lora_dirs, ["a", "c"], [0.7, 0.5], x, t, ehs)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_row_in_a_batch_equals_the_request_alone(banked, inputs):
    unet, bank = banked
    x, t, ehs = inputs
    xs, es = x.repeat(3, 1, 1, 1), ehs.repeat(3, 1, 1)
    with bank.activate([[1], [1], [2], [2], [3], [3]]):
        batch = _run(unet, xs, t, es)
    for i, slot in enumerate((1, 2, 3)):
        with bank.activate([[slot], [slot]]):
            alone = _run(unet, x, t, ehs)
        torch.testing.assert_close(batch[2 * i : 2 * i + 2], alone, rtol=0, atol=1e-5)


def test_lower_rank_is_zero_padded_exactly(pipe, adapters, banked, inputs):
    """Rank 2 in a max-rank-8 bank: the stored slot is the adapter plus exact zeros, and the output
    equals a bank of max rank 2 up to the matmul kernels' rounding for a different inner size."""
    unet, bank = banked
    x, t, ehs = inputs
    for name, lora in unet_part(adapters["b"]).lora.items():
        layer = bank.layers[name]
        assert torch.equal(layer.lora_A[2, :2], lora.down) and not layer.lora_A[2, 2:].any()
        assert torch.equal(layer.lora_Bt[2, :2], (lora.up * lora.scale).T) and not layer.lora_Bt[2, 2:].any()
    exact = AdapterBank(tight := copy.deepcopy(pipe.unet), num_slots=2, max_rank=2)
    exact.load_slot(1, unet_part(adapters["b"]))
    with exact.activate([[1], [1]]):
        ref = _run(tight, x, t, ehs)
    with bank.activate([[2], [2]]):
        torch.testing.assert_close(_run(unet, x, t, ehs), ref, rtol=0, atol=1e-5)


def test_refused_adapter_leaves_the_slot_untouched(pipe, adapters):
    unet = copy.deepcopy(pipe.unet)
    bank = AdapterBank(unet, num_slots=2, max_rank=8)
    bank.load_slot(1, adapters["a"])
    before = {n: (l.lora_A[1].clone(), l.lora_Bt[1].clone()) for n, l in bank.layers.items()}
    # Valid modules first, one bad module last: nothing of it may land in the slot.
    bad = Adapter(lora=dict(adapters["c"].lora))
    last = sorted(bad.lora)[-1]
    bad.lora[last] = LoraModule(torch.randn(8, 64), torch.full((64, 8), float("inf")), 4.0)
    with pytest.raises(AdapterFormatError, match=last):
        bank.load_slot(1, bad)
    for n, layer in bank.layers.items():
        assert torch.equal(layer.lora_A[1], before[n][0]) and torch.equal(layer.lora_Bt[1], before[n][1])


def test_swaps_and_routing_write_in_place(pipe, adapters, inputs):
    """Hot swap = copy into preallocated tensors: no tensor a compiled graph holds is replaced."""
    unet = copy.deepcopy(pipe.unet)
    bank = AdapterBank(unet, num_slots=3, max_rank=8)
    tensors = [bank.state.slot_ids, bank.state.weights]
    tensors += [t for layer in bank.layers.values() for t in (layer.lora_A, layer.lora_Bt)]
    ptrs = [t.data_ptr() for t in tensors]
    x, t, ehs = inputs
    for name in ("a", "c", "b"):
        bank.load_slot(1, unet_part(adapters[name]))
        with bank.activate([[1], [(1, 0.5)]]):
            _run(unet, x, t, ehs)
    current = [bank.state.slot_ids, bank.state.weights]
    current += [t for layer in bank.layers.values() for t in (layer.lora_A, layer.lora_Bt)]
    assert [t.data_ptr() for t in current] == ptrs
    assert all(a is b for a, b in zip(current, tensors))


def test_activate_rejects_bad_routing(banked):
    _, bank = banked
    with pytest.raises(ValueError, match="out of range"):
        with bank.activate([[5]]):
            pass
    with pytest.raises(ValueError, match="mixes 5 adapters"):
        with bank.activate([[1, 2, 3, 1, 2]]):
            pass
    with pytest.raises(ValueError, match="65 rows exceed the bank's max_rows 64"):
        with bank.activate([[1]] * 65):
            pass
    with pytest.raises(ValueError, match="slot 0 is the base model"):
        bank.load_slot(0, Adapter())


# ------------------------------------------------------------------------------------------------
# Text encoder: LoRA through the bank, textual inversion per row


def test_text_encoder_lora_matches_diffusers(pipe, lora_dirs, adapters):
    te = copy.deepcopy(pipe.text_encoder)
    bank = AdapterBank(copy.deepcopy(pipe.unet), num_slots=3, max_rank=8, text_encoder=te)
    bank.load_slot(2, adapters["b"])
    encoder = PromptEncoder(pipe.tokenizer, te)
    prompts = ["a photo of a dog", "a red house"]
    with bank.activate([[2], []]):
        ours = encoder.encode(prompts)
    ref_pipe = copy.deepcopy(pipe)
    ref_pipe.load_lora_weights(str(lora_dirs["b"]), adapter_name="b")
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ref_pipe.text_encoder(ids)[0]
        plain = pipe.text_encoder(ids)[0]
    assert (ref[0] - plain[0]).abs().max() > 1e-2
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1], plain[1], rtol=0, atol=0)


def test_textual_inversion_per_row_matches_diffusers_and_leaks_nothing(pipe):
    g = torch.Generator().manual_seed(5)
    sks, cat = torch.randn(1, 32, generator=g), torch.randn(3, 32, generator=g)  # 1- and 3-vector tokens
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    vocab_size = len(pipe.tokenizer)
    prompts = ["a photo of <sks> dog", "a photo of <sks> dog", "<cat-v2> on a mat, <cat-v2>!"]
    ours = encoder.encode(prompts, [{"<sks>": sks}, {}, {"<cat-v2>": cat}])

    ref_pipe = copy.deepcopy(pipe)
    ref_pipe.load_textual_inversion({"<sks>": sks[0]}, token="<sks>")
    ref_pipe.load_textual_inversion({"<cat-v2>": cat}, token="<cat-v2>")
    with torch.no_grad():
        ref = ref_pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        plain = pipe.encode_prompt(prompts[1:2], "cpu", 1, False)[0]
    torch.testing.assert_close(ours[[0, 2]], ref[[0, 2]], rtol=0, atol=1e-6)
    # Row 1 names "<sks>" as plain text: no vector leaks from row 0; shared weights untouched.
    torch.testing.assert_close(ours[1], plain[0], rtol=0, atol=0)
    assert len(pipe.tokenizer) == vocab_size and pipe.text_encoder.get_input_embeddings().num_embeddings == 49408
    ids, mask, vectors = encoder.tokenize(["a photo of a dog"])
    ref_ids = pipe.tokenizer(["a photo of a dog"], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.tolist() == ref_ids and not mask.any() and vectors.shape == (0, 32)


# ------------------------------------------------------------------------------------------------
# End to end through the engine


def _generate_batch(engine, specs):
    """Several requests in one batch with the engine's own steps (what a batching backend does)."""
    rows = [tuple(s.adapters) for s in specs]
    embeds = engine.encode_prompts([s.negative_prompt for s in specs] + [s.prompt for s in specs], rows + rows)
    latents = engine.initial_latents([s.seed for s in specs], specs[0].height, specs[0].width)
    scheduler = engine.new_scheduler(specs[0].steps)
    for t in scheduler.timesteps:
        noise = engine.predict_noise_cfg(latents, t, embeds, specs[0].guidance_scale, rows)
        latents = scheduler.step(noise, t, latents).prev_sample
    return engine.decode(latents)


@pytest.mark.slow
def test_engine_batch_of_different_adapters_matches_diffusers_and_alone(pipe, lora_dirs):
    from service.engine.pipeline import AdapterUse, Engine, GenerationSpec

    c = copy.deepcopy(pipe)
    engine = Engine(c.tokenizer, c.text_encoder, c.unet, c.vae, c.scheduler)
    files = {k: d / "pytorch_lora_weights.safetensors" for k, d in lora_dirs.items()}
    hook = BankedAdapters.attach(
        engine, lambda key: parse_adapter(str(files[key])), num_slots=4, max_rank=8, registry=CollectorRegistry()
    )
    specs = [
        GenerationSpec(prompt="a photo of a dog", steps=4, seed=11, adapters=(AdapterUse("a"),)),
        GenerationSpec(prompt="a photo of a dog", steps=4, seed=11, adapters=(AdapterUse("b"),)),
        GenerationSpec(prompt="a red house", steps=4, seed=12),
        GenerationSpec(prompt="a red house", steps=4, seed=12, adapters=(AdapterUse("a", 0.5), AdapterUse("c"))),
    ]
    batch = [np.asarray(im, dtype=np.int16) for im in _generate_batch(engine, specs)]
    for spec, image in zip(specs, batch):
        alone = np.asarray(engine.generate(spec).images[0], dtype=np.int16)
        assert np.abs(image - alone).max() <= 1, spec  # uint8 rounding of ~1e-6 differences

        ref_pipe = copy.deepcopy(pipe)
        if spec.adapters:
            for use in spec.adapters:
                ref_pipe.load_lora_weights(str(lora_dirs[use.key]), adapter_name=use.key)
            ref_pipe.set_adapters([u.key for u in spec.adapters], [u.weight for u in spec.adapters])
        latents = engine.initial_latents([spec.seed], 64, 64)
        ref = ref_pipe(spec.prompt, num_inference_steps=4, guidance_scale=spec.guidance_scale,
                       latents=latents, output_type="np").images[0]
        assert np.abs(image - np.round(ref * 255)).max() <= 1, spec
    assert hook.manager.metrics.misses.labels(source="store")._value.get() == 3


# ------------------------------------------------------------------------------------------------
# torch.compile: swapping adapters does not recompile


@pytest.mark.slow
def test_compiled_unet_does_not_recompile_on_swap(pipe, adapters, inputs):
    import torch._dynamo

    torch._dynamo.reset()
    unet = copy.deepcopy(pipe.unet)
    bank = AdapterBank(unet, num_slots=3, max_rank=8)
    unet.compile()
    x, t, ehs = inputs
    bank.load_slot(1, adapters["a"])
    with bank.activate([[1], [0]]):
        _run(unet, x, t, ehs)  # the one compile
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        bank.load_slot(1, adapters["c"])  # hot swap into a slot in use by the graph
        bank.load_slot(2, unet_part(adapters["b"]))
        with bank.activate([[(2, 0.5), 1], [2]]):
            out = _run(unet, x, t, ehs)
        out_base = _run(unet, x, t, ehs)  # outside activate: base model, still the same graph
    finally:
        torch._dynamo.config.error_on_recompile = old
    ref_unet = copy.deepcopy(pipe.unet)
    ref_bank = AdapterBank(ref_unet, num_slots=3, max_rank=8)
    ref_bank.load_slot(1, adapters["c"])
    ref_bank.load_slot(2, unet_part(adapters["b"]))
    with ref_bank.activate([[(2, 0.5), 1], [2]]):
        torch.testing.assert_close(out, _run(ref_unet, x, t, ehs), rtol=0, atol=ATOL)
    torch.testing.assert_close(out_base, _run(pipe.unet, x, t, ehs), rtol=0, atol=ATOL)
    torch._dynamo.reset()
