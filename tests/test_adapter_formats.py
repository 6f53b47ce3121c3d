"""Import/export of diffusers/peft LoRA files, and validation against the bank's modules."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from service.adapters import (
    Adapter,
    AdapterBank,
    AdapterFormatError,
    LoraModule,
    export_diffusers_lora,
    export_textual_inversion,
    parse_adapter,
    serialize_adapter,
    write_diffusers_lora_dir,
)
from bench.reference_adapters import write_reference_lora

Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def lora_file(pipe, tmp_path_factory):
    return write_reference_lora(tmp_path_factory.mktemp("lora"), pipe.unet, rank=4, alpha=8.0, seed=1)


@pytest.fixture(scope="module")
def bank(pipe):
    return AdapterBank(copy.deepcopy(pipe.unet), num_slots=3, max_rank=8, text_encoder=copy.deepcopy(pipe.text_encoder))


def _unet_out(pipe, x, t, ehs):
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=ehs).sample


# ------------------------------------------------------------------------------------------------
# Import


def test_parse_diffusers_file_reads_modules_ranks_and_alpha(lora_file, bank):
    adapter = parse_adapter(str(lora_file))
    # 6 transformer blocks (2 down, 1 mid, 3 up) x attn1/attn2 x q, k, v, out.
    assert len(adapter.lora) == 48 and all(name.startswith("unet.") for name in adapter.lora)
    m = adapter.lora[Q]
    assert m.down.shape == (4, 64) and m.up.shape == (64, 4)
    assert m.alpha == 8.0 and m.scale == 2.0  # lora_alpha from the LoraConfig metadata
    assert parse_adapter(lora_file.read_bytes()).lora[Q].down.equal(m.down)  # bytes == path
    bank.prepare(adapter)  # fits the tiny UNet


def test_key_variants_parse_to_the_same_adapter(lora_file):
    ref = parse_adapter(str(lora_file))
    tensors = load_bytes(lora_file.read_bytes())
    variants = {
        # diffusers' older naming, alpha as per-module tensors (no metadata)
        "lora.down/up + .alpha": {
            **{k.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight"): v
               for k, v in tensors.items()},
            **{k.replace(".lora_A.weight", ".alpha"): torch.tensor(8.0) for k in tensors if "lora_A" in k},
        },
        # peft save_pretrained: no component prefix, base_model.model. instead
        "peft save_pretrained": {k.replace("unet.", "base_model.model.", 1): v for k, v in tensors.items()},
    }
    for name, variant in variants.items():
        parsed = parse_adapter(save_bytes(variant), default_alpha=8.0)
        assert parsed.lora.keys() == ref.lora.keys(), name
        for k, m in ref.lora.items():
            assert parsed.lora[k].down.equal(m.down) and parsed.lora[k].up.equal(m.up), name
            assert parsed.lora[k].scale == m.scale, name


def test_attention_processor_keys_map_to_linear_layers():
    down, up = torch.randn(2, 64), torch.randn(64, 2)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    adapter = parse_adapter(save_bytes({f"{key}.down.weight": down, f"{key}.up.weight": up}))
    assert list(adapter.lora) == ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"]


def test_missing_alpha_means_scale_one_unless_overridden(lora_file):
    tensors = load_bytes(lora_file.read_bytes())  # tensors only: the metadata (alpha) is gone
    assert parse_adapter(save_bytes(tensors)).lora[Q].scale == 1.0
    assert parse_adapter(save_bytes(tensors), default_alpha=2.0).lora[Q].scale == 0.5


def test_alpha_pattern_and_rslora_from_metadata(lora_file):
    tensors = load_bytes(lora_file.read_bytes())
    local = Q.removeprefix("unet.")
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {local: 2}, "unet.use_rslora": True}
    adapter = parse_adapter(save_bytes(tensors, metadata={"lora_adapter_metadata": json.dumps(meta)}))
    assert adapter.lora[Q].scale == pytest.approx(2 / 2)  # alpha 2 / sqrt(4)
    other = Q.replace("to_q", "to_k")
    assert adapter.lora[other].scale == pytest.approx(8 / 2)


# ------------------------------------------------------------------------------------------------
# Refused files: clear errors naming the key


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "not a readable safetensors"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "not a readable safetensors"),
        (save_bytes({f"{Q}.lora_A.weight": torch.randn(4, 64)}), rf"{Q}\.lora_A\.weight: the matching up/B"),
        (save_bytes({f"{Q}.lora_A.weight": torch.randn(4, 64), f"{Q}.lora_B.weight": torch.randn(64, 3)}),
         "rank mismatch"),
        (save_bytes({f"{Q}.lora_magnitude_vector": torch.randn(64)}), "DoRA"),
        (save_bytes({f"{Q}.lora_B.bias": torch.randn(64)}), "unrecognized LoRA key"),
        (save_bytes({f"{Q}.lora_A.weight": torch.randn(4, 64, 3), f"{Q}.lora_B.weight": torch.randn(64, 4)}),
         "expected a 2-D matrix"),
    ],
)
def test_unreadable_or_malformed_files_are_refused(data, match):
    with pytest.raises(AdapterFormatError, match=match):
        parse_adapter(data)


def test_truncated_file_is_refused(lora_file):
    data = lora_file.read_bytes()
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        parse_adapter(data[: len(data) // 2])


def _one_module(down: torch.Tensor, up: torch.Tensor, name: str = Q) -> Adapter:
    return Adapter(lora={name: LoraModule(down=down, up=up, alpha=float(down.shape[0]))})


@pytest.mark.parametrize(
    "adapter, match",
    [
        (_one_module(torch.randn(4, 64), torch.randn(64, 4), Q.replace("attn1.to_q", "ff.net.2")),
         "not a module this model serves"),
        (_one_module(torch.randn(4, 64), torch.randn(64, 4), "unet.no_such.attn1.to_q"),
         "not a module this model serves"),
        (_one_module(torch.randn(16, 64), torch.randn(64, 16)), "rank 16 exceeds the bank's maximum rank 8"),
        (_one_module(torch.randn(4, 32), torch.randn(64, 4)), r"down/A has shape \(4, 32\), expected \[4, 64\]"),
        (_one_module(torch.randn(4, 64), torch.randn(32, 4)), r"up/B has shape \(32, 4\), expected \[64, 4\]"),
        (_one_module(torch.full((4, 64), float("nan")), torch.randn(64, 4)), "NaN or Inf"),
        (_one_module(torch.randint(0, 3, (4, 64)), torch.randint(0, 3, (64, 4))), "not a floating-point"),
        (Adapter(token_embeddings={"<x>": torch.randn(1, 16)}), r"expected \[n, 32\]"),
        (Adapter(), "no LoRA weights and no token embeddings"),
    ],
)
def test_validation_names_the_bad_module(bank, adapter, match):
    with pytest.raises(AdapterFormatError, match=match):
        bank.prepare(adapter)


def test_fp16_overflow_is_caught_in_the_bank_dtype(pipe):
    bank16 = AdapterBank(copy.deepcopy(pipe.unet).half(), num_slots=2, max_rank=4)
    with pytest.raises(AdapterFormatError, match=r"NaN or Inf values \(in torch.float16\)"):
        bank16.prepare(_one_module(torch.full((4, 64), 1e5), torch.randn(64, 4)))


# ------------------------------------------------------------------------------------------------
# Export


def test_export_loads_in_diffusers_with_the_same_effect(pipe, lora_file, tmp_path):
    """Our export of a parsed file == the original file, as diffusers' load_lora_weights sees them."""
    pipe = copy.deepcopy(pipe)
    torch.manual_seed(0)
    x, t, ehs = torch.randn(1, 4, 32, 32), torch.tensor(400), torch.randn(1, 77, 32)
    outs = []
    for directory in (lora_file.parent, tmp_path):
        if directory == tmp_path:
            write_diffusers_lora_dir(parse_adapter(str(lora_file)), str(tmp_path))
        pipe.load_lora_weights(str(directory), adapter_name="a")
        outs.append(_unet_out(pipe, x, t, ehs))
        pipe.unload_lora_weights()
    base = _unet_out(pipe, x, t, ehs)
    assert (outs[0] - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)


def test_export_keeps_mixed_ranks_and_alphas(pipe, tmp_path):
    """Per-module ranks/alphas survive export -> diffusers (rank_pattern / alpha_pattern)."""
    g = torch.Generator().manual_seed(3)
    k = Q.replace("to_q", "to_k")
    adapter = Adapter(lora={
        Q: LoraModule(torch.randn(4, 64, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1, alpha=8.0),
        k: LoraModule(torch.randn(2, 64, generator=g) * 0.1, torch.randn(64, 2, generator=g) * 0.1, alpha=1.0),
    })
    write_diffusers_lora_dir(adapter, str(tmp_path))
    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights(str(tmp_path), adapter_name="mixed")
    for name, ours in adapter.lora.items():
        layer = pipe.unet.get_submodule(name.removeprefix("unet."))
        assert layer.r["mixed"] == ours.rank and layer.scaling["mixed"] == pytest.approx(ours.scale)
        assert layer.lora_A["mixed"].weight.equal(ours.down) and layer.lora_B["mixed"].weight.equal(ours.up)
    assert parse_adapter(export_diffusers_lora(adapter)).lora[k].scale == 0.5  # and back


def test_serialize_roundtrip_keeps_lora_and_tokens_exactly(lora_file):
    adapter = parse_adapter(str(lora_file))
    adapter.token_embeddings["<sks>"] = torch.randn(2, 32)
    back = parse_adapter(serialize_adapter(adapter))
    assert back.lora.keys() == adapter.lora.keys()
    for k, m in adapter.lora.items():
        assert back.lora[k].down.equal(m.down) and back.lora[k].up.equal(m.up) and back.lora[k].scale == m.scale
    assert back.token_embeddings["<sks>"].equal(adapter.token_embeddings["<sks>"])
    # diffusers' textual-inversion file is {token: vectors}, and we read it back too.
    ti = parse_adapter(export_textual_inversion(adapter))
    assert list(ti.token_embeddings) == ["<sks>"] and not ti.lora
    assert parse_adapter(save_bytes({"emb_params": torch.randn(32)}), token="<cat>").token_embeddings["<cat>"].shape == (1, 32)
