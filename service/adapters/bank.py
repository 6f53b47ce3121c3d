"""The adapter bank: many LoRA adapters resident at once, a different one per batch row, in one call.

Each targeted ``nn.Linear`` is replaced by a ``BankedLoRALinear`` (each targeted ``nn.Conv2d`` by a
``BankedLoRAConv2d``, conv.py, the same scheme for conv LoRA) holding preallocated, zero-padded
LoRA stacks for S slots (``lora_A`` [S, r, in], ``lora_Bt`` [S, r, out] with the scale folded in).
A ``BankState`` shared by all layers says, per batch row, which K slots to apply and with what
weights. The forward pass gathers those slots (rows x K at once, no loop over adapters) and applies

    y_row = x_row @ (W^T + (A[slots]^T * weights) @ Bt[slots]) + bias      (many tokens per row)
    y_row = base(x_row) + ((x_row @ A[slots]^T) * weights) @ Bt[slots]     (few tokens, wide layer)

whichever needs fewer multiply-adds for the layer's shape. Slot 0 is all zeros, so a row routed
there gets the base layer's output (bit-exact in the factored form, to fp rounding in the merged
one: a bmm instead of the Linear's addmm).

Everything a forward pass reads is a tensor allocated once and only ever written in place
(``copy_``): swapping adapters or routing a new batch changes no Python attribute, tensor identity,
shape or stride, so a ``torch.compile``'d UNet is not recompiled and CUDA graphs keep their
addresses. Residency (which adapter lives in which slot) belongs to ``AdapterManager``; the bank
only stores slots and routes rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from service.engine.construction import MODULE_CONSTRUCTION

from .conv import BankedLoRAConv2d, replace_convs
from .errors import AdapterFormatError
from .formats import Adapter, ServedModel, family_mismatch, validate_adapter

# Attention projections of self-attention (attn1) and cross-attention (attn2) in diffusers' UNets.
DEFAULT_UNET_TARGETS = tuple(
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
)
# What diffusers' text-encoder LoRA trains on CLIP.
DEFAULT_TEXT_ENCODER_TARGETS = tuple(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
# What the serving banks hold: the above (what our trainers and diffusers' examples train) and the
# other Linear layers community LoRAs train, so a kohya/A1111 file is served whole: kohya's default
# network also trains each transformer block's feed-forward (GEGLU's proj, the output Linear) and,
# where they are Linear (SD 2.x, SDXL), proj_in/proj_out; its LoCon variant the resnets' time
# embedding projection; on CLIP, the MLP. Slot memory and the factored LoRA's compute grow with
# them (docs/adapter_bank.md); rows routed to slot 0 still get the base layers exactly.
SERVED_UNET_TARGETS = DEFAULT_UNET_TARGETS + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_emb_proj")
SERVED_TEXT_ENCODER_TARGETS = DEFAULT_TEXT_ENCODER_TARGETS + ("mlp.fc1", "mlp.fc2")
# The UNet convolutions community LoRAs train, by the setting that chooses them (adapter_conv_layers,
# the same for the serving banks and the gateway's import check; docs/adapter_bank.md has their cost):
# "proj": kohya's 1x1 ``proj_in``/``proj_out`` of each Transformer2DModel (SD 1.x models and others
# without linear projections; SD 2.x's and SDXL's are Linear, not matched here), what kohya's default
# LoRA trains; "locon": also LyCORIS LoCon's (and kohya's conv_dim) resnet convs (3x3 ``conv1``/``conv2``,
# 1x1 ``conv_shortcut``) and down/upsampler convs: 19 MiB per slot at rank 16 in fp16 on SD 1.5, and
# every call computes K * max_rank more channels on each (+6% FLOPs on SD 1.5, 2x the time of the
# embedded tiny model), so it is not the default.
CONV_LAYERS = {
    "none": (),
    "proj": ("proj_in", "proj_out"),
    "locon": ("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"),
}
DEFAULT_CONV_LAYERS = "proj"
DEFAULT_UNET_CONV_TARGETS = CONV_LAYERS[DEFAULT_CONV_LAYERS]

# One routing entry: a slot, or (slot, weight).
RowAdapters = Sequence[int | tuple[int, float]]


class BankState:
    """Per-batch routing read by every banked layer: row -> K (slot, weight) pairs.

    Preallocated for ``max_rows`` rows; a call with R rows reads the first R. Rows not routed
    (and every row outside ``AdapterBank.activate``) point at slot 0 with weight 0.
    """

    def __init__(
        self, max_rows: int, max_adapters_per_row: int, max_rank: int, device: torch.device, dtype: torch.dtype
    ):
        self.slot_ids = torch.zeros(max_rows, max_adapters_per_row, dtype=torch.long, device=device)
        self.weights = torch.zeros(max_rows, max_adapters_per_row, dtype=dtype, device=device)
        # weights repeated over each adapter's rank columns, [rows, 1, K*r]: computed once per batch
        # here instead of once per layer.
        self.coef = torch.zeros(max_rows, 1, max_adapters_per_row * max_rank, dtype=dtype, device=device)

    @property
    def max_rows(self) -> int:
        return self.slot_ids.shape[0]


class BankedLoRALinear(nn.Module):
    """A Linear layer plus a per-row mixture of LoRA slots. Reads slots; never decides residency."""

    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int, state: BankState):
        super().__init__()
        self.base = base
        self.state = state  # a plain object shared by all layers, deliberately not a submodule
        self.max_rank = max_rank
        w = base.weight
        # Non-persistent buffers: they follow the layer's device but stay out of the UNet's
        # state_dict, so save_pretrained of a banked UNet still writes the plain base model.
        like = dict(dtype=w.dtype, device=w.device)
        self.register_buffer("lora_A", torch.zeros(num_slots, max_rank, base.in_features, **like), persistent=False)
        # B is stored transposed ([r, out]) so the gathered stack is already the bmm's right operand.
        self.register_buffer("lora_Bt", torch.zeros(num_slots, max_rank, base.out_features, **like), persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def module_shape(self) -> tuple[int, int]:
        """(out, in): what an adapter's tensors are checked against."""
        return (self.base.out_features, self.base.in_features)

    @staticmethod
    def down_layout(down: torch.Tensor) -> torch.Tensor:
        """An adapter's down/A as the slot stores it ([r, in]; a 1x1 conv kernel flattened)."""
        return down.reshape(down.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, in_features, out_features = x.shape[0], self.in_features, self.out_features
        if rows > self.state.max_rows:
            raise ValueError(f"batch of {rows} rows exceeds the adapter bank's max_rows {self.state.max_rows}")
        slots = self.state.slot_ids[:rows].reshape(-1)  # [R*K]
        coef = self.state.coef[:rows]  # [R, 1, K*r], the row's adapter weights per rank column
        kr = coef.shape[2]
        # Each row's K adapters side by side along the rank axis: one gather, one bmm for all.
        a = self.lora_A.index_select(0, slots).view(rows, kr, in_features)  # [R, K*r, in]
        bt = self.lora_Bt.index_select(0, slots).view(rows, kr, out_features)  # [R, K*r, out]
        xs = x.reshape(rows, -1, in_features)  # [R, N, in]
        tokens = xs.shape[1]
        if tokens * (in_features + out_features) > in_features * out_features:
            # Many tokens per row (UNet attention): fold the update into a per-row weight,
            # (W + B diag(w) A)^T, and do one [N, in] x [in, out] product per row. Skinny
            # [N, in] x [in, K*r] products cost more than the merge on CPU and GPU alike.
            wt = torch.baddbmm(self.base.weight.t(), a.transpose(1, 2) * coef, bt)  # [R, in, out]
            y = torch.bmm(xs, wt)
            if self.base.bias is not None:
                y = y + self.base.bias
        else:
            # Few tokens, wide layers (e.g. cross-attention K/V over 77 text tokens): factored.
            h = torch.bmm(xs, a.transpose(1, 2)) * coef  # [R, N, K*r]
            y = torch.baddbmm(self.base(xs), h, bt)
        return y.view(*x.shape[:-1], out_features)

    def extra_repr(self) -> str:
        return f"slots={self.lora_A.shape[0]}, max_rank={self.max_rank}"


def replace_linears(
    root: nn.Module, prefix: str, targets: Sequence[str], make: Callable[[nn.Linear], nn.Module]
) -> dict[str, nn.Module]:
    """Replaces each nn.Linear whose path ends with a target by ``make(linear)``; returns the new
    layers keyed ``<prefix>.<path>`` (the adapter format's module names). The trainers' LoRA layers
    use it too, so a trained adapter names exactly the layers the bank serves."""
    replaced = {}
    with MODULE_CONSTRUCTION:  # see service/engine/construction.py
        for name, module in list(root.named_modules()):
            # Only whole path components match ("attn1.to_q", not "xattn1.to_q").
            if not isinstance(module, nn.Linear) or not any(name == t or name.endswith("." + t) for t in targets):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            layer = make(module)
            setattr(parent, child, layer)  # works for ModuleList children ("to_out.0") too
            replaced[f"{prefix}.{name}"] = layer
    return replaced


class AdapterBank:
    """S preallocated LoRA slots on every targeted layer of a UNet (and optionally its text encoder).

    Args:
        unet: the model to serve adapters on; modified in place (targets become BankedLoRALinear,
            conv targets BankedLoRAConv2d).
            Build the bank after moving the model to its final device and dtype.
        num_slots: slots including slot 0 (the base model), so S - 1 adapters can be resident.
        max_rank: the largest LoRA rank a slot holds; lower ranks are zero-padded, exactly.
        max_rows: the largest batch (rows of one model call, CFG halves included) to route.
        max_adapters_per_row: K, how many adapters one row may mix with weights.
        conv_target_modules: the UNet's Conv2d layers to serve LoRA on (path suffixes, e.g.
            DEFAULT_UNET_CONV_TARGETS); none by default. Each costs slot memory whether or not an
            adapter uses it, and a little compute on every call (K * max_rank extra channels).
        text_encoder: optionally the CLIP text encoder: its LoRA layers join the bank (same slots),
            and its embedding width is what textual-inversion vectors are checked against.
        text_encoder_2: SDXL's second text encoder, banked like the first (module names
            ``text_encoder_2.*``); a learned token's vector is both widths concatenated.
        family_title: the model family's title (service/engine/families, e.g. "Stable Diffusion
            XL"): a refusal of an adapter made for another family names both.
    """

    def __init__(
        self,
        unet: nn.Module,
        num_slots: int,
        max_rank: int,
        *,
        target_modules: Sequence[str] = DEFAULT_UNET_TARGETS,
        conv_target_modules: Sequence[str] = (),
        text_encoder: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
        text_encoder_target_modules: Sequence[str] = DEFAULT_TEXT_ENCODER_TARGETS,
        max_rows: int = 64,
        max_adapters_per_row: int = 4,
        family_title: str | None = None,
    ):
        if num_slots < 2:
            raise ValueError("num_slots must be at least 2 (slot 0 is the base model)")
        if max_rank < 1 or max_adapters_per_row < 1 or max_rows < 1:
            raise ValueError("max_rank, max_rows and max_adapters_per_row must be positive")
        # The routing state lives where the loaded model runs: a model not loaded (meta device, e.g.
        # the UNet of a Triton text_encoder instance) gets banked layers without memory.
        params = [next(unet.parameters())] + ([next(text_encoder.parameters())] if text_encoder is not None else [])
        param = next((p for p in params if p.device.type != "meta"), params[0])
        self.device, self.dtype = param.device, param.dtype
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.state = BankState(max_rows, max_adapters_per_row, max_rank, self.device, self.dtype)
        # Serializes routed calls: the state is per batch, and one batch runs at a time.
        self._lock = threading.RLock()

        def make(linear: nn.Linear) -> BankedLoRALinear:
            return BankedLoRALinear(linear, num_slots, max_rank, self.state)

        # The UNet's text-conditioning width, read before the layers are replaced (whether or not
        # cross-attention is banked): what an adapter made for another family is told apart by.
        text_width = next((m.in_features for n, m in unet.named_modules()
                           if n.endswith("attn2.to_k") and isinstance(m, nn.Linear)), None)
        self.layers: dict[str, BankedLoRALinear | BankedLoRAConv2d] = replace_linears(unet, "unet", target_modules, make)
        self.layers.update(replace_convs(
            unet, "unet", conv_target_modules, lambda conv: BankedLoRAConv2d(conv, num_slots, max_rank, self.state)))
        # The UNet's convs a conv LoRA may train that this bank does not serve: a refusal names the
        # setting that would (rather than only "not a module this model serves").
        self.unbanked_convs = {f"unet.{n}" for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)
                               and any(n == t or n.endswith("." + t) for t in CONV_LAYERS["locon"])}
        self.hidden_size: int | None = None
        self.text_encoders = [("text_encoder", e) for e in (text_encoder,) if e is not None]
        self.text_encoders += [("text_encoder_2", e) for e in (text_encoder_2,) if e is not None]
        for prefix, encoder in self.text_encoders:
            self.layers.update(replace_linears(encoder, prefix, text_encoder_target_modules, make))
        widths = {prefix: e.get_input_embeddings().embedding_dim for prefix, e in self.text_encoders}
        if self.text_encoders:
            self.hidden_size = sum(widths.values())
        self.model = ServedModel(family_title, text_width, widths)
        if not any(k.startswith("unet.") for k in self.layers):
            raise ValueError(f"no nn.Linear in the UNet matches target_modules {tuple(target_modules)}")

    # --------------------------------------------------------------------------------------------
    # Slots

    @property
    def module_shapes(self) -> dict[str, tuple[int, ...]]:
        """Module name -> (out_features, in_features) of a Linear, (out, in, kh, kw) of a Conv2d."""
        return {name: layer.module_shape for name, layer in self.layers.items()}

    @property
    def max_adapters_per_row(self) -> int:
        return self.state.slot_ids.shape[1]

    def prepare(self, adapter: Adapter) -> Adapter:
        """``adapter`` with module names resolved to this bank's layers, validated.

        Raises AdapterFormatError unless every tensor fits (naming the family an adapter was made
        for when its shapes say it is not this model's). transformers 5 dropped the
        ``text_model.`` level of CLIPTextModel's module names; files trained with transformers 4
        still carry it, so both spellings resolve to the same layer.
        """
        lora = {}
        for name, module in adapter.lora.items():
            prefix = name.partition(".")[0]
            if name not in self.layers and prefix in ("text_encoder", "text_encoder_2"):
                local = name.removeprefix(prefix + ".")
                for alias in (local.removeprefix("text_model."), "text_model." + local):
                    if f"{prefix}.{alias}" in self.layers:
                        name = f"{prefix}.{alias}"
                        break
            lora[name] = module
        adapter = replace(adapter, lora=lora)
        unbanked = sorted(m for m in lora if m in self.unbanked_convs)
        if unbanked and not family_mismatch(adapter, self.model, self.hidden_size):
            module = unbanked[0]
            level = next(level for level in ("proj", "locon")
                         if any(module.endswith("." + t) for t in CONV_LAYERS[level]))
            served = sorted({n.rpartition(".")[2] for n, layer in self.layers.items() if isinstance(layer, BankedLoRAConv2d)})
            served_text = f"the UNet's {', '.join(served)} convolutions" if served else "no UNet convolution"
            raise AdapterFormatError(
                f"{module}: a convolution LoRA (kohya's 1x1 proj_in/proj_out, LyCORIS LoCon) on a layer this "
                f"server's adapter bank does not serve ({len(unbanked)} such layers; it serves LoRA on {served_text}); "
                f"the setting adapter_conv_layers={level} (STEERSERVE_ADAPTER_CONV_LAYERS) serves it")
        validate_adapter(adapter, self.module_shapes, self.max_rank, self.dtype, self.hidden_size, self.model)
        return adapter

    def load_slot(self, slot: int, adapter: Adapter, *, check: bool = True) -> None:
        """Copy ``adapter`` into ``slot`` in place (modules it does not touch are zeroed).

        Validation happens before the first write, so a refused adapter leaves the slot as it was.
        The caller must ensure no in-flight batch routes rows to ``slot`` (AdapterManager pins).
        ``check=False`` skips validation for an adapter already returned by ``prepare``.
        """
        self._check_slot(slot)
        if check:
            adapter = self.prepare(adapter)
        with torch.no_grad():
            for name, layer in self.layers.items():
                lora = adapter.lora.get(name)
                layer.lora_A[slot].zero_()
                layer.lora_Bt[slot].zero_()
                if lora is None:
                    continue
                r = lora.rank
                layer.lora_A[slot, :r].copy_(layer.down_layout(lora.down))
                # Fold the scale into B once here (in fp32) rather than multiplying on every call.
                up = lora.up.reshape(lora.up.shape[0], -1)  # a conv's [out, r, 1, 1] too
                layer.lora_Bt[slot, :r].copy_((up.float() * lora.scale).t())

    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_A[slot].zero_()
                layer.lora_Bt[slot].zero_()

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is out of range 1..{self.num_slots - 1} (slot 0 is the base model)")

    # --------------------------------------------------------------------------------------------
    # Routing

    @contextmanager
    def activate(self, rows: Sequence[RowAdapters], *, repeat: int = 1) -> Iterator[None]:
        """Route model calls made inside the block: batch row i applies the adapters of ``rows[i]``.

        Each entry of a row is a slot or a (slot, weight) pair (weight 1.0 by default); an empty
        row or slot 0 is the base model. ``repeat=2`` tiles the rows for a classifier-free
        guidance batch laid out as [uncond rows; cond rows], so both halves of a pair get the
        same adapters. Routed calls are serialized across threads: one batch runs at a time.
        """
        num_rows = len(rows) * repeat
        if num_rows > self.state.max_rows:
            raise ValueError(f"{num_rows} rows exceed the bank's max_rows {self.state.max_rows}")
        k = self.max_adapters_per_row
        slot_ids = torch.zeros(len(rows), k, dtype=torch.long)
        weights = torch.zeros(len(rows), k, dtype=torch.float32)
        for i, row in enumerate(rows):
            if len(row) > k:
                raise ValueError(f"row {i} mixes {len(row)} adapters; the bank allows {k} per row")
            for j, entry in enumerate(row):
                slot, weight = entry if isinstance(entry, tuple) else (entry, 1.0)
                if not 0 <= slot < self.num_slots:
                    raise ValueError(f"row {i}: slot {slot} is out of range 0..{self.num_slots - 1}")
                slot_ids[i, j], weights[i, j] = slot, weight
        slot_ids, weights = slot_ids.repeat(repeat, 1), weights.repeat(repeat, 1)
        with self._lock:
            self._write_state(slot_ids, weights)
            try:
                yield
            finally:
                # Outside activate() every row is the base model again.
                self._write_state(None, None)

    def _write_state(self, slot_ids: torch.Tensor | None, weights: torch.Tensor | None) -> None:
        state = self.state
        for t in (state.slot_ids, state.weights, state.coef):
            t.zero_()
        if slot_ids is None:
            return
        n = slot_ids.shape[0]
        state.slot_ids[:n].copy_(slot_ids)
        state.weights[:n].copy_(weights)
        state.coef[:n, 0].copy_(weights.repeat_interleave(self.max_rank, dim=1))

    def slot_nbytes(self) -> int:
        """Device memory one slot takes across all layers."""
        return sum(
            (layer.lora_A[0].numel() + layer.lora_Bt[0].numel()) * layer.lora_A.element_size()
            for layer in self.layers.values()
        )


__all__ = [
    "replace_linears",
    "AdapterBank",
    "BankedLoRALinear",
    "BankedLoRAConv2d",
    "BankState",
    "DEFAULT_UNET_TARGETS",
    "DEFAULT_UNET_CONV_TARGETS",
    "CONV_LAYERS",
    "DEFAULT_TEXT_ENCODER_TARGETS",
]
