"""The workbench's UNet calls, shared: loops that are independent of each other (the guided
samples' inversion and sampling, a preliminary DDS edit) yield their rows, and each round their
pending rows become ONE UNet call on the private model, as `service.engine.sampling.run_together`
does for edits on the serving engine. On a small model a call's cost is far from proportional to its
rows (world model, one CPU thread: a 5-row call about 65 ms, a 1-row and a 4-row call 85-90 ms).

What differs between the parts of one call, and how each part keeps its own:

- the adapter: a part runs with the applied adapter or on the pre-trained model (`Rows.adapter`);
  where both are in one call, the pre-trained rows of every UNet LoRA layer get the layer's base
  output (`_PretrainedRows`), what `Applied.off` gives a whole call;
- plug-and-play injection (the guided samples): confined to its own part's rows, the part's first
  row the source whose features it takes (`_FeatureInjection.group`);
- conditioning and timesteps: per row already.

A part alone in its call runs exactly as it did in a call of its own (same tensors, same
processors, `Applied.off` for a pre-trained part), so a loop run alone here is bit-identical to
running it with plain `bench.unet` calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from service.engine.sampling import Denoise, SideBySide, StepResult

from .applied import Applied

if TYPE_CHECKING:
    from .protocol import Bench


@dataclass(frozen=True)
class Rows:
    """One part of a shared workbench UNet call: latents [m, C, h, w] at timestep(s) `t` (one for
    every row, or [m]) with conditioning [m, L, D]; answered with the raw prediction [m, C, h, w].

    `adapter`: the applied adapter (True) or the pre-trained model (False). `features` /
    `attention`: plug-and-play injection on this part, its first row the source whose decoder
    ResNet features / self-attention queries and keys the other rows take (`inject` marks a part
    that may inject, so the injection's processors are installed for its calls)."""

    latents: torch.Tensor
    t: Any
    embeds: torch.Tensor
    adapter: bool = True
    inject: bool = False
    features: bool = False
    attention: bool = False


@torch.no_grad()
def run_side_by_side(bench: "Bench", applied: Applied, loops: Sequence[Generator], adapter_key: str | None = None,
                     on_round: Callable[[list[bool]], None] | None = None) -> list:
    """Runs loops that yield `Rows` (or `Denoise` calls, with the applied adapter on rows that name
    `adapter_key` and the pre-trained model on rows that name none) side by side: each round, every
    pending call's rows in one UNet call. Returns each loop's result, in order. `on_round(alive)`
    hears, after each round, which loops are still running."""
    together = SideBySide(loops)
    pending, advance = together.pending, together.advance
    injection: _FeatureInjection | None = None
    try:
        while pending:
            order = list(pending)
            calls = [pending[i] for i in order]
            parts = [_as_rows(call, adapter_key) for call in calls]
            injecting = [k for k, part in enumerate(parts) if part.inject]
            if len(injecting) > 1:
                raise ValueError("one injecting part per shared call")
            if injecting and injection is None:
                injection = _FeatureInjection(bench.base.unet).__enter__()
            elif not injecting and injection is not None:
                injection.__exit__(None, None, None)  # the model's own processors for calls without it
                injection = None
            sizes = [int(part.latents.shape[0]) for part in parts]
            starts = [sum(sizes[:k]) for k in range(len(parts))]
            if len(parts) == 1:  # alone: exactly the call the loop would make on its own
                latents, timesteps, embeds = parts[0].latents, parts[0].t, parts[0].embeds
            else:
                latents = torch.cat([part.latents for part in parts])
                timesteps = torch.cat([torch.as_tensor(part.t).reshape(-1).expand(m) for part, m in zip(parts, sizes)])
                embeds = torch.cat([part.embeds for part in parts])
            if injection is not None:
                k = injecting[0]
                injection.group = None if len(parts) == 1 else (starts[k], starts[k] + sizes[k])
                injection.features, injection.attention = parts[k].features, parts[k].attention
            pretrained = [(s, s + m) for s, m, part in zip(starts, sizes, parts) if not part.adapter]
            if not pretrained:
                adapter = contextlib.nullcontext()
            elif len(pretrained) == len(parts):
                adapter = applied.off()
            else:
                adapter = _PretrainedRows(applied, pretrained)
            with adapter:
                out = bench.unet(latents, timesteps, embeds)
            for i, call, start, m in zip(order, calls, starts, sizes):
                noise = out if len(parts) == 1 else out[start : start + m]
                advance(i, StepResult(noise, int(out.shape[0]), 0.0) if isinstance(call, Denoise) else noise)
            if on_round is not None:
                on_round([i in pending for i in range(len(loops))])
    finally:
        if injection is not None:
            injection.__exit__(None, None, None)
    return together.results


def _as_rows(call, adapter_key: str | None) -> Rows:
    if isinstance(call, Rows):
        return call
    if not isinstance(call, Denoise):
        raise TypeError(f"a workbench loop yields Rows or Denoise, not {type(call).__name__}")
    keys = {tuple((use.key, use.weight) for use in row) for row in call.rows}
    if len(keys) != 1 or next(iter(keys)) not in ((), ((adapter_key, 1.0),)):
        raise ValueError(f"the workbench applies one adapter ({adapter_key!r}, at weight 1) to a whole part; "
                         f"rows name {sorted(keys)}")
    return Rows(call.latents, call.timesteps, call.embeds, adapter=bool(next(iter(keys))))


class _PretrainedRows:
    """Within the block, the given row ranges of every UNet LoRA layer's output are the layer's
    base output (the pre-trained model), the other rows keep the adapter: `Applied.off` for some
    rows of a call. (A Linear's input has the call's rows first, as every UNet Linear's does.)"""

    def __init__(self, applied: Applied, ranges: Sequence[tuple[int, int]]):
        self.layers = [layer for name, layer in applied.layers.items() if name.startswith("unet.")]
        self.ranges = list(ranges)
        self.handles: list = []

    def __enter__(self) -> "_PretrainedRows":
        def base_rows(module, args, output):
            x = args[0]
            for start, stop in self.ranges:
                output[start:stop] = module.base(x[start:stop])
            return output

        self.handles = [layer.register_forward_hook(base_rows) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


# -- plug-and-play injection (Tumanyan et al., CVPR 2023) on a diffusers UNet ----------------------


class _InjectedSelfAttention:
    """Self-attention whose queries and keys, for the injected rows, are their group's first row's
    (the source trajectory's) while `switch.attention` is on: the rows keep their own values, so
    they take the source's layout with their own appearance. Rows outside the group attend as
    usual. The attention itself is the model's own processor's (diffusers' AttnProcessor2_0: one
    fused scaled-dot-product kernel; the explicit [rows x heads, HW, HW] probabilities of the plain
    AttnProcessor made a guided-sampling call 1.3-1.8x slower, measured on the world model), and
    the model's own processor runs whatever it does not handle (cross-attention, the switch off)."""

    def __init__(self, switch: "_FeatureInjection", original):
        self.switch = switch
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if (not self.switch.attention or encoder_hidden_states is not None or hidden_states.ndim != 3
                or attention_mask is not None or attn.spatial_norm is not None or args or kwargs):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        rows = query.shape[0]
        group = self.switch.group
        if group is None:  # the whole call: row 0 is the source
            query = query[:1].expand_as(query)
            key = key[:1].expand_as(key)
        else:
            start, stop = group
            take = torch.arange(rows, device=query.device)
            take[start + 1 : stop] = start
            query, key = query[take], key[take]
        head_dim = key.shape[-1] // attn.heads
        query = query.reshape(rows, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(rows, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=attn.scale)
        out = out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _FeatureInjection:
    """Installs plug-and-play injection on a diffusers UNet for the block: the decoder's second
    up block's last ResNet output, and self-attention q/k in the decoder's last two up blocks.
    `group` (start, stop): the rows injection acts on, `start` the source's (None: every row, row 0
    the source's)."""

    def __init__(self, unet):
        self.unet = unet
        self.features = False
        self.attention = False
        self.group: tuple[int, int] | None = None

    def __enter__(self) -> "_FeatureInjection":
        ups = self.unet.up_blocks
        level = min(1, len(ups) - 1)
        resnet = ups[level].resnets[-1]

        def replace_output(module, args, output):
            if not self.features:
                return output
            if self.group is None:
                return torch.cat([output[:1], output[:1].expand(output.shape[0] - 1, *output.shape[1:])])
            start, stop = self.group
            source = output[start : start + 1]
            return torch.cat([output[: start + 1], source.expand(stop - start - 1, *output.shape[1:]), output[stop:]])

        self._hook = resnet.register_forward_hook(replace_output)
        self._saved = self.unet.attn_processors
        injected = tuple(f"up_blocks.{i}." for i in range(level, len(ups)))
        self.unet.set_attn_processor({
            name: _InjectedSelfAttention(self, proc) if name.startswith(injected) and ".attn1." in name else proc
            for name, proc in self._saved.items()
        })
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        self.unet.set_attn_processor(self._saved)
