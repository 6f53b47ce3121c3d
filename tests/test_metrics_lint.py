"""The /metrics output is clean under `promtool check metrics` (names, units, types)."""

from __future__ import annotations

import subprocess
import urllib.request

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from tests.conftest import auth, required_tool


def test_promtool_check_metrics(gateway):
    promtool = required_tool("promtool")
    gateway.stub().Generate(pb.GenerateRequest(prompt="a ring", steps=1, seed=1), metadata=auth())
    text = urllib.request.urlopen(gateway.metrics_url, timeout=10).read()
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()
    assert b"steerserve_rpc_duration_seconds" in text
