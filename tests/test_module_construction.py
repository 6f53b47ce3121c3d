"""Model loading beside module building, across threads (service/engine/construction.py).

diffusers' from_pretrained replaces process-wide functions while it loads (accelerate's
init_empty_weights: nn.Module.register_parameter; no_init_weights: torch.nn.init). A training
thread that wraps layers in LoRA while another thread loads a base copy must still get real,
initialised parameters: in CI a Triton personalize instance with two training threads failed a job
"Cannot copy out of meta tensor" exactly so."""

import contextlib
import threading

import accelerate
import torch
from torch import nn

from service.engine.default_model import seeded_model_dir
from service.engine.pipeline import Engine
from service.personalize import lora


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_k = nn.Linear(8, 8)


def _lora_a(model: nn.Module, seed: int) -> torch.Tensor:
    with lora.lora_layers(model, "m", ("to_k",), rank=2, seed=seed) as layers:
        return layers["m.to_k"].lora_A.detach().clone()


def test_lora_layers_built_while_another_thread_loads_a_model_are_real(tmp_path, monkeypatch):
    model_dir = seeded_model_dir(tmp_path)
    model = _Attention()  # the frozen model a job wraps, there before the load
    expected = _lora_a(model, seed=3)  # built with no load running
    loading, built = threading.Event(), threading.Event()
    original = accelerate.init_empty_weights

    @contextlib.contextmanager
    def held_open(*args, **kwargs):
        # The load stays inside diffusers' patches until this test's layers are built, or 2 s
        # have passed (then it goes on, and a layer build that waited for it follows).
        with original(*args, **kwargs):
            loading.set()
            built.wait(2)
            yield

    monkeypatch.setattr(accelerate, "init_empty_weights", held_open)
    loaded, errors = [], []

    def load():
        try:
            loaded.append(Engine.from_pretrained(model_dir, components=("unet",)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        assert loading.wait(60), "the load never reached accelerate's init_empty_weights"
        a = _lora_a(model, seed=3)  # while the other thread is inside the load
    finally:
        built.set()
        thread.join(60)
    assert not errors and loaded, errors
    assert a.device.type == "cpu", "a LoRA layer built during another thread's load landed on the meta device"
    torch.testing.assert_close(a, expected, rtol=0, atol=0)  # initialised, not left as torch.empty
    unet = loaded[0].unet
    assert all(p.device.type == "cpu" for p in unet.parameters())
