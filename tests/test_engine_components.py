"""An engine that loads only the components it needs (Triton's text_encoder and vae_decode
instances) computes exactly what the full engine does, adapters included, and holds no memory for
the rest (they stay on the meta device: config and layer names only)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from bench.reference_adapters import write_reference_lora
from service.adapters import BankedAdapters, parse_adapter
from service.engine.default_model import default_model_dir
from service.engine.pipeline import AdapterUse, Engine


@pytest.fixture(scope="module")
def model_dir(model_cache):
    return default_model_dir(model_cache)


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type != "meta")


def test_a_text_encoder_only_engine_encodes_as_the_full_one_with_adapters(model_dir, tmp_path):
    full = Engine.from_pretrained(model_dir)
    text = Engine.from_pretrained(model_dir, components=("text_encoder",))
    assert _bytes(text.unet) == 0 and _bytes(text.vae) == 0 and _bytes(text.text_encoder) == _bytes(full.text_encoder)
    assert text.facts == full.facts  # the loop's facts come from the configs
    # A LoRA on the UNet AND the text encoder: the text half applies, the UNet half loads into meta slots.
    path = write_reference_lora(tmp_path, copy.deepcopy(full.unet), rank=4, alpha=4.0, seed=1, std=0.1,
                                text_encoder=copy.deepcopy(full.text_encoder))
    adapter = parse_adapter(str(path))
    assert any(k.startswith("text_encoder.") for k in adapter.lora) and any(k.startswith("unet.") for k in adapter.lora)
    for engine in (full, text):
        BankedAdapters.attach(engine, lambda key: adapter, num_slots=3, max_rank=8, max_rows=8,
                              registry=CollectorRegistry())
    assert text.adapters.bank.device.type == "cpu"
    rows = [(AdapterUse("mine"),), ()]
    prompts = ["a red circle", "a blue square"]
    with full.adapters.hold(rows), text.adapters.hold(rows):
        want, got = full.encode_prompts(prompts, rows), text.encode_prompts(prompts, rows)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(want[0], full.encode_prompts(prompts[:1])[0])  # the adapter changed row 0


def test_a_vae_only_engine_decodes_as_the_full_one(model_dir):
    full = Engine.from_pretrained(model_dir)
    vae = Engine.from_pretrained(model_dir, components=("vae",))
    assert _bytes(vae.unet) == 0 and _bytes(vae.text_encoder) == 0
    latents = torch.randn(2, full.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(vae.decode_array(latents), full.decode_array(latents))
    with pytest.raises(ValueError, match="unknown components"):
        Engine.from_pretrained(model_dir, components=("vae", "safety_checker"))
