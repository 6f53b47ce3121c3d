"""Trainable LoRA layers, put on a frozen model for the length of one training job.

    with lora_layers(engine.unet, "unet", ("attn2.to_k", "attn2.to_v"), rank=4, seed=0) as layers:
        ...train [p for l in layers.values() for p in l.parameters()]...
        adapter_lora = to_lora_modules(layers)
    # the model is exactly as before here, whatever happened inside

Layer names are the adapter format's (``unet.<module path>``), found by the same matching the
adapter bank uses (`replace_linears`), so a trained adapter names exactly the layers the bank
serves. Initialisation follows peft/diffusers: A random, B zero, so training starts at the base
model; the update is ``(alpha / r) * B @ A``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
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
        update = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + (self.scale * update).to(x.dtype)


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
    try:
        yield layers  # type: ignore[misc]
    finally:
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
