"""The UNet step sent to another Triton model that serves the exported graph (`unet_engine`).

Used by the python `unet` model with STEERSERVE_UNET_RUNTIME=triton_engine: that model keeps what
only Python can do well here -- adapter residency (AdapterManager), routing rows to slots, batching
steps of many requests -- and each batched step becomes one BLS call to `unet_engine`, a TensorRT
plan at deploy (deploy/tensorrt) built from the same ONNX graph. The bank's tensors travel as the
call's inputs (DLPack, no host copy on a GPU), so the plan never changes when adapters do.

Only importable inside a Triton python-backend process (it needs triton_python_backend_utils).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from .onnx_export import LAYERS_FILE, OUTPUT, BankedUNetGraph, GraphShape, bank_input_names, exported_unet, graph_shape
from .runtime import RuntimeStats, row_timesteps
from .tensorrt import ENGINE_MODEL


class TritonEngineUNet:
    name = "triton_engine"

    def __init__(self, graph_path: Path, unet: torch.nn.Module, bank, model_name: str = ENGINE_MODEL):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        meta = json.loads((Path(graph_path).parent / LAYERS_FILE).read_text())
        self.shape = GraphShape(**meta["shape"])
        self.unet, self.bank, self.model_name = unet, bank, model_name
        wrapper = BankedUNetGraph(unet, bank)
        if bank is not None and wrapper.layer_names != meta["layers"]:
            raise ValueError(f"{graph_path} was exported for other banked layers than this UNet's")
        names = [n for i in range(len(wrapper.layer_names)) for n in bank_input_names(i)]
        self._bank_inputs = list(zip(names, wrapper.bank_tensors())) if bank is not None else []
        self.stats = RuntimeStats()

    @classmethod
    def for_engine(cls, engine, cache_dir: Path, max_rows: int) -> "TritonEngineUNet":
        """The graph `unet_engine` was built from: found in the cache (the deploy's build step
        exported it with the same weights and bank layout), exported here otherwise."""
        bank = getattr(engine.adapters, "bank", None)
        path = exported_unet(engine.unet, bank, graph_shape(engine, max_rows), cache_dir)
        return cls(path, engine.unet, bank)

    def __call__(self, latents, timesteps, embeds):
        if not self.shape.covers(latents, embeds) or torch.is_grad_enabled():
            self.stats.count(fallback=True)
            return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample
        pb, rows = self.pb, latents.shape[0]
        timesteps = row_timesteps(timesteps, rows, latents.device)
        inputs = {"sample": latents, "timestep": timesteps, "encoder_hidden_states": embeds}
        if self.bank is not None:
            inputs["slot_ids"] = self.bank.state.slot_ids[:rows]
            inputs["coef"] = self.bank.state.coef[:rows]
        tensors = [pb.Tensor.from_dlpack(n, to_dlpack(t.contiguous())) for n, t in inputs.items()]
        tensors += [pb.Tensor.from_dlpack(n, to_dlpack(t)) for n, t in self._bank_inputs]
        response = pb.InferenceRequest(model_name=self.model_name, inputs=tensors,
                                       requested_output_names=[OUTPUT]).exec()
        if response.has_error():
            raise RuntimeError(f"{self.model_name}: {response.error().message()}")
        out = from_dlpack(pb.get_output_tensor_by_name(response, OUTPUT).to_dlpack())
        self.stats.count()
        self.stats.shapes.add((rows, self.shape.height, self.shape.width))
        return out.to(latents.device).clone()

    def warmup(self, shapes) -> None:
        """Nothing to do here: the engine model is built and warmed by its own backend, and it may
        still be loading while this model initializes (Triton loads models in parallel)."""
