"""The banked UNet as ONE ONNX graph whose adapter bank is made of graph inputs.

Inputs (B = rows of the call, dynamic 1..max_rows; resolution and text length fixed at export):

    sample                 [B, C, h, w]    latents
    timestep               [B]             float32
    encoder_hidden_states  [B, L, D]
    slot_ids               [B, K]          int64: each row's K bank slots (0 = base model)
    coef                   [B, 1, K*r]     each row's adapter weights, repeated over the rank columns
    bank.<i>.A             [S, r, in]      banked layer i's LoRA down stacks, every slot (a banked
                                           k x k conv's: [S, r, kh, kw, in], conv.py)
    bank.<i>.Bt            [S, r, out]     its up stacks, transposed, the alpha/r scale folded in
    -> noise               [B, C, h, w]

(`graph.json` beside the graph names layer i: every banked UNet layer, Linear and Conv2d alike.)
Because the slot stacks are inputs, not weights, one
engine built from this graph -- onnxruntime here, a TensorRT plan at deploy (deploy/tensorrt) --
serves every adapter there is: loading one is a copy into the bank's memory, which the runtime binds
as those inputs. Exporting is slow (tens of seconds even for the embedded model), so graphs are
cached on disk under a key of everything that shapes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

log = logging.getLogger(__name__)

exports_done = 0  # exports run by this process (benchmarks and tests read it)
FORMAT_VERSION = 1  # bump when the graph's interface or the export recipe changes
GRAPH_FILE = "unet.onnx"
META_FILE = "graph.json"  # banked layer order, shape, bank layout
INPUTS = ("sample", "timestep", "encoder_hidden_states", "slot_ids", "coef")
OUTPUT = "noise"


def bank_input_names(index: int) -> tuple[str, str]:
    return f"bank.{index}.A", f"bank.{index}.Bt"


@dataclass(frozen=True)
class GraphShape:
    """What one exported graph is built for."""

    max_rows: int  # the batch dimension's upper bound (TensorRT's profile max)
    latent_channels: int
    height: int  # latent height
    width: int
    text_length: int
    text_width: int

    def covers(self, latents: torch.Tensor, embeds: torch.Tensor) -> bool:
        """Whether a call of these latents and embeddings fits the graph (else it runs eager)."""
        return (latents.shape[0] <= self.max_rows
                and tuple(latents.shape[1:]) == (self.latent_channels, self.height, self.width)
                and tuple(embeds.shape[1:]) == (self.text_length, self.text_width))


def graph_shape(engine, max_rows: int) -> GraphShape:
    """The shape an engine's graph is exported for: its default resolution, its tokenizer's length."""
    size = engine.limits.default_size // engine.vae_scale_factor
    config = engine.unet.config
    return GraphShape(max_rows=max_rows, latent_channels=config.in_channels, height=size, width=size,
                      text_length=engine.text_length, text_width=engine.text_width)


class BankedUNetGraph(nn.Module):
    """The banked UNet with its bank tensors and routing table taken as arguments.

    The banked layers read their slot stacks as module buffers and the routing from the bank's
    shared BankState; here both are substituted by the call's arguments for the duration of the
    forward, which is what makes them graph inputs when traced.
    """

    def __init__(self, unet: nn.Module, bank=None):
        super().__init__()
        self.unet = unet
        self.bank = bank
        # UNet-side banked layers in a fixed order: bank.<i>.* is layer_names[i].
        self.layer_names = [n.removeprefix("unet.") for n in bank.layers if n.startswith("unet.")] if bank else []

    def bank_tensors(self) -> list[torch.Tensor]:
        layers = {n.removeprefix("unet."): layer for n, layer in self.bank.layers.items()} if self.bank else {}
        return [t for name in self.layer_names for t in (layers[name].lora_A, layers[name].lora_Bt)]

    def forward(self, sample, timestep, encoder_hidden_states, slot_ids=None, coef=None, bank_tensors=()):
        if self.bank is None:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        state = self.bank.state
        saved = state.slot_ids, state.coef
        state.slot_ids, state.coef = slot_ids, coef
        try:
            buffers = {}
            for i, name in enumerate(self.layer_names):
                buffers[f"{name}.lora_A"], buffers[f"{name}.lora_Bt"] = bank_tensors[2 * i], bank_tensors[2 * i + 1]
            return functional_call(
                self.unet, buffers, (sample, timestep), {"encoder_hidden_states": encoder_hidden_states}
            ).sample
        finally:
            state.slot_ids, state.coef = saved


def graph_key(unet: nn.Module, bank, shape: GraphShape) -> str:
    """A digest of everything the exported graph depends on: weights, config, bank layout, shape."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({
        "format": FORMAT_VERSION, "torch": torch.__version__, "shape": shape.__dict__,
        # diffusers' private keys (_name_or_path, _diffusers_version) say where the weights were
        # read from, not what they are: the same weights mounted elsewhere are the same graph.
        "config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "bank": None if bank is None else {
            "slots": bank.num_slots, "rank": bank.max_rank, "k": bank.max_adapters_per_row,
            "layers": {n: list(s) for n, s in bank.module_shapes.items() if n.startswith("unet.")},
        },
    }, sort_keys=True, default=str).encode())
    for name, param in unet.state_dict().items():
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def example_inputs(graph: BankedUNetGraph, shape: GraphShape, rows: int = 2):
    param = next(graph.unet.parameters())
    like = dict(device=param.device, dtype=param.dtype)
    args = [
        torch.randn(rows, shape.latent_channels, shape.height, shape.width, **like),
        torch.full((rows,), 500.0, device=param.device),
        torch.randn(rows, shape.text_length, shape.text_width, **like),
    ]
    if graph.bank is not None:
        k, r = graph.bank.max_adapters_per_row, graph.bank.max_rank
        args += [
            torch.zeros(rows, k, dtype=torch.long, device=param.device),
            torch.zeros(rows, 1, k * r, **like),
            graph.bank_tensors(),
        ]
    return tuple(args)


def _export_copy(unet: nn.Module, bank):
    """The banked UNet and its bank as the exporter may change them: tracing swaps the bank's routing
    tensors and the layers' slot buffers for graph inputs. A copy of the module tree that SHARES
    every parameter and buffer (no memory) but has its own BankState, layers and lock, so serving
    goes on with the real bank while an export runs (`auto` exports in the background)."""
    import copy
    import threading

    shared = {id(t): t for t in (*unet.parameters(), *unet.buffers())}
    state = copy.copy(bank.state)
    state.slot_ids, state.weights, state.coef = (t.clone() for t in (bank.state.slot_ids, bank.state.weights,
                                                                   bank.state.coef))
    shared[id(bank.state)] = state
    unet_copy = copy.deepcopy(unet, shared)
    bank_copy = copy.copy(bank)
    bank_copy.state, bank_copy._lock = state, threading.RLock()
    bank_copy.layers = {name: unet_copy.get_submodule(name.removeprefix("unet.")) if name.startswith("unet.") else layer
                        for name, layer in bank.layers.items()}
    return unet_copy, bank_copy


def export_unet(unet: nn.Module, bank, shape: GraphShape, out_dir: Path) -> Path:
    """Exports the banked UNet to ``out_dir/unet.onnx`` (+ external data, layers.json), traced on a
    copy that shares its weights (`_export_copy`): serving never waits for an export."""
    from torch.export import Dim

    if bank is not None:
        unet, bank = _export_copy(unet, bank)
    graph = BankedUNetGraph(unet, bank).eval()
    args = example_inputs(graph, shape)
    batch = Dim("batch", min=1, max=shape.max_rows)
    dynamic = [{0: batch}, {0: batch}, {0: batch}]
    names = list(INPUTS[:3])
    if bank is not None:
        dynamic += [{0: batch}, {0: batch}, [None] * len(args[5])]
        names += list(INPUTS[3:]) + [n for i in range(len(graph.layer_names)) for n in bank_input_names(i)]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / GRAPH_FILE
    global exports_done
    exports_done += 1
    # Tracing swaps the (copied) bank's routing tensors for the call's arguments.
    with torch.no_grad():
        torch.onnx.export(
            graph, args, str(path), dynamo=True, dynamic_shapes=tuple(dynamic), input_names=names,
            output_names=[OUTPUT], external_data=True,
            # onnxruntime and TensorRT optimize the graph themselves; the exporter's own pass only
            # doubled the export time here.
            optimize=False, verbose=False,
        )
    _name_batch_axis(path)
    (out_dir / META_FILE).write_text(json.dumps({
        "layers": graph.layer_names, "shape": shape.__dict__,
        "bank": None if bank is None else {"slots": bank.num_slots, "rank": bank.max_rank,
                                           "adapters_per_row": bank.max_adapters_per_row},
    }, indent=1))
    return path


def _name_batch_axis(path: Path) -> None:
    """The exporter names the batch axis after its symbol (e.g. "s33"); call it "batch"."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_param = "batch"
    onnx.save(model, str(path))


def cached_unet(unet: nn.Module, bank, shape: GraphShape, cache_dir: Path) -> Path | None:
    """The cached graph for (weights, bank layout, shape), or None."""
    final = cached_unet_dir(unet, bank, shape, cache_dir)
    return final / GRAPH_FILE if (final / META_FILE).is_file() else None


def _remove_abandoned_exports(cache_dir: Path) -> None:
    """Temporary folders of exports whose process died (killed mid-export): gigabytes at SD size."""
    for tmp in cache_dir.glob(".export-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)


def exported_unet(unet: nn.Module, bank, shape: GraphShape, cache_dir: Path) -> Path:
    """The cached graph for (weights, bank layout, shape), exporting it first if needed.

    Written to a temporary folder and renamed into place, so a crash mid-export leaves no half
    graph (its folder is removed by the next export), and two processes exporting at once both end
    up with one complete copy.
    """
    cache_dir = Path(cache_dir)
    final = cached_unet_dir(unet, bank, shape, cache_dir)
    if (final / META_FILE).is_file():
        return final / GRAPH_FILE
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_exports(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=cache_dir))
    try:
        log.info("exporting the UNet to ONNX (%s rows max, %dx%d latents) into %s", shape.max_rows,
                 shape.height, shape.width, final)
        export_unet(unet, bank, shape, tmp)
        if final.exists() and not (final / META_FILE).is_file():
            shutil.rmtree(final)  # not ours to keep: a folder without its metadata is no graph
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / GRAPH_FILE


def cached_unet_dir(unet: nn.Module, bank, shape: GraphShape, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"unet-{graph_key(unet, bank, shape)}"
