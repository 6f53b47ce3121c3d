"""Untrusted bytes and names: nothing the service reads is unpickled, and no name a client chooses
reaches a filesystem path."""

from __future__ import annotations

import hashlib

import io
import pickle
import re
from pathlib import Path

import pytest
import torch

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.personalize.spec import unpack_checkpoint
from tests.adapter_files import lora_file, served_model_dir
from tests.conftest import auth

SERVICE = Path(__file__).resolve().parent.parent / "service"
# Offline tools that read only their own files (never a client's): the base model's and the
# classifier's training scripts resume from the checkpoints they wrote.
OFFLINE = {SERVICE / "research" / "basemodel" / "train.py", SERVICE / "research" / "measures" / "train_classifier.py"}
UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bdill\.|\bcloudpickle\.|\bjoblib\.load\("), "a pickle library"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle"),
    # torch.load whose call (to the end of its line) does not say weights_only=True.
    (re.compile(r"\btorch\.load\((?![^\n]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
]


def test_serving_code_never_unpickles():
    found = []
    for path in SERVICE.rglob("*.py"):
        if path in OFFLINE or "_generated" in path.parts:
            continue
        text = path.read_text()
        for pattern, what in UNSAFE:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(SERVICE.parent)}:{line}: {what}")
    assert not found, found


class _Payload:
    """Unpickling this would create a file: the test sees whether anything ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"step": 1, "params": {}, "optimizer": _Payload(marker)}, buffer)
    with pytest.raises(pickle.UnpicklingError):
        unpack_checkpoint(buffer.getvalue())
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../escaped", "/etc/passwd", "..\\..\\escaped", "a/../../b", "~root"])
def test_adapter_names_never_become_paths(gateway, name):
    data_dir = Path(gateway.settings.data_dir)
    stub = gateway.stub()
    data = lora_file(served_model_dir(gateway))
    adapter = stub.ImportAdapter(pb.ImportAdapterRequest(name=name, safetensors=data), metadata=auth())
    try:
        assert adapter.name == name  # a label, stored as given
        # Its blob: named by its content hash, inside the data folder.
        sha = adapter.sha256
        blobs = [p for p in data_dir.rglob(f"*{sha}*")]  # (other tests' gateways may hold the same bytes)
        assert len(blobs) == 1 and blobs[0].name == f"{sha}.safetensors"
        assert data_dir / "adapters" in blobs[0].parents
        assert hashlib.sha256(blobs[0].read_bytes()).hexdigest() == sha
        # Nothing named after the label anywhere (outside the data folder or in it).
        assert not [p for p in Path("/").joinpath(data_dir.parent).rglob("*") if "escaped" in p.name]
        assert not (data_dir.parent.parent / "escaped").exists() and not (data_dir.parent / "escaped").exists()
    finally:
        stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=adapter.adapter_id), metadata=auth())
