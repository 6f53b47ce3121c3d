"""What the runtimes of an exported graph share (onnxruntime here, a Triton/TensorRT engine at deploy):
its metadata, the bank inputs tied to the adapter bank's own tensors, each call's per-row inputs,
and the eager fallback for calls the graph does not cover."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .onnx_export import META_FILE, BankedUNetGraph, GraphShape, bank_input_names
from .runtime import RuntimeStats, row_timesteps


class GraphRuntime:
    def __init__(self, graph_path: Path, unet: torch.nn.Module, bank=None):
        self.graph_path = Path(graph_path)
        meta = json.loads((self.graph_path.parent / META_FILE).read_text())
        self.shape = GraphShape(**meta["shape"])
        self.unet, self.bank = unet, bank
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        # (input name, the bank's tensor): bound or sent as they are; the bank writes them in place.
        self.bank_inputs: list[tuple[str, torch.Tensor]] = []
        if bank is not None:
            wrapper = BankedUNetGraph(unet, bank)
            if wrapper.layer_names != meta["layers"]:
                raise ValueError(f"{self.graph_path} was exported for other banked layers than this UNet's")
            names = [n for i in range(len(wrapper.layer_names)) for n in bank_input_names(i)]
            self.bank_inputs = list(zip(names, wrapper.bank_tensors()))
        self.stats = RuntimeStats()

    def row_inputs(self, latents: torch.Tensor, timesteps, embeds: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The call's per-row graph inputs (contiguous, on the model's device), or None when the graph
        does not cover it (another resolution, more rows than its profile, gradients needed)."""
        if not self.shape.covers(latents, embeds) or torch.is_grad_enabled():
            return None
        rows = latents.shape[0]
        inputs = {
            "sample": latents.to(self.device, self.dtype).contiguous(),
            "timestep": row_timesteps(timesteps, rows, self.device),
            "encoder_hidden_states": embeds.to(self.device, self.dtype).contiguous(),
        }
        if self.bank is not None:
            # The routing AdapterBank.activate wrote for this call (contiguous leading slices).
            inputs["slot_ids"] = self.bank.state.slot_ids[:rows]
            inputs["coef"] = self.bank.state.coef[:rows]
        return inputs

    def eager(self, latents, timesteps, embeds) -> torch.Tensor:
        self.stats.count(fallback=True)
        return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample

    def counted(self, rows: int) -> None:
        self.stats.count()
        self.stats.shapes.add((rows, self.shape.height, self.shape.width))
