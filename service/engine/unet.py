"""How one UNet forward of the engine runs: the interface every runtime implements, and the eager one.

The engine owns this interface (Engine.predict_noise calls `engine.unet_runtime`); the compiled
forms (torch.compile, onnxruntime, a Triton/TensorRT engine) live in service/compiled and build on
it, so the dependency goes one way: compiled -> engine.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch


class UNetRuntime(Protocol):
    """One UNet forward: latents [m, C, h, w], timesteps [m], embeds [m, L, D] -> noise [m, C, h, w].

    Called by Engine.predict_noise inside the adapter bank's ``activate`` block, so row i's adapters
    are already routed; a runtime never decides residency or routing, it only executes.
    """

    name: str

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor: ...

    def warmup(self, shapes: Sequence[tuple[int, int, int]]) -> None:
        """Prepare (compile, capture, build) for these (rows, latent height, latent width) shapes."""


@dataclass
class RuntimeStats:
    """Counters a runtime keeps; exported by the gateway (steerserve_unet_*)."""

    calls: int = 0
    fallback_calls: int = 0  # shapes the compiled form does not cover, run eager
    warmup_seconds: float = 0.0
    shapes: set = field(default_factory=set)  # distinct (rows or bucket, h, w) run in the compiled form
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, fallback: bool = False) -> None:
        with self._lock:
            self.calls += 1
            self.fallback_calls += int(fallback)


class EagerUNet:
    """The banked UNet module called as it is."""

    name = "eager"

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.stats = RuntimeStats()

    def __call__(self, latents, timesteps, embeds):
        self.stats.count()
        return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample

    def warmup(self, shapes) -> None:
        return None
