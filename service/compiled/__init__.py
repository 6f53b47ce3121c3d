"""How a UNet step executes: eager PyTorch, torch.compile, or an ONNX graph in onnxruntime.

The engine's sampling, editing and serving code calls `Engine.predict_noise`, which routes the
batch's rows through the adapter bank (`AdapterBank.activate` writes the per-row slot table) and
then hands latents, timesteps and embeddings to a `UNetRuntime`. Runtimes differ only in how that
one forward pass runs; every one of them reads the SAME bank tensors, which adapter swaps only ever
overwrite in place, so a swap never recompiles, re-captures or re-exports anything:

- `eager`: the banked UNet module as it is (the default; what training and editing steer).
- `compile`: ``torch.compile`` of the banked UNet, batches padded to fixed buckets so each bucket
  is one graph (CUDA graphs with mode ``reduce-overhead`` on a GPU), warmed up at start.
- `onnx`: the banked UNet exported once with the bank's tensors and the per-row slot ids and
  weights as graph INPUTS, run by onnxruntime with those inputs bound to the bank's memory: one
  graph serves every adapter. The same ONNX file is what deploy/tensorrt builds a TensorRT plan from.

Select one with STEERSERVE_UNET_RUNTIME (Settings.unet_runtime) for both backends.
"""

from __future__ import annotations

from .configure import ServingRuntime, build_runtime, configure_unet_runtime
from .runtime import RUNTIMES, EagerUNet, RuntimeOptions, UNetRuntime, batch_buckets

__all__ = [
    "RUNTIMES",
    "EagerUNet",
    "RuntimeOptions",
    "ServingRuntime",
    "UNetRuntime",
    "batch_buckets",
    "build_runtime",
    "configure_unet_runtime",
]
