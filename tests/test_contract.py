"""The proto file is the contract: a client generated from it alone (grpcio-tools) can call Generate,
and the committed stubs match what the proto generates today."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent


def test_client_built_only_from_the_proto_file(gateway, tmp_path):
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main([
        "protoc", f"-I{REPO / 'proto'}", f"-I{well_known}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        str(REPO / "proto/steerserve/v1/steerserve.proto"),
    ])
    assert rc == 0
    client = textwrap.dedent(f"""
        import io, sys, grpc
        sys.path.insert(0, {str(tmp_path)!r})
        from steerserve.v1 import steerserve_pb2 as pb, steerserve_pb2_grpc as rpc
        stub = rpc.SteerServeStub(grpc.insecure_channel({gateway.address!r}))
        resp = stub.Generate(pb.GenerateRequest(prompt="a blue heart", steps=2, seed=5),
                             metadata=[("authorization", "Bearer token-alice")], timeout=120)
        from PIL import Image
        img = Image.open(io.BytesIO(resp.images[0].data))
        print(img.format, img.size)
    """)
    # A separate interpreter that never imports the service package.
    out = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PNG (64, 64)" or out.stdout.startswith("PNG (")


@pytest.mark.parametrize("out, package", [
    ("service/_generated", "service._generated"),
    ("clients/python/steerserve_client/_generated", "steerserve_client._generated"),  # the client's copy
])
def test_committed_stubs_are_up_to_date(tmp_path, out, package):
    out = subprocess.run(
        [sys.executable, "-c", "import service.proto_gen as g, pathlib, sys; "
                               "sys.exit(g.generate(pathlib.Path(sys.argv[1]), sys.argv[2]))",
         str(tmp_path / "gen"), package],
        capture_output=True, text=True, cwd=REPO,
    ), out
    out, folder = out
    assert out.returncode == 0, out.stderr
    for name in ("steerserve_pb2.py", "steerserve_pb2_grpc.py", "steerserve_pb2.pyi"):
        committed = (REPO / folder / "steerserve/v1" / name).read_text()
        assert (tmp_path / "gen/steerserve/v1" / name).read_text() == committed, (
            f"{folder}/steerserve/v1/{name} is stale: run `python -m service.proto_gen`"
        )
