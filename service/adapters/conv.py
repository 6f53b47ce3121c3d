"""Conv2d layers of the adapter bank: a different conv LoRA per batch row, in one call.

A conv LoRA (kohya's 1x1 ``proj_in``/``proj_out``, LyCORIS LoCon's 3x3 resnet convs) is

    y = base(x) + scale * up(down(x))

with ``down`` a conv of the layer's own kernel, stride, padding and dilation ([r, in, kh, kw]) and
``up`` a 1x1 conv ([out, r]), as peft's Conv2d LoRA and LyCORIS compute it. A ``BankedLoRAConv2d``
holds S zero-padded slots of both, like ``BankedLoRALinear``: ``lora_A`` [S, r, in] for a 1x1 layer,
[S, r, kh, kw, in] for a k x k one (the kernel taps before the input channels, so one row's K
adapters gather into a single matrix), and ``lora_Bt`` [S, r, out] with the scale folded in. Per
row, the K slots routed by the shared ``BankState`` are applied at once, no loop over adapters:

    P    = A_row @ x_row             one bmm: [K*r*taps, in] x [in, pixels], every row
    down = sum over taps of pad(P)'s tap window, shifted and strided as the conv's kernel reads
    y    = base(x) + Bt_row^T @ (down * weights)                    one more bmm

For a 1x1 layer P is ``down`` itself. This is the conv computed tap by tap as matrix products
(exactly what a conv sums), which keeps every shape static but the rows: the batch stays a dynamic
graph axis for ONNX/TensorRT (a grouped conv with one group per row could not, a conv's group count
is a constant there). Slot 0 is all zeros, so a row routed there adds exact zeros to the unchanged
base conv: the base model bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.construction import MODULE_CONSTRUCTION


def bankable_conv(module: nn.Module) -> bool:
    """Whether the bank can serve a LoRA on ``module``: a plain 2-D conv (no groups, zero padding
    given in pixels), which every conv of the Stable Diffusion UNets is."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


class BankedLoRAConv2d(nn.Module):
    """A Conv2d layer plus a per-row mixture of LoRA slots. Reads slots; never decides residency."""

    def __init__(self, base: nn.Conv2d, num_slots: int, max_rank: int, state):
        super().__init__()
        if not bankable_conv(base):
            raise ValueError(f"cannot bank {base}: grouped, non-zero or 'same'/'valid' padding")
        self.base = base
        self.state = state  # the bank's BankState, shared by all layers (not a submodule)
        self.max_rank = max_rank
        w = base.weight
        like = dict(dtype=w.dtype, device=w.device)
        kh, kw = base.kernel_size
        self.pointwise = (kh, kw) == (1, 1) and tuple(base.padding) == (0, 0)
        a_shape = (num_slots, max_rank, base.in_channels) if self.pointwise else (num_slots, max_rank, kh, kw, base.in_channels)
        # Non-persistent, as BankedLoRALinear's: the UNet's state_dict stays the plain base model's.
        self.register_buffer("lora_A", torch.zeros(a_shape, **like), persistent=False)
        self.register_buffer("lora_Bt", torch.zeros(num_slots, max_rank, base.out_channels, **like), persistent=False)

    # What diffusers' blocks may read of the conv they hold.
    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def out_channels(self) -> int:
        return self.base.out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.base.kernel_size

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def module_shape(self) -> tuple[int, int, int, int]:
        """(out, in, kh, kw): what an adapter's tensors are checked against."""
        return (self.base.out_channels, self.base.in_channels, *self.base.kernel_size)

    def down_layout(self, down: torch.Tensor) -> torch.Tensor:
        """An adapter's down/A ([r, in], [r, in, kh, kw]) as this layer's slot stores it."""
        if self.pointwise:
            return down.reshape(down.shape[0], -1)
        return down.permute(0, 2, 3, 1)  # [r, kh, kw, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows > self.state.max_rows:
            raise ValueError(f"batch of {rows} rows exceeds the adapter bank's max_rows {self.state.max_rows}")
        base = self.base
        y = base(x)
        out_channels, out_h, out_w = y.shape[1:]
        slots = self.state.slot_ids[:rows].reshape(-1)  # [R*K]
        coef = self.state.coef[:rows]  # [R, 1, K*r]
        kr = coef.shape[2]
        # Each row's K adapters side by side along the rank axis (taps inside each rank row).
        a = self.lora_A.index_select(0, slots).view(rows, -1, base.in_channels)  # [R, K*r*taps, in]
        bt = self.lora_Bt.index_select(0, slots).view(rows, kr, out_channels)  # [R, K*r, out]
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = base.kernel_size, base.stride, base.dilation, base.padding
        if self.pointwise:
            xs = x if (sh, sw) == (1, 1) else x[:, :, ::sh, ::sw]
            h = torch.bmm(a, xs.reshape(rows, base.in_channels, out_h * out_w))  # [R, K*r, pixels]
        else:
            in_h, in_w = x.shape[2:]
            p = torch.bmm(a, x.reshape(rows, base.in_channels, in_h * in_w))  # [R, K*r*taps, pixels]
            # Each tap is a 1x1 product, so padding its output equals convolving the padded input,
            # without multiplying the padding's zeros.
            p = p.view(rows, -1, in_h, in_w)
            if ph or pw:
                p = F.pad(p, (pw, pw, ph, ph))
            p = p.view(rows, kr, kh, kw, in_h + 2 * ph, in_w + 2 * pw)
            h = None
            for i in range(kh):  # the kernel's taps (9 for 3x3), not adapters
                for j in range(kw):
                    tap = p[:, :, i, j, i * dh : i * dh + sh * (out_h - 1) + 1 : sh,
                            j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
                    h = tap if h is None else h + tap
            h = h.reshape(rows, kr, out_h * out_w)
        h = h * coef.transpose(1, 2)  # [R, K*r, pixels] scaled by each adapter's row weight
        y = torch.baddbmm(y.reshape(rows, out_channels, out_h * out_w), bt.transpose(1, 2), h)
        return y.view(rows, out_channels, out_h, out_w)

    def extra_repr(self) -> str:
        return f"slots={self.lora_A.shape[0]}, max_rank={self.max_rank}"


def replace_convs(root: nn.Module, prefix: str, targets, make) -> dict[str, nn.Module]:
    """Replaces each bankable nn.Conv2d whose path ends with a target by ``make(conv)``; returns the
    new layers keyed ``<prefix>.<path>`` (the adapter format's module names)."""
    replaced = {}
    with MODULE_CONSTRUCTION:  # see service/engine/construction.py
        for name, module in list(root.named_modules()):
            if not bankable_conv(module) or not any(name == t or name.endswith("." + t) for t in targets):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            layer = make(module)
            setattr(parent, child, layer)
            replaced[f"{prefix}.{name}"] = layer
    return replaced


__all__ = ["BankedLoRAConv2d", "bankable_conv", "replace_convs"]
