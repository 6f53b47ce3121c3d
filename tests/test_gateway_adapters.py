"""Adapters through the public API: import (validated against the served model), Generate with one
or several adapters through the bank, delete, and the adapter-cache metrics."""

from __future__ import annotations

import io
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from tests.adapter_files import MODULE, lora_file, served_model_dir
from tests.conftest import auth


def _pixels(resp) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(resp.images[0].data)), dtype=np.int16)


@pytest.fixture(scope="module")
def two_adapters(gateway):
    stub = gateway.stub()
    model_dir = served_model_dir(gateway)
    a = stub.ImportAdapter(pb.ImportAdapterRequest(name="gen-a", safetensors=lora_file(model_dir, seed=1, scale=3)),
                           metadata=auth())
    b = stub.ImportAdapter(pb.ImportAdapterRequest(name="gen-b", safetensors=lora_file(model_dir, seed=2, scale=3)),
                           metadata=auth())
    return a, b


def test_import_reports_what_was_stored(two_adapters):
    a, _ = two_adapters
    assert a.adapter_id.startswith("ad-") and a.rank == 2 and a.num_parameters > 0
    # A LoRA on cross-attention K/V only is what Custom Diffusion trains.
    assert a.method == pb.CUSTOM_DIFFUSION and a.source == "import" and len(a.sha256) == 64


def test_generate_with_adapters_changes_the_image_deterministically(gateway, two_adapters):
    stub = gateway.stub()
    a, b = two_adapters
    base = pb.GenerateRequest(prompt="a red circle", steps=3, seed=9)
    with_a = pb.GenerateRequest(prompt="a red circle", steps=3, seed=9, adapters=[pb.AdapterRef(adapter_id=a.adapter_id)])
    mixed = pb.GenerateRequest(prompt="a red circle", steps=3, seed=9, adapters=[
        pb.AdapterRef(adapter_id=a.adapter_id, weight=0.5), pb.AdapterRef(adapter_id=b.adapter_id, weight=0.5)])
    p_base = _pixels(stub.Generate(base, metadata=auth()))
    p_a = _pixels(stub.Generate(with_a, metadata=auth()))
    p_a_again = _pixels(stub.Generate(with_a, metadata=auth()))
    p_mixed = _pixels(stub.Generate(mixed, metadata=auth()))
    assert np.array_equal(p_a, p_a_again)
    assert np.abs(p_a - p_base).max() > 0
    assert np.abs(p_mixed - p_a).max() > 0
    # Served alone afterwards, the base model is untouched by the adapters that were resident.
    assert np.array_equal(_pixels(stub.Generate(base, metadata=auth())), p_base)


def test_import_refuses_files_the_model_cannot_serve(gateway):
    stub = gateway.stub()
    model_dir = served_model_dir(gateway)
    good = lora_file(model_dir)
    from safetensors.torch import load

    tensors = load(good)
    bad_shape = dict(tensors)
    bad_shape[f"{MODULE}.lora_A.weight"] = torch.randn(2, 7)
    unknown_module = {k.replace("mid_block", "nonexistent_block"): v for k, v in tensors.items()}
    too_high_rank = load(lora_file(model_dir, rank=64))
    nan = dict(tensors)
    nan[f"{MODULE}.lora_B.weight"] = torch.full_like(tensors[f"{MODULE}.lora_B.weight"], float("nan"))
    for name, bad, needle in [
        ("shape", bad_shape, "down/A has shape (2, 7)"),
        ("module", unknown_module, "nonexistent_block"),
        ("rank", too_high_rank, "rank"),
        ("nan", nan, "NaN"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.ImportAdapter(pb.ImportAdapterRequest(name=f"bad-{name}", safetensors=save(bad)), metadata=auth())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert err.value.details().startswith("safetensors:") and needle in err.value.details(), err.value.details()
    names = {a.name for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters}
    assert not any(n.startswith("bad-") for n in names)  # nothing half-stored


def test_duplicate_name_is_already_exists(gateway, two_adapters):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().ImportAdapter(
            pb.ImportAdapterRequest(name="gen-a", safetensors=lora_file(served_model_dir(gateway))), metadata=auth()
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_deleted_adapter_is_gone(gateway):
    stub = gateway.stub()
    ad = stub.ImportAdapter(pb.ImportAdapterRequest(name="temp", safetensors=lora_file(served_model_dir(gateway))),
                            metadata=auth())
    req = pb.GenerateRequest(prompt="x", steps=1, seed=1, adapters=[pb.AdapterRef(adapter_id=ad.adapter_id)])
    stub.Generate(req, metadata=auth())
    stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=ad.adapter_id), metadata=auth())
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req, metadata=auth())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_adapter_cache_metrics_exported(gateway, two_adapters):
    a, _ = two_adapters
    gateway.stub().Generate(pb.GenerateRequest(prompt="x", steps=1, seed=2, adapters=[pb.AdapterRef(adapter_id=a.adapter_id)]),
                            metadata=auth())
    text = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
    for name in ("steerserve_adapter_cache_hits_total", "steerserve_adapter_cache_misses_total",
                 "steerserve_adapter_load_seconds_bucket", "steerserve_adapter_resident"):
        assert name in text, name
