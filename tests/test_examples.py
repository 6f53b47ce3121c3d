"""The examples in examples/ and the calls docs/clients.md shows, run against a live gateway: the
Python quickstart (generate, train with a progress bar, edit) and async example, the Node example
(grpc-js + proto-loader from the proto), and a grpcurl-style call built only from server reflection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from service.research.world.generator import render
from service.research.world.heldout import CONCEPTS

REPO = Path(__file__).resolve().parent.parent


def _png(array, path: Path) -> str:
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


def _env(gateway, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
    return dict(env, STEERSERVE_ADDRESS=gateway.address, STEERSERVE_TOKEN="token-alice", **extra)


def test_python_quickstart(gateway, tmp_path):
    concept = CONCEPTS["yellow-crescent"]
    photos = [_png(s.image, tmp_path / f"photo-{i}.png") for i, s in enumerate(concept.references(3, seed=0))]
    source = _png(render(concept.edit_sources()[0]).image, tmp_path / "source.png")
    out = subprocess.run([sys.executable, str(REPO / "examples/python/quickstart.py"), *photos, source],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=_env(gateway, STEPS="3", EDIT_STEPS="4"))
    assert out.returncode == 0, out.stderr
    assert "wrote star.png and edited.png" in out.stdout and "training" in out.stderr
    for name in ("star.png", "edited.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_python_async_example(gateway, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "examples/python/concurrent_generate.py"), "3"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env(gateway))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.glob("square-*.png")) == ["square-0.png", "square-1.png", "square-2.png"]


def test_node_example(gateway, tmp_path):
    node_modules = REPO / "examples/node/node_modules/@grpc/grpc-js"
    assert shutil.which("node"), "node is not installed (Node 20: see README)"
    assert node_modules.is_dir(), "examples/node has no node_modules: run scripts/setup.sh --test"
    out = subprocess.run(["node", str(REPO / "examples/node/generate.mjs"), "a red circle", str(tmp_path / "n.png")],
                         capture_output=True, text=True, timeout=120, env=_env(gateway, STEPS="2"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "n.png").read_bytes()[:4] == b"\x89PNG" and "seed 0" in out.stdout
    out = subprocess.run(["node", str(REPO / "examples/node/generate.mjs"), ""], capture_output=True, text=True,
                         timeout=120, env=_env(gateway))
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "prompt" in out.stderr


def test_a_call_built_from_reflection_alone(gateway):
    """What grpcurl does (`grpcurl -d '{"prompt": ...}' ... steerserve.v1.SteerServe/Generate`): the
    service and its messages from server reflection, the request from JSON, no stubs."""
    channel = gateway.channel()
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("steerserve.v1.SteerServe").FindMethodByName("Generate")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse('{"prompt": "a red circle", "seed": "3", "steps": 2}', request_class())
    call = channel.unary_unary("/steerserve.v1.SteerServe/Generate", request_serializer=request_class.SerializeToString,
                               response_deserializer=response_class.FromString)
    response = call(request, metadata=[("authorization", "Bearer token-alice")], timeout=120)
    as_json = json_format.MessageToDict(response)
    assert as_json["seeds"] == ["3"] and as_json["images"][0]["mimeType"] == "image/png"
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)  # no token
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
