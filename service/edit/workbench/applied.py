"""Applying the request's adapter to the workbench's private model: its LoRA wrapped around the
model's layers (restored on exit) and its token vectors, as fp32 parameters, trainable for steering."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from service.adapters import Adapter, LoraModule
from service.adapters.bank import replace_linears
from service.personalize.lora import LoRALinear

from ..spec import EditRefused


@dataclass
class Applied:
    """The adapter on the workbench's model: LoRA layers (trainable or not) and token vectors."""

    layers: dict[str, LoRALinear]
    modules: dict[str, LoraModule]  # the adapter's own modules (alpha, rslora), by layer name
    tokens: dict[str, nn.Parameter]

    def parameters(self) -> list[torch.Tensor]:
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)] + list(self.tokens.values())

    @contextmanager
    def off(self) -> Iterator[None]:
        """The pre-trained model: every LoRA update scaled to 0 (and no tokens: callers pass {})."""
        scales = {name: layer.scale for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.scale = 0.0
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                layer.scale = scales[name]

    def to_adapter(self) -> Adapter:
        """A detached copy in the adapter format (the steered adapter)."""
        lora = {name: LoraModule(down=layer.lora_A.detach().cpu().clone(), up=layer.lora_B.detach().cpu().clone(),
                                 alpha=self.modules[name].alpha, use_rslora=self.modules[name].use_rslora)
                for name, layer in self.layers.items()}
        return Adapter(lora=lora, token_embeddings={t: v.detach().cpu().clone() for t, v in self.tokens.items()})


@contextmanager
def applied(engine, adapter: Adapter, trainable: bool = False) -> Iterator[Applied]:
    """`adapter`'s LoRA wrapped around the private model's layers (restored on exit) and its
    token vectors, as fp32 parameters (a copy: the adapter itself is never written)."""
    layers: dict[str, LoRALinear] = {}
    g = torch.Generator().manual_seed(0)  # unused: A and B are overwritten with the adapter's
    roots = {"unet": engine.unet, "text_encoder": engine.text_encoder}
    if getattr(engine, "text_encoder_2", None) is not None:  # SDXL's second text encoder
        roots["text_encoder_2"] = engine.text_encoder_2
    named: dict[str, dict[str, nn.Module]] = {}  # each root's modules by path, listed once
    try:
        for name, module in adapter.lora.items():
            root_name, path = _local_name(name, roots)
            if root_name not in roots:
                raise EditRefused(f"adapter layer {name!r} is not in the model (it has no {root_name})")
            make = lambda linear, module=module: LoRALinear(linear, module.rank, module.alpha, g)  # noqa: E731
            if root_name not in named:
                named[root_name] = dict(roots[root_name].named_modules())
            found = named[root_name].get(path)
            if type(found) is nn.Linear:
                # The layer at its path, as replace_linears would find it, without listing every
                # module of the model again per layer (a LoRA has about a hundred).
                parent_name, _, child = path.rpartition(".")
                parent = roots[root_name].get_submodule(parent_name) if parent_name else roots[root_name]
                made = {name: make(found)}
                setattr(parent, child, made[name])
            else:
                made = replace_linears(roots[root_name], root_name, (path,), make)
            if not made:
                raise EditRefused(f"adapter layer {name!r} is not in the model")
            layer = layers[name] = next(iter(made.values()))  # registered first: restored whatever happens
            with torch.no_grad():
                layer.lora_A.copy_(module.down.float())
                layer.lora_B.copy_(module.up.float())
            layer.scale = module.scale
            layer.lora_A.requires_grad_(trainable)
            layer.lora_B.requires_grad_(trainable)
        tokens = {t: nn.Parameter(v.detach().float().clone().to(engine.device), requires_grad=trainable)
                  for t, v in adapter.token_embeddings.items()}
        yield Applied(layers, dict(adapter.lora), tokens)
    finally:
        _restore(layers, roots)


def _restore(layers: dict[str, LoRALinear], roots) -> None:
    for name in layers:
        root_name, path = _local_name(name, roots)
        parent_name, _, child = path.rpartition(".")
        parent = roots[root_name].get_submodule(parent_name) if parent_name else roots[root_name]
        setattr(parent, child, getattr(parent, child).base)


def _local_name(name: str, roots) -> tuple[str, str]:
    """(component, module path inside it) of an adapter layer name; text-encoder names with or
    without transformers 4's `text_model.` level both resolve (as the adapter bank does)."""
    component, _, path = name.partition(".")
    if component in ("text_encoder", "text_encoder_2") and component in roots:
        modules = dict(roots[component].named_modules())
        for alias in (path, path.removeprefix("text_model."), "text_model." + path):
            if alias in modules:
                return component, alias
    return component, path
