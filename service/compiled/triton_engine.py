"""The UNet step sent to another Triton model that serves the exported graph (`unet_engine`).

Used by the python `generate` and `unet` models with STEERSERVE_UNET_RUNTIME=triton_engine: they keep
what only Python can do well here -- adapter residency (AdapterManager), routing rows to slots, batching
steps of many requests -- and each batched step becomes one BLS call to `unet_engine`, a TensorRT
plan at deploy (deploy/tensorrt) built from the same ONNX graph. The bank's tensors travel as the
call's inputs (DLPack, no host copy on a GPU), so the plan never changes when adapters do.

Only importable inside a Triton python-backend process (it needs triton_python_backend_utils).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from .graph_runtime import GraphRuntime
from .onnx_export import OUTPUT, cached_unet, graph_shape
from .tensorrt import ENGINE_MODEL


class TritonEngineUNet(GraphRuntime):
    name = "triton_engine"

    def __init__(self, graph_path: Path, unet: torch.nn.Module, bank, model_name: str = ENGINE_MODEL):
        import triton_python_backend_utils as pb_utils

        super().__init__(graph_path, unet, bank)
        self.pb, self.model_name = pb_utils, model_name

    @classmethod
    def for_engine(cls, engine, cache_dir: Path, max_rows: int) -> "TritonEngineUNet":
        """The graph `unet_engine` was built from, found in the cache where the deploy's build step
        exported it. Missing means the plan was built for other weights or another bank layout (or
        not at all): refuse to start rather than serve a stale engine."""
        bank = engine.adapters.bank
        shape = graph_shape(engine, max_rows)
        path = cached_unet(engine.unet, bank, shape, cache_dir)
        if path is None:
            raise RuntimeError(
                f"no exported UNet graph in {cache_dir} for this model, bank layout and {max_rows} rows: "
                "unet_engine must be (re)built from it first (deploy/tensorrt/build_unet_plan.sh)")
        return cls(path, engine.unet, bank)

    def __call__(self, latents, timesteps, embeds):
        inputs = self.row_inputs(latents, timesteps, embeds)
        if inputs is None:
            return self.eager(latents, timesteps, embeds)
        pb = self.pb
        tensors = [pb.Tensor.from_dlpack(n, to_dlpack(t)) for n, t in [*inputs.items(), *self.bank_inputs]]
        response = pb.InferenceRequest(model_name=self.model_name, inputs=tensors,
                                       requested_output_names=[OUTPUT]).exec()
        if response.has_error():
            raise RuntimeError(f"{self.model_name}: {response.error().message()}")
        out = from_dlpack(pb.get_output_tensor_by_name(response, OUTPUT).to_dlpack())
        self.counted(latents.shape[0])
        return out.to(latents.device).clone()

    def warmup(self, shapes) -> None:
        """Nothing to do here: the engine model is built and warmed by its own backend, and it may
        still be loading while this model initializes (Triton loads models in parallel)."""
