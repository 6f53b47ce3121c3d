"""IP-Adapter files in the published layout, as diffusers' `load_ip_adapter` reads them.

A file holds two parts: `image_proj.*` (the image encoder's embedding -> T tokens of the UNet's
cross-attention width) and `ip_adapter.{k}.to_k_ip.weight` / `.to_v_ip.weight` (each cross-attention
layer's K/V projections for those tokens). `.safetensors` files are flat (`image_proj.proj.weight`);
`.bin` files are a nested dict ({"image_proj": {...}, "ip_adapter": {...}}).

k numbers the UNet's attention processors in diffusers' order (`unet.attn_processors`: down blocks,
up blocks, then the mid block; attn1 before attn2): the cross-attention layers are 1, 3, 5, ...
(SD 1.5: 1..31, SDXL: 1..139). Projections: the base layout (`proj` + `norm`, diffusers'
ImageProjection, 4 tokens of the CLIP image embedding) and the "plus" layout (a perceiver resampler
over the encoder's penultimate hidden states, IPAdapterPlusImageProjection). Face-ID layouts are
refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from service.engine.construction import MODULE_CONSTRUCTION

from .attention import ImagePromptAttnProcessor
from .packing import ImagePromptLayout


class ImagePromptFileError(ValueError):
    """The file is not an IP-Adapter this UNet can take; the message names why."""


@dataclass
class IPAdapter:
    projection: nn.Module  # image embeddings [B, E] (base) or hidden states [B, S, E] (plus) -> [B, T, D]
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # attn2 module name -> (to_k_ip, to_v_ip) weights
    tokens: int  # T per image
    kind: str  # "base" | "plus"
    image_embed_width: int  # E the projection takes


def read(path_or_state: str | Path | Mapping) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": {...}, "ip_adapter": {...}} of a published file (or such a dict)."""
    if isinstance(path_or_state, Mapping):
        state = dict(path_or_state)
    else:
        path = Path(path_or_state)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(path)
            state = {"image_proj": {}, "ip_adapter": {}}
            for key, value in flat.items():
                part, _, rest = key.partition(".")
                if part in state:
                    state[part][rest] = value
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    if not state.get("image_proj") or not state.get("ip_adapter"):
        raise ImagePromptFileError("not an IP-Adapter file: it needs both `image_proj` and `ip_adapter` weights")
    return state


def cross_attention_layers(unet: nn.Module) -> dict[int, str]:
    """Published key number -> the attn2 module's name, in diffusers' numbering."""
    out, key = {}, 1
    for name in unet.attn_processors:
        module = name.removesuffix(".processor")
        if module.endswith("attn2"):
            out[key] = module
            key += 2
    return out


def _projection(image_proj: Mapping[str, torch.Tensor], width: int) -> tuple[nn.Module, int, str, dict, int]:
    """(module, tokens per image, kind, its state dict in diffusers' names, embedding width E)."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    if "proj.weight" in image_proj:  # base: Linear(E -> T*D) + LayerNorm(D)
        out_features, embed = image_proj["proj.weight"].shape
        tokens = out_features // width
        if tokens * width != out_features or image_proj["norm.weight"].shape[0] != width:
            raise ImagePromptFileError(f"its image projection makes tokens {image_proj['norm.weight'].shape[0]} wide, "
                                       f"this UNet's cross-attention is {width} wide")
        module = ImageProjection(image_embed_dim=embed, cross_attention_dim=width, num_image_text_embeds=tokens)
        state = {("image_embeds." + k[len("proj."):]) if k.startswith("proj.") else k: v for k, v in image_proj.items()}
        return module, tokens, "base", state, embed
    if "latents" in image_proj and "proj_in.weight" in image_proj:  # plus: the perceiver resampler
        _, queries, hidden = image_proj["latents"].shape
        embed = image_proj["proj_in.weight"].shape[1]
        out = image_proj["proj_out.weight"].shape[0]
        if out != width:
            raise ImagePromptFileError(f"its image projection makes tokens {out} wide, this UNet's cross-attention is {width} wide")
        depth = len({k.split(".")[1] for k in image_proj if k.startswith("layers.")})
        heads = image_proj["layers.0.0.to_q.weight"].shape[0] // 64
        module = IPAdapterPlusImageProjection(embed_dims=embed, output_dims=out, hidden_dims=hidden, depth=depth,
                                              dim_head=64, heads=heads, num_queries=queries)
        state = {}
        for key, value in image_proj.items():
            parts = key.split(".")
            if parts[0] != "layers":
                state[key] = value
                continue
            i, rest = parts[1], ".".join(parts[2:])
            if rest == "0.to_kv.weight":  # one K/V matrix there, two here
                k, v = value.chunk(2, dim=0)
                state[f"layers.{i}.attn.to_k.weight"], state[f"layers.{i}.attn.to_v.weight"] = k, v
                continue
            renamed = {"0.norm1": "ln0", "0.norm2": "ln1", "0.to_q": "attn.to_q", "0.to_out": "attn.to_out.0",
                       "1.0": "ff.0", "1.1": "ff.1.net.0.proj", "1.3": "ff.1.net.2"}
            prefix, _, leaf = rest.rpartition(".")
            if prefix not in renamed:
                raise ImagePromptFileError(f"unknown image projection weight {key}")
            state[f"layers.{i}.{renamed[prefix]}.{leaf}"] = value
        return module, queries, "plus", state, embed
    if "perceiver_resampler.proj_in.weight" in image_proj or "norm.weight" in image_proj:
        raise ImagePromptFileError("an IP-Adapter Face-ID file: its projection takes face-recognition embeddings, which are not served")
    raise ImagePromptFileError("its image projection is of no known IP-Adapter layout (base `proj`, plus `latents`)")


def load_projection(image_proj: Mapping[str, torch.Tensor], width: int) -> tuple[nn.Module, int, str, int]:
    """(projection module, tokens per image, kind, embedding width) of a file's `image_proj` part,
    for a UNet whose cross-attention is `width` wide (what photos need: no UNet)."""
    with MODULE_CONSTRUCTION:
        projection, tokens, kind, proj_state, embed = _projection(image_proj, width)
    try:
        projection.load_state_dict(proj_state, strict=True)
    except RuntimeError as err:
        raise ImagePromptFileError(f"its image projection does not load: {err}") from None
    return projection.eval().requires_grad_(False), tokens, kind, embed


def load(path_or_state, unet: nn.Module) -> IPAdapter:
    """The file checked against `unet` (every cross-attention layer has its K/V, of its widths)."""
    state = read(path_or_state)
    width = unet.config.cross_attention_dim
    projection, tokens, kind, embed = load_projection(state["image_proj"], width)
    layers, wanted = {}, cross_attention_layers(unet)
    found = {int(k.split(".")[0]) for k in state["ip_adapter"]}
    if found != set(wanted):
        raise ImagePromptFileError(f"it has K/V for attention layers {sorted(found)[:6]}...({len(found)}), this UNet's "
                                   f"cross-attention layers are {sorted(wanted)[:6]}...({len(wanted)}): made for another model")
    modules = dict(unet.named_modules())
    for key, name in wanted.items():
        k, v = state["ip_adapter"][f"{key}.to_k_ip.weight"], state["ip_adapter"][f"{key}.to_v_ip.weight"]
        inner = getattr(modules[name], "inner_kv_dim", modules[name].inner_dim)  # to_k may be wrapped (the bank's LoRA)
        if k.shape != (inner, width) or v.shape != (inner, width):
            raise ImagePromptFileError(f"layer {key} ({name}): K/V {tuple(k.shape)}, this UNet needs {(inner, width)}")
        layers[name] = (k, v)
    return IPAdapter(projection, layers, tokens, kind, embed)


def install(unet: nn.Module, adapter: IPAdapter, layout: ImagePromptLayout) -> None:
    """Puts the adapter's decoupled cross-attention on every attn2 of `unet` (attn1 keeps its own)."""
    modules = dict(unet.named_modules())
    param = next(unet.parameters())
    with MODULE_CONSTRUCTION:
        for name, (k, v) in adapter.layers.items():
            to_k, to_v = (nn.Linear(w.shape[1], w.shape[0], bias=False, device=param.device, dtype=param.dtype) for w in (k, v))
            with torch.no_grad():
                to_k.weight.copy_(k)
                to_v.weight.copy_(v)
            processor = ImagePromptAttnProcessor(to_k.requires_grad_(False), to_v.requires_grad_(False), layout)
            modules[name].set_processor(processor)
