"""The fast LoRA training layers (service/personalize/lora.py) compute the plain LoRA math.

`LoRALinear`'s one-Function forward/backward and the grouped projections of an attention
(`_GroupedAttnProcessor`) are engineering only: forward values and every gradient equal the plain
``base(x) + s * (x @ A.t()) @ B.t()`` through diffusers' stock attention processor, to float
rounding, and a few DreamBooth-LoRA training steps end at the same adapter.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image
from torch import nn

from service.personalize import lora
from service.personalize.lora import LoRALinear, _GroupedAttnProcessor, _GroupedLoRAFn, _LoRALinearFn

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def plain_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The LoRA layer as plain autograd ops (what LoRALinear.forward computed before the Function)."""
    update = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
    return self.base(x) + (self.scale * update).to(x.dtype)


def plain_lora():
    """LoRALinear as plain ops and no grouped attention: the reference path."""
    return [mock.patch.object(LoRALinear, "forward", plain_forward), mock.patch.object(lora, "_group_attention", lambda m: [])]


def randomize_up(layers, seed: int = 1) -> None:
    """B is zero at initialisation (the update would vanish): give it values to test with."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=g))


def test_lora_function_gradcheck():
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    # One layer: x, W, b, A, B all differentiated (float64, finite differences).
    assert torch.autograd.gradcheck(lambda x, w, b, a, up: _LoRALinearFn.apply(x, w, b, a, up, 0.75),
                                    (t(2, 3, 5), t(4, 5), t(4), t(3, 5), t(4, 3)))
    # A group of three layers of one input: x and every A, B (the base is frozen there).
    w, b = torch.randn(4 + 6 + 4, 5, generator=g, dtype=torch.float64), torch.randn(14, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, a1, b1, a2, b2, a3, b3: _GroupedLoRAFn.apply(x, w, b, 1.5, a1, b1, a2, b2, a3, b3),
        (t(2, 3, 5), t(2, 5), t(4, 2), t(2, 5), t(6, 2), t(2, 5), t(4, 2)))


@pytest.mark.parametrize("base_trainable", [False, True])
def test_lora_linear_equals_plain_math(base_trainable):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).requires_grad_(base_trainable)
    layer = LoRALinear(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    randomize_up({"x": layer})
    x = torch.randn(2, 7, 12, requires_grad=True)

    def run(forward):
        for p in (x, *layer.parameters()):
            p.grad = None
        out = forward(layer, x)
        (out.sin() * torch.arange(10.0)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in [("x", x), *layer.named_parameters()] if p.grad is not None}

    out, grads = run(LoRALinear.forward)
    ref_out, ref_grads = run(plain_forward)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads) == {"x", "lora_A", "lora_B"} | ({"base.weight", "base.bias"} if base_trainable else set())
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cross", [False, True])
def test_grouped_attention_equals_stock_processor(cross):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=12 if cross else None, out_bias=True)
    attn.requires_grad_(False)
    attn.set_processor(AttnProcessor2_0())
    model = nn.ModuleDict({"attn": attn})
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    text = torch.randn(2, 5, 12, requires_grad=True) if cross else None

    def run(fast: bool):
        patches = [] if fast else plain_lora()
        for p in patches:
            p.start()
        try:
            with lora.lora_layers(model, "m", TARGETS, rank=4, seed=0) as layers:
                assert isinstance(attn.processor, _GroupedAttnProcessor) == fast
                randomize_up(layers)
                hidden.grad = None
                if text is not None:
                    text.grad = None
                out = attn(hidden, encoder_hidden_states=text)
                (out.cos() * torch.linspace(-1, 1, 16)).sum().backward()
                grads = {n: p.grad.clone() for n, p in lora.parameters(layers).items()}
                grads["hidden"] = hidden.grad.clone()
                if text is not None:
                    grads["text"] = text.grad.clone()
                return out.detach(), grads
        finally:
            for p in patches:
                p.stop()

    out, grads = run(fast=True)
    assert type(attn.processor) is AttnProcessor2_0  # restored on exit
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    ref_out, ref_grads = run(fast=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads) and len(grads) == 8 + 1 + int(cross)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dreambooth_lora_steps_give_the_same_adapter(one_torch_thread):
    """A few steps of the real trainer on the embedded model (with the text-encoder LoRA and
    prior-free, batch 2): the fast layers and the plain LoRA math end at the same adapter."""
    from service.personalize import FrozenBase, TrainingSpec, train
    from service.research.basemodel import DEFAULT_MODEL_DIR
    from service.research.world.heldout import CONCEPTS

    base = FrozenBase.from_pretrained(DEFAULT_MODEL_DIR)
    photos = [Image.fromarray(s.image) for s in CONCEPTS["purple-dotted-heart"].references(2, seed=0)]
    spec = TrainingSpec(method="DREAMBOOTH_LORA", images=photos, token="sks", class_word="heart", steps=4,
                        learning_rate=1e-3, rank=4, batch_size=2, seed=5, train_text_encoder=True)
    fast = train(base, spec)
    patches = plain_lora()
    for p in patches:
        p.start()
    try:
        plain = train(base, spec)
    finally:
        for p in patches:
            p.stop()
    assert set(fast.lora) == set(plain.lora) and any(n.startswith("text_encoder.") for n in fast.lora)
    moved = 0.0
    for name, module in fast.lora.items():
        ref = plain.lora[name]
        assert module.alpha == ref.alpha and module.down.shape == ref.down.shape and module.up.shape == ref.up.shape
        torch.testing.assert_close(module.down, ref.down, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(module.up, ref.up, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, float(module.up.abs().max()))
    assert moved > 1e-3  # the steps did train (B starts at zero)


def test_a_forward_hook_may_write_into_the_output_in_place():
    """The edit workbench's hooks overwrite rows of a LoRA layer's output in place
    (service/edit/workbench/rows.py): the Function's output is a new tensor, not a view, so that
    works, and the gradients are those of the plain ops with the same hook; a hooked layer in an
    attention is not grouped (the hook sees its call)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5).requires_grad_(False), rank=2, alpha=2.0, generator=torch.Generator().manual_seed(0))
    randomize_up({"x": layer})
    x = torch.randn(4, 3, 6, requires_grad=True)

    def base_rows(module, args, output):
        output[0:2] = module.base(args[0][0:2])
        return output

    def run(forward):
        handle = layer.register_forward_hook(base_rows)
        try:
            for p in (x, layer.lora_A, layer.lora_B):
                p.grad = None
            with mock.patch.object(LoRALinear, "forward", forward):
                out = layer(x)
            (out * out).sum().backward()
            return out.detach(), [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
        finally:
            handle.remove()

    out, grads = run(LoRALinear.forward)
    ref_out, ref_grads = run(plain_forward)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(out[0:2], layer.base(x[0:2]).detach())
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)

    attn = Attention(query_dim=16, heads=2, dim_head=8).requires_grad_(False)
    attn.set_processor(AttnProcessor2_0())
    with lora.lora_layers(nn.ModuleDict({"attn": attn}), "m", TARGETS, rank=2, seed=0) as layers:
        seen = []
        handle = layers["m.attn.to_k"].register_forward_hook(lambda m, a, o: seen.append(o.shape))
        attn(torch.randn(1, 4, 16))
        handle.remove()
    assert seen == [torch.Size([1, 4, 16])]
