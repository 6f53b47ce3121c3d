"""ImportAdapter tells the caller what it read from the file (issue 36 item 4): the layout, per
model part the layers it changes with their ranks and alphas, and its learned tokens; the CLI
prints it. Built on a kohya/A1111-layout file for the embedded model."""

from __future__ import annotations

import re

import torch
from safetensors.torch import save

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.engine.default_model import default_model_dir
from service.engine.pipeline import Engine
from tests.conftest import auth


def kohya_file(model_cache) -> bytes:
    """kohya's key names: two UNet attention layers of rank 4 / alpha 2 and one text-encoder layer
    of rank 2 without alpha (scale 1), fp16 as kohya saves them."""
    engine = Engine.from_pretrained(default_model_dir(model_cache), components=())
    unet = [n for n, m in engine.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))][:2]
    text = [n for n, m in engine.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj")]
    modules = dict(engine.unet.named_modules()) | {f"te.{n}": m for n, m in engine.text_encoder.named_modules()}
    tensors = {}
    for name, prefix, rank, alpha in [(n, "lora_unet_", 4, 2.0) for n in unet] + [(n, "lora_te_", 2, None) for n in text]:
        layer = modules[name] if prefix == "lora_unet_" else modules[f"te.{name}"]
        key = prefix + re.sub(r"^text_model\.", "text_model.", name).replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features).half()
        tensors[f"{key}.lora_up.weight"] = torch.zeros(layer.out_features, rank).half()
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return save(tensors)


def test_import_reports_what_it_read(gateway, model_cache):
    stub = gateway.stub()
    adapter = stub.ImportAdapter(pb.ImportAdapterRequest(name="kohya-report", safetensors=kohya_file(model_cache)),
                                 metadata=auth())
    c = adapter.contents
    assert "kohya" in c.layout
    parts = {p.component: p for p in c.components}
    assert set(parts) == {"unet", "text_encoder"}
    assert (parts["unet"].modules, list(parts["unet"].ranks), list(parts["unet"].alphas)) == (2, [4], [2.0])
    # No alpha in the file: alpha = rank (scale 1), as kohya and diffusers read it.
    assert (parts["text_encoder"].modules, list(parts["text_encoder"].ranks), list(parts["text_encoder"].alphas)) == (1, [2], [2.0])
    assert parts["unet"].conv_modules == 0 and not c.tokens
    # The stored adapter is one layout; only the import's answer says what the file was.
    assert not stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter.adapter_id), metadata=auth()).HasField("contents")


def test_the_cli_prints_the_import_report(gateway, model_cache, tmp_path, capsys):
    from service import cli

    path = tmp_path / "kohya.safetensors"
    path.write_bytes(kohya_file(model_cache))
    # The API token before `import`, the embedding's word after it: two options both named --token.
    code = cli.main(["adapters", "--address", gateway.address, "--token", "token-alice",
                     "import", str(path), "--name", "kohya-cli", "--token", "sks"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"layout: .*kohya", out)
    assert re.search(r"unet\s+2 modules, rank 4, alpha 2", out)
    assert re.search(r"text_encoder\s+1 modules, rank 2, alpha 2", out)
    assert "token=sks" in out  # the word went to the adapter, the API token authenticated
