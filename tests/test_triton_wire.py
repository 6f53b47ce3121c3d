"""The gateway <-> Triton contract (service/triton/wire.py): every config.pbtxt matches it, and every
message survives the trip both sides make (encode on one side, read through `get` on the other)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.adapters import AdapterBankFull, AdapterNotFoundError
from service.edit import DDS, EditOptions, EditRefused, EditSpec, Edited
from service.engine.pipeline import AdapterUse, GenerationCancelled, GenerationSpec
from service.errors import Busy, InvalidRequest, Unavailable
from service.personalize import FINESTYLE, Concept, TrainingSpec, TrainingStopped
from service.triton import wire

REPO = Path(__file__).resolve().parent.parent / "model_repo"
ENTRY = re.compile(r'\{\s*name:\s*"(\w+)"\s+data_type:\s*TYPE_(\w+)[^}]*?(optional:\s*true)?\s*\}')


def declared(config: str, section: str) -> dict[str, str]:
    body = re.search(section + r"\s*\[(.*?)\n\]", config, re.S).group(1)
    return {name + ("?" if optional else ""): kind for name, kind, optional in ENTRY.findall(body)}


@pytest.mark.parametrize("model", sorted(wire.CONTRACT))
def test_every_model_config_is_the_contract(model):
    for path in [REPO / model / "config.pbtxt", *sorted((REPO / model / "configs").glob("*.pbtxt"))]:
        config = path.read_text()
        assert f'name: "{model}"' in config, path
        assert declared(config, "input") == wire.CONTRACT[model]["inputs"], path
        assert declared(config, "output") == wire.CONTRACT[model]["outputs"], path


def reader(message: wire.Tensors):
    """What either side reads: tensors by name, None when absent (strings arrive as bytes)."""
    return lambda name: message.get(name)


def test_generate_request_and_responses_round_trip():
    uses = (AdapterUse("a" * 64, 0.7), AdapterUse("b" * 64, 1.0, style=True))
    spec = GenerationSpec(prompt="a red star", negative_prompt="blur", steps=7, guidance_scale=5.5, width=64,
                          height=96, seed=3, num_images=2, adapters=uses, style_guidance_scale=2.0,
                          sampler="dpmpp_2m_sde", karras_sigmas=True)
    got, timeout, progress = wire.read_generate_request(reader(wire.generate_request(spec, True, 12.5)))
    assert got == spec and timeout == pytest.approx(12.5) and progress is True
    # A request from a gateway that predates samplers (no SAMPLER, KARRAS_SIGMAS) samples with DDIM.
    old = {k: v for k, v in wire.generate_request(spec, False, None).items() if k not in ("SAMPLER", "KARRAS_SIGMAS")}
    got, _, _ = wire.read_generate_request(reader(old))
    assert (got.sampler, got.karras_sigmas) == ("ddim", False)
    _, timeout, progress = wire.read_generate_request(reader(wire.generate_request(spec, False, None)))
    assert timeout is None and progress is False

    step = wire.read_generate_response(reader(wire.generate_progress(4, 6, 0.003)))
    assert step.step == 4 and step.result is None

    class Step:
        batch_size, queue_seconds = 6, 0.002

    images = np.zeros((2, 8, 8, 3), np.uint8)
    images[1] = 200
    out = wire.read_generate_response(reader(wire.generate_result(images, [3, 4], {"total": 1.5}, [Step(), Step()])))
    assert [np.asarray(i).mean() for i in out.result.images] == [0, 200]
    assert out.result.seeds == [3, 4] and out.result.timings == {"total": 1.5}
    assert out.step_batch_sizes == [6, 6] and out.step_queue_seconds == [0.002, 0.002]


def test_generate_request_with_no_steps_is_invalid():
    spec = GenerationSpec(prompt="x", steps=0)
    with pytest.raises(ValueError, match="STEPS"):
        wire.read_generate_request(reader(wire.generate_request(spec, False, None)))


@pytest.mark.parametrize("sampler, steps, karras, message", [
    ("heun", 10, False, "unknown sampler 'heun'"),
    ("lcm", 60, False, "takes 1 to 50 steps"),
    ("ddim", 10, True, "karras_sigmas: does not apply to sampler 'ddim'"),
])
def test_the_triton_model_refuses_a_sampler_it_cannot_run(sampler, steps, karras, message):
    spec = GenerationSpec(prompt="x", steps=steps, sampler=sampler, karras_sigmas=karras)
    with pytest.raises(ValueError, match=message):
        wire.read_generate_request(reader(wire.generate_request(spec, False, None)))


def test_edit_request_and_responses_round_trip():
    source = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    spec = EditSpec(method=DDS, source=source, source_prompt="a circle", target_prompt="a sks circle",
                    adapter=AdapterUse("c" * 64, 0.8), adapter_method="DREAMBOOTH_LORA", token="sks",
                    class_word="circle", seed=5, options=EditOptions())
    got, timeout, progress = wire.read_edit_request(reader(wire.edit_request(spec, False, 3.0)))
    assert np.array_equal(got.source, source) and timeout == pytest.approx(3.0) and progress is False
    assert {k: v for k, v in vars(got).items() if k != "source"} == {k: v for k, v in vars(spec).items() if k != "source"}

    phase = wire.read_edit_response(reader(wire.edit_progress("dds", 3, 10)), seed=5)
    assert phase.progress == ("dds", 3, 10)
    edited = Edited(image=source, mask=np.ones((64, 64), np.float32), seed=5, timings={"dds": 2.0}, steer_losses=[0.5])
    result = wire.read_edit_response(reader(wire.edit_result(edited)), seed=5).result
    assert np.array_equal(result.image, source) and result.mask.shape == (64, 64) and result.steer_losses == [0.5]
    no_mask = Edited(image=source, mask=None, seed=5, timings={}, steer_losses=[])
    assert wire.read_edit_response(reader(wire.edit_result(no_mask)), seed=5).result.mask is None


def test_training_request_and_responses_round_trip():
    image = Image.fromarray(np.full((32, 48, 3), 90, np.uint8))
    spec = TrainingSpec(method=FINESTYLE, images=[image], token="in zwx style", class_word="", steps=10,
                        learning_rate=1e-3, rank=4, batch_size=2, concepts=[Concept("a star", (1, 2, 20, 30)), Concept("a ring")],
                        style_phrase="in zwx style", extra={"masks": False})
    got, resume = wire.read_training_request(reader(wire.training_request(spec, b"state")))
    assert resume == b"state" and got.concepts == spec.concepts and got.extra == {"masks": False}
    assert np.array_equal(np.asarray(got.images[0]), np.asarray(image))
    assert wire.read_training_request(reader(wire.training_request(spec, None)))[1] is None

    assert wire.read_training_response(reader(wire.training_step(3, 0.25))).loss == 0.25
    checkpoint = wire.read_training_response(reader(wire.training_checkpoint(50, b"ckpt")))
    assert (checkpoint.step, checkpoint.checkpoint) == (50, b"ckpt")
    assert wire.read_training_response(reader(wire.training_result(b"file"))).adapter == b"file"


def test_adapter_rows_round_trip():
    uses = (AdapterUse("k1", 0.5), AdapterUse("k2", 1.25, style=True), AdapterUse("k3", 1.0, tenant="acme"),
            AdapterUse("k4", 0.5, style=True, tenant="acme"))
    assert wire.decode_adapters(wire.encode_adapters(uses)) == uses
    assert wire.decode_adapters(b"") == ()
    # Rows written before the tenant was carried still read (a gateway older than its Triton).
    assert wire.decode_adapters(b'[["k1", 0.5], ["k2", 1.0, 1]]') == (AdapterUse("k1", 0.5), AdapterUse("k2", 1.0, style=True))


@pytest.mark.parametrize("raised, expected", [
    (ValueError("bad shape"), InvalidRequest),
    (AdapterNotFoundError("no adapter 'k'"), AdapterNotFoundError),
    (EditRefused("nothing to steer"), EditRefused),
    (AdapterBankFull("all pinned"), Busy),
    (GenerationCancelled("deadline"), GenerationCancelled),
    (TrainingStopped("stopped"), GenerationCancelled),
])
def test_model_errors_come_back_as_domain_errors(raised, expected):
    message = wire.status_message(raised)
    back = wire.error_from_status(message)
    assert isinstance(back, expected) and str(raised).strip("'") in str(back)


def test_unknown_failures_and_unloaded_models():
    back = wire.error_from_status(wire.status_message(ZeroDivisionError("boom")))
    assert type(back) is RuntimeError and "ZeroDivisionError: boom" in str(back)
    assert isinstance(wire.error_from_status("Request for unknown model: 'unet' is not found"), Unavailable)
    # A BLS error is passed on as it came.
    assert wire.status_message(wire.RemoteError("NOT_FOUND: no adapter 'x'")) == "NOT_FOUND: no adapter 'x'"
