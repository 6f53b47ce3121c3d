"""torch.compile of the banked UNet: one static graph per batch bucket and resolution.

Why buckets: a graph compiled for static shapes is the fastest form (and the only one CUDA graphs
can replay), but the step batcher hands the UNet any number of rows. Padding each call to the next
bucket (1, 2, 4, ... max_rows by default) bounds the set of graphs; `warmup` compiles them all at
start so no request pays a compile. Once warmed up, a shape it did not cover (another resolution)
runs eager rather than compiling in the middle of serving, with every other request waiting.

Why swaps never recompile: every tensor the banked layers read (slot stacks, per-row slot ids and
weights) is allocated once and only overwritten in place by the bank (see adapters/bank.py), so
Dynamo's guards (tensor identity, shape, stride, dtype) keep holding and CUDA graphs keep their
addresses. tests/test_compiled_unet.py checks this with torch._dynamo.config.error_on_recompile.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from .runtime import RuntimeStats, bucket_for, pad_rows, row_timesteps, warmup_inputs

log = logging.getLogger(__name__)


def _raise_recompile_limit(limit: int) -> None:
    """Each (bucket, resolution) is its own graph of the same code; Dynamo's default limit of 8 per
    code object would silently fall back to eager after the 8th."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
            return


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledUNet:
    name = "compile"

    def __init__(self, unet: torch.nn.Module, buckets: Sequence[int], mode: str = "auto", text_length: int = 77,
                 backend: str = "inductor"):
        """`backend`: torch.compile's; another than inductor only where a test checks Dynamo's side
        (graphs, guards, recompiles) without paying inductor's code generation."""
        self.unet = unet
        self.text_length = text_length
        self.buckets = tuple(sorted(set(buckets)))
        device = next(unet.parameters()).device
        if mode == "auto":
            # CUDA graphs replay a captured step with no kernel-launch overhead: most of a small
            # batch's step time on a GPU. On CPU there is nothing to capture.
            mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.mode = mode
        self.cuda_graphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        _raise_recompile_limit(8 * len(self.buckets) + 8)
        self._forward = torch.compile(self._unet_forward, dynamic=False, backend=backend,
                                      mode=None if mode == "default" or backend != "inductor" else mode)
        self.stats = RuntimeStats()
        self.warmed: set[tuple[int, int, int]] = set()  # once non-empty, only these shapes run compiled
        # First calls per shape compile, which is not thread-safe; routed calls are serialized by
        # the adapter bank's lock anyway.
        self._lock = threading.Lock()
        # CUDA graphs are recorded per thread (torch keeps one graph tree per thread): run every
        # compiled call, warm-up included, on one thread so serving threads replay what warm-up
        # captured instead of each capturing (and holding memory for) its own.
        self._graph_thread = ThreadPoolExecutor(1, thread_name_prefix="cuda-graphs") if self.cuda_graphs else None

    def _unet_forward(self, latents, timesteps, embeds):
        return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample

    def _run(self, rows: int, padded) -> torch.Tensor:
        # no_grad here, not only in the caller: grad mode is per thread, and the graphs are
        # inference-only whichever thread replays them.
        with self._lock, torch.no_grad():
            out = self._forward(*padded)
            # Under CUDA graphs the output lives in the graph's memory pool and the next replay
            # overwrites it: copy the real rows out before anyone else can replay.
            return out[:rows].clone() if self.cuda_graphs else out[:rows]

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        rows = latents.shape[0]
        bucket = bucket_for(rows, self.buckets)
        shape = (bucket, *latents.shape[2:])
        if bucket is None or torch.is_grad_enabled() or (self.warmed and shape not in self.warmed):
            # Beyond the largest bucket, a call that needs gradients (the graphs are inference-only),
            # or a shape warm-up did not compile: eager, counted.
            self.stats.count(fallback=True)
            return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample
        padded = pad_rows(latents, row_timesteps(timesteps, rows, latents.device), embeds, bucket)
        if self._graph_thread is not None:
            out = self._graph_thread.submit(self._run, rows, padded).result()
        else:
            out = self._run(rows, padded)
        self.stats.count()
        self.stats.shapes.add(shape)
        return out

    @torch.no_grad()
    def warmup(self, shapes: Sequence[tuple[int, int, int]]) -> None:
        for rows, h, w in shapes:
            latents, timesteps, embeds = warmup_inputs(self.unet, rows, h, w, self.text_length)
            self.warmed.add((bucket_for(rows, self.buckets), h, w))
            # CUDA graphs record on a later call of a shape than the first; run each a few times.
            for _ in range(3 if self.cuda_graphs else 1):
                self(latents, timesteps, embeds)
            log.info("compiled UNet for %d rows at %dx%d", rows, h, w)
