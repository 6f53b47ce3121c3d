"""On Triton, a DreamSteerer edit's steered copy (a per-request adapter file the `edit` model writes
for the shared `text_encoder` and `unet` models) leaves those models' banks when its edit ends:
their managers drop it at their next call instead of keeping it in a slot and host memory until it
is evicted (issue 34). Starts the Triton stack of tests/test_triton.py (its module fixtures)."""

from __future__ import annotations

import pytest

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.personalize import FrozenBase
from tests.conftest import auth
from tests.test_edit import edit_request, import_adapters, quick_adapter
from tests.test_triton import model_dir, settings, stack, triton  # noqa: F401 - the Triton stack's fixtures

pytestmark = pytest.mark.system

SHARED = ("text_encoder", "unet")


def banks(triton) -> dict[str, dict[str, float]]:
    """What each shared model's bank holds, from its metrics (updated after each of its calls)."""
    return {model: {what: triton.metric(f"steerserve_triton_adapter_{what}", model)
                    for what in ("resident", "host_cached", "pinned_slots")} for model in SHARED}


def test_a_steered_copy_leaves_the_shared_models_when_its_edit_ends(stack, triton, model_dir):
    stub = stack.stub()
    base = FrozenBase.from_pretrained(model_dir)
    adapter = import_adapters(stub, {"DREAMBOOTH_LORA": quick_adapter(base, "DREAMBOOTH_LORA", steps=6)}, auth(),
                              "triton-steered")["DREAMBOOTH_LORA"]
    stub.Edit(edit_request(adapter, pb.DDS), metadata=auth(), timeout=300)  # the stored adapter, at hand
    before = banks(triton)
    assert before["unet"]["resident"] >= 1

    stub.Edit(edit_request(adapter), metadata=auth(), timeout=300)  # DreamSteerer: steered copy in `unet`
    during = banks(triton)  # after the edit's last unet call, before any call saw that it ended
    assert during["unet"]["host_cached"] == before["unet"]["host_cached"] + 1

    stub.Edit(edit_request(adapter, pb.DDS), metadata=auth(), timeout=300)  # the next calls
    assert banks(triton) == before
