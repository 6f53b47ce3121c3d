"""Generate end to end: real gRPC server on loopback, called through the generated stubs."""

from __future__ import annotations

import io
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from tests.conftest import auth


def _decode(image: pb.Image) -> np.ndarray:
    assert image.mime_type == "image/png"
    assert image.data[:8] == b"\x89PNG\r\n\x1a\n"
    pil = Image.open(io.BytesIO(image.data))
    assert pil.format == "PNG" and pil.mode == "RGB"
    assert (pil.width, pil.height) == (image.width, image.height)
    return np.asarray(pil)


def test_generate_returns_png_of_requested_size(gateway):
    stub = gateway.stub()
    resp = stub.Generate(
        pb.GenerateRequest(prompt="a red circle on a blue background", width=48, height=64, steps=3, seed=7),
        metadata=auth(),
    )
    assert len(resp.images) == 1
    pixels = _decode(resp.images[0])
    assert pixels.shape == (64, 48, 3)
    assert pixels.std() > 0  # an image, not a blank
    assert list(resp.seeds) == [7]
    assert resp.timings.total_seconds > 0 and resp.timings.denoise_seconds > 0


def test_same_seed_same_bytes_different_seed_differs(gateway):
    stub = gateway.stub()
    req = pb.GenerateRequest(prompt="a green star", steps=3, seed=123)
    a = stub.Generate(req, metadata=auth()).images[0].data
    b = stub.Generate(req, metadata=auth()).images[0].data
    req.seed = 124
    c = stub.Generate(req, metadata=auth()).images[0].data
    assert a == b
    assert a != c


def test_num_images_uses_consecutive_seeds(gateway):
    stub = gateway.stub()
    many = stub.Generate(pb.GenerateRequest(prompt="a yellow square", steps=2, seed=10, num_images=2), metadata=auth())
    assert list(many.seeds) == [10, 11]
    single = stub.Generate(pb.GenerateRequest(prompt="a yellow square", steps=2, seed=11), metadata=auth())
    # Image i of a batch is the same image as a one-image request with seed + i (up to rounding of
    # batched vs single matmuls).
    diff = np.abs(_decode(many.images[1]).astype(int) - _decode(single.images[0]).astype(int))
    assert diff.max() <= 2
    assert not np.array_equal(_decode(many.images[0]), _decode(many.images[1]))


def test_unset_seed_is_random_and_reported(gateway):
    stub = gateway.stub()
    a = stub.Generate(pb.GenerateRequest(prompt="a ring", steps=1), metadata=auth())
    b = stub.Generate(pb.GenerateRequest(prompt="a ring", steps=1), metadata=auth())
    assert a.seeds[0] != b.seeds[0]


def test_deadline_is_honoured(gateway):
    stub = gateway.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="a heart", steps=150, seed=1), metadata=auth(), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server is still healthy and serving afterwards.
    ok = stub.Generate(pb.GenerateRequest(prompt="a heart", steps=1, seed=1), metadata=auth())
    assert len(ok.images) == 1


def test_server_info(gateway):
    info = gateway.stub().GetServerInfo(pb.GetServerInfoRequest(), metadata=auth())
    assert info.backend == "inprocess"
    assert info.base_model
    assert info.default_width >= 32 and info.max_steps == gateway.settings.max_steps
    # The defaults a request may leave to the server: the served model's profile.
    from service.profiles import WORLD

    assert info.profile.name == WORLD.name and info.profile.chosen_by == "model folder"
    by_method = {pb.PersonalizationMethod.Name(d.method): d for d in info.profile.training}
    assert set(by_method) == set(WORLD.training)
    assert by_method["DREAMBOOTH_LORA"].steps == WORLD.training["DREAMBOOTH_LORA"].steps
    assert by_method["DREAMBOOTH_LORA"].source
    assert info.profile.edit_guidance_scale == WORLD.edit["guidance_scale"]


def test_metrics_after_calls(gateway):
    stub = gateway.stub()
    stub.Generate(pb.GenerateRequest(prompt="a blue cross", steps=2, seed=1), metadata=auth())
    with pytest.raises(grpc.RpcError):
        stub.Generate(pb.GenerateRequest(prompt=""), metadata=auth())
    text = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
    assert 'steerserve_rpc_requests_total{code="OK",method="Generate"}' in text
    assert 'steerserve_rpc_requests_total{code="INVALID_ARGUMENT",method="Generate"}' in text
    assert 'steerserve_rpc_duration_seconds_bucket{le="0.005",method="Generate"}' in text
    assert "steerserve_rpc_in_flight_requests" in text

    def value(name: str) -> float:
        line = next(l for l in text.splitlines() if l.startswith(name + " "))
        return float(line.split()[1])

    assert value("steerserve_images_generated_total") >= 1
    assert value("steerserve_denoising_steps_total") >= 2
