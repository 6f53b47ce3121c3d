"""The banked UNet run by onnxruntime, its bank inputs bound to the adapter bank's own memory.

The exported graph (onnx_export.py) takes every slot stack and the routing table as inputs. Here
each of those inputs is bound ONCE, by pointer, to the tensor the AdapterBank already owns
(IOBinding): a swap is still the bank's in-place copy, visible to the very next call, and a call
moves nothing but its latents, timesteps and embeddings. Shapes the graph was not exported for
(another resolution, more rows than its profile) run eager, counted as fallbacks.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from .graph_runtime import GraphRuntime
from .onnx_export import INPUTS, OUTPUT, exported_unet, graph_shape
from .runtime import warmup_inputs

# onnxruntime's IOBinding takes numpy element types, and numpy has no bfloat16: export bf16 models'
# graphs in float16 or float32.
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _providers(device: torch.device) -> list:
    import onnxruntime as ort

    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("the onnx UNet runtime on a GPU needs onnxruntime-gpu (CUDAExecutionProvider)")
        return [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    return ["CPUExecutionProvider"]


class OnnxUNet(GraphRuntime):
    name = "onnx"

    def __init__(self, graph_path: Path, unet: torch.nn.Module, bank=None, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(graph_path, unet, bank)
        if self.dtype not in _NP_DTYPES:
            raise ValueError(f"the onnx UNet runtime takes float32 or float16 models, not {self.dtype}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.graph_path), options, providers=_providers(self.device))
        expected = set(INPUTS if bank is not None else INPUTS[:3]) | {n for n, _ in self.bank_inputs}
        if {i.name for i in self.session.get_inputs()} != expected:
            raise ValueError(f"{self.graph_path} does not have the banked UNet's inputs")
        self._local = threading.local()

    @classmethod
    def for_engine(cls, engine, cache_dir: Path, max_rows: int, threads: int | None = None) -> "OnnxUNet":
        """The engine's banked UNet exported (or found in ``cache_dir``) for its default resolution;
        `threads`: onnxruntime's intra-op threads, the serving thread's torch threads (default: this
        thread's)."""
        bank = engine.adapters.bank
        return cls(exported_unet(engine.unet, bank, graph_shape(engine, max_rows), cache_dir), engine.unet, bank,
                   threads=threads)

    def _bind(self, binding, name: str, tensor: torch.Tensor) -> None:
        assert tensor.is_contiguous()
        binding.bind_input(name, self.device.type, self.device.index or 0, _NP_DTYPES[tensor.dtype],
                           list(tensor.shape), tensor.data_ptr())

    def _binding(self):
        """This thread's IOBinding, with the bank's slot stacks bound once (they never move)."""
        binding = getattr(self._local, "binding", None)
        if binding is None:
            binding = self._local.binding = self.session.io_binding()
            for name, tensor in self.bank_inputs:
                self._bind(binding, name, tensor)
        return binding

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        inputs = self.row_inputs(latents, timesteps, embeds)
        if inputs is None:
            return self.eager(latents, timesteps, embeds)
        out = torch.empty_like(inputs["sample"])
        binding = self._binding()
        for name, tensor in inputs.items():  # `inputs` keeps every bound tensor alive through the run
            self._bind(binding, name, tensor)
        binding.bind_output(OUTPUT, self.device.type, self.device.index or 0, _NP_DTYPES[out.dtype],
                            list(out.shape), out.data_ptr())
        if self.device.type == "cuda":
            # onnxruntime runs on its own stream: torch's writes (latents, the bank's routing and
            # slots) must have landed first.
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        self.counted(latents.shape[0])
        return out

    @torch.no_grad()
    def warmup(self, shapes) -> None:
        """One run per batch size: onnxruntime allocates its buffers for a shape on first use."""
        s = self.shape
        for rows, h, w in shapes:
            if rows > s.max_rows or (h, w) != (s.height, s.width):
                continue
            self(*warmup_inputs(self.unet, rows, h, w, s.text_length))
