"""torch.compile of the banked UNet: one static graph per batch bucket and resolution.

Why buckets: a graph compiled for static shapes is the fastest form (and the only one CUDA graphs
can replay), but the step batcher hands the UNet any number of rows. Padding each call to the next
bucket (1, 2, 4, ... max_rows by default) bounds the set of graphs; `warmup` compiles them all at
start so no request pays a compile.

Why swaps never recompile: every tensor the banked layers read (slot stacks, per-row slot ids and
weights) is allocated once and only overwritten in place by the bank (see adapters/bank.py), so
Dynamo's guards (tensor identity, shape, stride, dtype) keep holding and CUDA graphs keep their
addresses. tests/test_compiled_unet.py checks this with torch._dynamo.config.error_on_recompile.
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import torch

from .runtime import EagerUNet, RuntimeStats, bucket_for, pad_rows, row_timesteps

log = logging.getLogger(__name__)


def _raise_recompile_limit(limit: int) -> None:
    """Each (bucket, resolution) is its own graph of the same code; Dynamo's default limit of 8 per
    code object would silently fall back to eager after the 8th."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
            return


class CompiledUNet:
    name = "compile"

    def __init__(self, unet: torch.nn.Module, buckets: Sequence[int], mode: str = "auto", text_length: int = 77):
        self.unet = unet
        self.text_length = text_length
        self.buckets = tuple(buckets)
        device = next(unet.parameters()).device
        if mode == "auto":
            # CUDA graphs replay a captured step with no kernel-launch overhead: most of a small
            # batch's step time on a GPU. On CPU there is nothing to capture.
            mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.mode = mode
        _raise_recompile_limit(8 * len(self.buckets) + 8)
        self._forward = torch.compile(self._unet_forward, dynamic=False, mode=None if mode == "default" else mode)
        self._eager = EagerUNet(unet)
        self.stats = RuntimeStats()
        # Graph compilation (first call per shape) is not thread-safe; calls are serialized by the
        # adapter bank's lock anyway when adapters are routed.
        self._lock = threading.Lock()

    def _unet_forward(self, latents, timesteps, embeds):
        return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        rows = latents.shape[0]
        bucket = bucket_for(rows, self.buckets)
        if bucket is None or torch.is_grad_enabled():
            # Beyond the largest bucket, or a call that needs gradients (the graphs are inference-only).
            self.stats.count(fallback=True)
            return self._eager.unet(latents, timesteps, encoder_hidden_states=embeds).sample
        timesteps = row_timesteps(timesteps, rows, latents.device)
        padded = pad_rows(latents, timesteps, embeds, bucket)
        with self._lock:
            self.stats.shapes.add((bucket, *latents.shape[2:]))
            out = self._forward(*padded)
        self.stats.count()
        # Under CUDA graphs the output lives in the graph's memory pool and the next replay
        # overwrites it: hand back a copy of the real rows.
        return out[:rows].clone() if self.mode == "reduce-overhead" else out[:rows]

    @torch.no_grad()
    def warmup(self, shapes: Sequence[tuple[int, int, int]]) -> None:
        param = next(self.unet.parameters())
        config = self.unet.config
        length, width = self.text_length, config.cross_attention_dim
        for rows, h, w in shapes:
            latents = torch.zeros(rows, config.in_channels, h, w, device=param.device, dtype=param.dtype)
            embeds = torch.zeros(rows, length, width, device=param.device, dtype=param.dtype)
            timesteps = torch.full((rows,), 999.0, device=param.device)
            # CUDA graphs record on the second call of a shape; run each twice.
            for _ in range(2 if self.mode == "reduce-overhead" else 1):
                self(latents, timesteps, embeds)
            log.info("compiled UNet for %d rows at %dx%d", rows, h, w)
