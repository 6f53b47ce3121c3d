"""The banked UNet run by onnxruntime, its bank inputs bound to the adapter bank's own memory.

The exported graph (onnx_export.py) takes every slot stack and the routing table as inputs. Here
each of those inputs is bound ONCE, by pointer, to the tensor the AdapterBank already owns
(IOBinding): a swap is still the bank's in-place copy, visible to the very next call, and a call
moves nothing but its latents, timesteps and embeddings. Shapes the graph was not exported for
(another resolution, more rows than its profile) run eager, counted as fallbacks.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from .onnx_export import (
    INPUTS, LAYERS_FILE, OUTPUT, BankedUNetGraph, GraphShape, bank_input_names, exported_unet, graph_shape,
)
from .runtime import RuntimeStats, row_timesteps

log = logging.getLogger(__name__)

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError("the onnx UNet runtime on a GPU needs onnxruntime-gpu (CUDAExecutionProvider)")
        return ["CUDAExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxUNet:
    name = "onnx"

    def __init__(self, graph_path: Path, unet: torch.nn.Module, bank=None, threads: int | None = None):
        import onnxruntime as ort

        self.graph_path = Path(graph_path)
        meta = json.loads((self.graph_path.parent / LAYERS_FILE).read_text())
        self.shape = GraphShape(**meta["shape"])
        self.unet, self.bank = unet, bank
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.graph_path), options, providers=_providers(self.device))
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self._bank_inputs: list[tuple[str, torch.Tensor]] = []
        if bank is not None:
            wrapper = BankedUNetGraph(unet, bank)
            if wrapper.layer_names != meta["layers"]:
                raise ValueError(f"{self.graph_path} was exported for other banked layers than this UNet's")
            tensors = wrapper.bank_tensors()
            names = [n for i in range(len(wrapper.layer_names)) for n in bank_input_names(i)]
            self._bank_inputs = list(zip(names, tensors))
        expected = set(INPUTS[:3]) | ({*INPUTS[3:], *(n for n, _ in self._bank_inputs)} if bank is not None else set())
        if graph_inputs != expected:
            raise ValueError(f"{self.graph_path} has inputs {sorted(graph_inputs)[:8]}..., not the banked UNet's")
        self._local = threading.local()
        self.stats = RuntimeStats()

    @classmethod
    def for_engine(cls, engine, cache_dir: Path, max_rows: int) -> "OnnxUNet":
        """The engine's banked UNet exported (or found in ``cache_dir``) for its default resolution."""
        bank = getattr(engine.adapters, "bank", None)
        return cls(exported_unet(engine.unet, bank, graph_shape(engine, max_rows), cache_dir), engine.unet, bank)

    # -- binding -----------------------------------------------------------------------------------

    def _bind(self, binding, name: str, tensor: torch.Tensor) -> None:
        assert tensor.is_contiguous()
        binding.bind_input(name, self.device.type, self.device.index or 0, _NP_DTYPES[tensor.dtype],
                           list(tensor.shape), tensor.data_ptr())

    def _binding(self):
        """This thread's IOBinding, with the bank's slot stacks bound once (they never move)."""
        binding = getattr(self._local, "binding", None)
        if binding is None:
            binding = self._local.binding = self.session.io_binding()
            for name, tensor in self._bank_inputs:
                self._bind(binding, name, tensor)
        return binding

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        if not self.shape.covers(latents, embeds) or torch.is_grad_enabled():
            self.stats.count(fallback=True)
            return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample
        rows = latents.shape[0]
        timesteps = row_timesteps(timesteps, rows, self.device)
        # Keep every bound tensor referenced until the run returns.
        inputs = {
            "sample": latents.to(self.device, self.dtype).contiguous(),
            "timestep": timesteps.contiguous(),
            "encoder_hidden_states": embeds.to(self.device, self.dtype).contiguous(),
        }
        if self.bank is not None:
            # The routing AdapterBank.activate wrote for this call's rows (contiguous leading slices).
            inputs["slot_ids"] = self.bank.state.slot_ids[:rows]
            inputs["coef"] = self.bank.state.coef[:rows]
        out = torch.empty_like(inputs["sample"])
        binding = self._binding()
        for name, tensor in inputs.items():
            self._bind(binding, name, tensor)
        binding.bind_output(OUTPUT, self.device.type, self.device.index or 0, _NP_DTYPES[out.dtype],
                            list(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        self.stats.count()
        self.stats.shapes.add((rows, self.shape.height, self.shape.width))
        return out

    @torch.no_grad()
    def warmup(self, shapes) -> None:
        """One run per batch size: onnxruntime allocates its buffers for a shape on first use."""
        s = self.shape
        for rows, h, w in shapes:
            if rows > s.max_rows or (h, w) != (s.height, s.width):
                continue
            latents = torch.zeros(rows, s.latent_channels, h, w, device=self.device, dtype=self.dtype)
            embeds = torch.zeros(rows, s.text_length, s.text_width, device=self.device, dtype=self.dtype)
            self(latents, torch.full((rows,), 999.0), embeds)
