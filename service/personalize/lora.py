"""Trainable LoRA layers, put on a frozen model for the length of one training job.

    with lora_layers(engine.unet, "unet", ("attn2.to_k", "attn2.to_v"), rank=4, seed=0) as layers:
        ...train [p for l in layers.values() for p in l.parameters()]...
        adapter_lora = to_lora_modules(layers)
    # the model is exactly as before here, whatever happened inside

Layer names are the adapter format's (``unet.<module path>``), found by the same matching the
adapter bank uses (`replace_linears`), so a trained adapter names exactly the layers the bank
serves. Initialisation follows peft/diffusers: A random, B zero, so training starts at the base
model; the update is ``(alpha / r) * B @ A``.

Speed, the same math: on a small model a training step is mostly the cost of launching small
kernels, and a UNet's attention holds dozens of LoRA layers. Each layer's forward and backward is
one autograd Function (`_LoRALinearFn`: three matmuls forward, five back, no per-op autograd
nodes), and while the block is open the projections of an attention that read the same input
(self-attention's q, k, v; cross-attention's k, v) run as one group (`_GroupedLoRAFn`: one base
matmul over the concatenated weights, one down-projection over the concatenated A's, one
block-diagonal up-projection), through `_GroupedAttnProcessor`. The parameters stay one A and one
B per layer under the same names, so checkpoints and the adapter format are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from service.adapters import LoraModule
from service.adapters.bank import replace_linears


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update, kept in float32 whatever the base dtype
    (the update is small: in fp16 most of its gradient would round away)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator, init: str = "gaussian"):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        device = base.weight.device
        a = torch.empty(rank, base.in_features, dtype=torch.float32)
        if init == "gaussian":  # diffusers' training scripts (init_lora_weights="gaussian")
            nn.init.normal_(a, std=1.0 / rank, generator=generator)
        else:  # peft's default: Kaiming-uniform like nn.Linear
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _plain_linear(self.base):  # a Linear subclass or hooked: called as it is
            update = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
            return self.base(x) + (self.scale * update).to(x.dtype)
        # The same, as one Function: F.linear on the base's weight is what nn.Linear runs.
        return _LoRALinearFn.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, float(self.scale))


def _hookless(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose call is exactly F.linear(x, weight, bias)."""
    return type(module) is nn.Linear and _hookless(module)


def _linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """F.linear of x2 [N, in], written into a new [*shape[:-1], out] tensor. Not a view (F.linear of a
    3-D input returns one): a custom Function's output that is a view may not be written in place,
    and hooks do write into a layer's output (service/edit/workbench/rows.py)."""
    out = x2.new_empty(*shape[:-1], weight.shape[0])
    if bias is None:
        torch.mm(x2, weight.t(), out=out.view(-1, weight.shape[0]))
    else:
        torch.addmm(bias, x2, weight.t(), out=out.view(-1, weight.shape[0]))
    return out


def _low_rank_update(out: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scale: float) -> None:
    """out += scale * h @ up.t(), in place ([N, out]); h and up in the LoRA's float32, out in the
    base's dtype."""
    if out.dtype == h.dtype:
        out.addmm_(h, up.t(), alpha=scale)
    else:
        out.add_((scale * (h @ up.t())).to(out.dtype))


def _backward(
    needs: tuple[bool, ...], gy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, h: torch.Tensor,
    weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of y = x @ W.t() + b + s * (xa @ A.t()) @ B.t() for (x, W, b, A, B), each only where
    `needs` says (x, W, b, A, B): gy and x are [N, out] and [N, in] in the base's dtype, xa = x in
    float32, h = xa @ A.t()."""
    need_x, need_w, need_b, need_a, need_up = needs
    g = gy if gy.dtype == up.dtype else gy.to(up.dtype)
    gx = gw = gb = ga = gup = None
    if need_x or need_a:
        gh = g @ up  # [N, r]: the gradient of h, before the scale
        if scale != 1.0:
            gh.mul_(scale)
        if need_x:
            gx = gy @ weight
            if gx.dtype == gh.dtype:
                gx.addmm_(gh, down)
            else:
                gx.add_((gh @ down).to(gx.dtype))
        if need_a:
            ga = gh.t() @ xa
    if need_w:
        gw = gy.t() @ x
    if need_b:
        gb = gy.sum(0)
    if need_up:
        gup = g.t() @ h
        if scale != 1.0:
            gup.mul_(scale)
    return gx, gw, gb, ga, gup


def _lora_forward(ctx, x, weight, bias, down, up, scale):
    """Both Functions' forward: base(x) + s * (x @ A.t()) @ B.t(), saving what `_backward` reads."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xa = x2 if x2.dtype == down.dtype else x2.to(down.dtype)
    h = xa @ down.t()
    out = _linear(x2, weight, bias, shape)
    _low_rank_update(out.view(-1, out.shape[-1]), h, up, scale)
    ctx.save_for_backward(x2, xa, h, weight, down, up)
    ctx.scale, ctx.shape = scale, shape
    return out


class _LoRALinearFn(torch.autograd.Function):
    """y = base(x) + (s * (x.to(A.dtype) @ A.t()) @ B.t()).to(x.dtype). Saves x and h = x @ A.t()
    (rank columns), as autograd would; the base's gradients only when they are asked for."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale):
        return _lora_forward(ctx, x, weight, bias, down, up, scale)

    @staticmethod
    def backward(ctx, gy):
        x2, xa, h, weight, down, up = ctx.saved_tensors
        gx, gw, gb, ga, gup = _backward(ctx.needs_input_grad[:5], gy.reshape(-1, gy.shape[-1]), x2, xa, h,
                                        weight, down, up, ctx.scale)
        return (gx.view(ctx.shape) if gx is not None else None), gw, gb, ga, gup, None


class _GroupedLoRAFn(torch.autograd.Function):
    """k LoRALinears that read the same x, on frozen base Linears, as one: [N, out_1 + .. + out_k] =
    x @ W.t() + b + s * (x @ [A_1; ..; A_k].t()) @ blockdiag(B_1, .., B_k).t(), with W = [W_1; ..; W_k]
    and b = [b_1; ..] the base layers' weights and biases concatenated (`_FrozenConcat`). The zero
    blocks add exact zeros: each column block is its own layer's output, to float rounding.
    Arguments: x, W, b (or None), s, then A_1, B_1, .., A_k, B_k."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, *lora):
        downs, ups = lora[0::2], lora[1::2]
        out = _lora_forward(ctx, x, weight, bias, torch.cat(downs), torch.block_diag(*ups), scale)
        ctx.outs, ctx.ranks = [b.shape[0] for b in ups], [a.shape[0] for a in downs]
        return out

    @staticmethod
    def backward(ctx, gy):
        x2, xa, h, weight, down, up = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need = (needs[0], False, False, any(needs[4::2]), any(needs[5::2]))
        gx, _, _, ga, gup = _backward(need, gy.reshape(-1, gy.shape[-1]), x2, xa, h, weight, down, up, ctx.scale)
        grads: list[torch.Tensor | None] = [gx.view(ctx.shape) if gx is not None else None, None, None, None]
        for i, ((o0, o1), (r0, r1)) in enumerate(zip(_offsets(ctx.outs), _offsets(ctx.ranks))):
            grads.append(ga[r0:r1] if ga is not None and needs[4 + 2 * i] else None)
            grads.append(gup[o0:o1, r0:r1] if gup is not None and needs[5 + 2 * i] else None)
        return tuple(grads)


def _offsets(sizes):
    start = 0
    for size in sizes:
        yield start, start + size
        start += size


class _FrozenConcat:
    """The concatenated weights and biases of a group's base Linears. Kept while the block is open
    when they are small (where a step is launch-bound, the copy would cost a kernel per call),
    concatenated at each call when large (where it is a small part of the matmul's cost, and a
    kept copy would be a second copy of the attention's weights in memory); made again if a base
    tensor changes (its version counter)."""

    KEEP_ELEMENTS = 1 << 20

    def __init__(self):
        self._key, self._value = None, None

    def __call__(self, bases: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tensors = [t for base in bases for t in (base.weight, base.bias) if t is not None]
        key = tuple((id(t), t._version) for t in tensors)
        if key == self._key:
            return self._value
        weight = torch.cat([base.weight for base in bases])
        bias = None
        if any(base.bias is not None for base in bases):
            bias = torch.cat([base.bias if base.bias is not None else base.weight.new_zeros(base.out_features)
                              for base in bases])
        if weight.numel() <= self.KEEP_ELEMENTS:
            self._key, self._value = key, (weight, bias)
        return weight, bias


def _grouped(x: torch.Tensor, layers: Sequence[nn.Module], concat: _FrozenConcat) -> tuple[torch.Tensor, ...]:
    """Each layer's output on x: one `_GroupedLoRAFn` where they are LoRALinears of one scale and
    dtype on frozen plain Linears, without hooks (a hook sees each layer's call); each layer called
    on its own otherwise."""
    if not all(isinstance(layer, LoRALinear) and _hookless(layer) and _plain_linear(layer.base) for layer in layers) or len(
        {(float(layer.scale), layer.base.weight.dtype, layer.lora_A.dtype) for layer in layers}
    ) != 1 or any(t.requires_grad for layer in layers for t in layer.base.parameters()):
        return tuple(layer(x) for layer in layers)
    weight, bias = concat([layer.base for layer in layers])
    out = _GroupedLoRAFn.apply(x, weight, bias, float(layers[0].scale),
                               *[t for layer in layers for t in (layer.lora_A, layer.lora_B)])
    return out.split([layer.base.out_features for layer in layers], dim=-1)


class _GroupedAttnProcessor:
    """diffusers' AttnProcessor2_0, the same computation, with the projections that read one input
    run as a group (`_grouped`): self-attention's to_q, to_k, to_v; cross-attention's to_k, to_v.
    Anything that processor handles beyond a plain attention (a mask, 4-D input, norms) goes to it."""

    def __init__(self, original):
        self.original = original
        self.concat = {"self": _FrozenConcat(), "cross": _FrozenConcat()}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None or hidden_states.ndim != 3 or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch_size = hidden_states.shape[0]
        residual = hidden_states
        if encoder_hidden_states is None:
            query, key, value = _grouped(hidden_states, (attn.to_q, attn.to_k, attn.to_v), self.concat["self"])
        else:
            query = attn.to_q(hidden_states)
            key, value = _grouped(encoder_hidden_states, (attn.to_k, attn.to_v), self.concat["cross"])
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _group_attention(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Puts `_GroupedAttnProcessor` on each diffusers attention of `model` that has LoRA layers
    sharing an input and runs the stock AttnProcessor2_0 on a plain attention (no norms on q, k or
    the cross input, no group or spatial norm); returns (attention, its processor) to restore."""
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return []
    saved = []
    for module in model.modules():
        if not isinstance(module, Attention) or type(getattr(module, "processor", None)) is not AttnProcessor2_0:
            continue
        if any(getattr(module, name, None) is not None
               for name in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross")):
            continue
        shared = (module.to_k, module.to_v) + (() if module.is_cross_attention else (module.to_q,))
        if sum(isinstance(layer, LoRALinear) for layer in shared) < 2:
            continue
        saved.append((module, module.processor))
        module.set_processor(_GroupedAttnProcessor(module.processor))
    return saved


@contextmanager
def lora_layers(
    model: nn.Module, prefix: str, targets: Sequence[str], rank: int, seed: int, alpha: float | None = None,
    init: str = "gaussian",
) -> Iterator[dict[str, LoRALinear]]:
    """Wraps the model's target Linears in LoRALinear for the block; restores them on exit. The
    initial A matrices depend on `seed` alone, so a job's training is reproducible (and a resumed
    job is the same job)."""
    alpha = float(alpha if alpha is not None else rank)
    g = torch.Generator().manual_seed(seed)
    layers = replace_linears(model, prefix, targets, lambda linear: LoRALinear(linear, rank, alpha, g, init))
    if not layers:
        raise ValueError(f"no nn.Linear in {prefix} matches {tuple(targets)}")
    grouped = []
    try:
        grouped = _group_attention(model)
        yield layers  # type: ignore[misc]
    finally:
        for attention, processor in grouped:
            attention.set_processor(processor)
        for name in layers:
            path = name[len(prefix) + 1 :]
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, getattr(parent, child).base)


def to_lora_modules(layers: dict[str, LoRALinear]) -> dict[str, LoraModule]:
    """The adapter format's modules: down = A, up = B, with the layers' alpha (a detached copy)."""
    return {
        name: LoraModule(down=layer.lora_A.detach().cpu().clone(), up=layer.lora_B.detach().cpu().clone(), alpha=layer.alpha)
        for name, layer in layers.items()
    }


def modules_from_parameters(params: dict[str, torch.Tensor], alpha: float) -> dict[str, LoraModule]:
    """The adapter format's modules from tensors named as `parameters` names them (a checkpoint's):
    what `to_lora_modules` gives for the layers those tensors came from."""
    names = sorted({key.rsplit(".", 1)[0] for key in params if key.endswith((".lora_A", ".lora_B"))})
    return {
        name: LoraModule(down=params[f"{name}.lora_A"].detach().cpu().clone(),
                         up=params[f"{name}.lora_B"].detach().cpu().clone(), alpha=float(alpha))
        for name in names
    }


def parameters(layers: dict[str, LoRALinear]) -> dict[str, nn.Parameter]:
    """The trainable tensors by stable name (for the optimizer and checkpoints)."""
    return {f"{name}.{p}": getattr(layer, p) for name, layer in layers.items() for p in ("lora_A", "lora_B")}
