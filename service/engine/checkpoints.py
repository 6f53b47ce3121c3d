"""Single-file Stable Diffusion checkpoints -> diffusers folders, offline.

Most checkpoints people share are ONE `.safetensors` file in the original (A1111 / ComfyUI /
Stability "ldm" and "sgm") layout: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
and the text encoder(s) under `cond_stage_model.transformer.*` (SD 1.x, CLIP ViT-L),
`cond_stage_model.model.*` (SD 2.x, OpenCLIP ViT-H) or `conditioner.embedders.0.transformer.*` +
`conditioner.embedders.1.model.*` (SDXL base, CLIP ViT-L + OpenCLIP ViT-bigG). Everything in
SteerServe downstream of the model setting reads a diffusers folder, so a file is converted into one:
`steerserve convert-checkpoint FILE DIR` once, or automatically when STEERSERVE_MODEL_DIR names the
file (`served_folder`: a cache folder under the data dir, converted on the first start only).

How, and what decides what:
- The key renaming is diffusers' own (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
  `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint` of diffusers.loaders.single_file_utils,
  what `from_single_file` runs), never `from_single_file` itself: that one fetches the component
  configs from the Hub. Here they ship with the package (service/engine/checkpoint_configs).
- Architecture sizes come from the checkpoint's tensor shapes (block widths, layers per block,
  transformer depth per level, linear or 1x1-conv projections, cross-attention width, SDXL's added
  conditioning, VAE widths, text encoder width/depth/MLP/vocabulary/positions): a fine-tune or a
  reduced model of the same structure converts as itself. Before any weight is written, every
  component's converted tensors must match, key for key and shape for shape, the model its config
  builds (on the meta device): a file that does not fit is refused, never half-converted.
- What tensors cannot say comes from the family's shipped config, unless a sidecar overrides it:
  attention heads (SD 1.x: 8 heads; SD 2.x/XL UNet and every CLIP/OpenCLIP text tower: 64-wide
  heads, as all published ones), activations, image size, VAE scaling factor, the schedule.
- Prediction type (noise or velocity is not in the weights), first rule that applies:
  1. the explicit setting (`--prediction-type`, STEERSERVE_CHECKPOINT_PREDICTION_TYPE);
  2. a `<name>.steerserve.json` sidecar's `scheduler.prediction_type`;
  3. a `<name>.yaml` sidecar (the original config A1111/ComfyUI read next to a checkpoint):
     `parameterization: "v"` is v-prediction, absent is epsilon (the original code's default);
  4. a `v_pred` tensor in the file (the marker ComfyUI reads; `ztsnr` also turns on zero-terminal-SNR);
  5. diffusers' `from_single_file` default: SD 2.x is v-prediction (the 768 px 2.0/2.1 models)
     unless the file's `global_step` is 875000 (SD 2.0 base); SD 1.x and SDXL predict noise.
  An SD 2.x predicting v converts with the 768 px config, predicting noise with the 512 px base one.
- Sidecars, next to the file, same name: `<name>.yaml` (read with yaml.safe_load:
  `parameterization`, `scale_factor`, `linear_start`/`linear_end`/`timesteps`, the UNet's
  `num_heads`/`num_head_channels`) and `<name>.steerserve.json`: diffusers config values per
  component (`{"unet": {...}, "vae": {...}, "text_encoder": {...}, "text_encoder_2": {...},
  "scheduler": {...}}`) laid over everything else, for what a fine-tune changed that its tensors
  do not show.
- Tokenizers are built offline from the BPE vocabulary shipped with the package
  (service/engine/tokenizer.py): SD 1.x pads with <|endoftext|>, SD 2.x's and SDXL's second
  tokenizer with "!", as the published ones.
- Refused in one line, each saying why: pickle files (`.ckpt`, `.pt`, `.bin`, or pickle/zip
  content under any name: never unpickled, unpickling can run code), files that are not
  safetensors, LoRA adapters, textual-inversion embeddings, diffusers-layout weight files,
  checkpoints without a UNet, VAE or text encoder, inpainting/instruct UNets (more than 4 input
  channels), the SDXL refiner, and other architectures (SD3, Flux, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch

from service.engine import checkpoint_configs
from service.engine.families import UnsupportedModel
from service.engine.publish import publish_folder

log = logging.getLogger("steerserve.checkpoints")

# Bump when a conversion of the same file would come out differently: cache folders are keyed by it.
CONVERTER_VERSION = 1
PREDICTION_TYPES = ("epsilon", "v_prediction")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SIDECAR_JSON = ".steerserve.json"
SIDECAR_YAML = (".yaml", ".yml")
COMPONENT_KEYS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")

UNET = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPENCLIP = "cond_stage_model.model."
XL_CLIP = "conditioner.embedders.0.transformer."
XL_OPENCLIP = "conditioner.embedders.1.model."
XL_REFINER_OPENCLIP = "conditioner.embedders.0.model."
TITLES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL base"}
# SD 2.x conditions on the penultimate block of OpenCLIP ViT-H's 24: diffusers' SD 2 text encoder
# has 23 layers and from_single_file skips block 23 (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE).
SD2_UNUSED_BLOCK = 23
SD2_BASE_GLOBAL_STEP = 875000  # diffusers' tell of SD 2.0 base (epsilon) among SD 2.x files


class CheckpointError(UnsupportedModel):
    """A file that is not a single-file checkpoint SteerServe converts (said in one line)."""


@dataclasses.dataclass(frozen=True)
class Converted:
    """What convert_checkpoint wrote and why (also in the folder's steerserve_checkpoint.json)."""

    folder: Path
    family: str  # "sd1", "sd2", "sdxl"
    config: str  # the shipped config set it started from (checkpoint_configs)
    prediction_type: str
    prediction_source: str

    def describe(self) -> str:
        return (f"{TITLES[self.family]} ({self.config} configs), prediction {self.prediction_type} "
                f"({self.prediction_source})")


# -- reading a file safely -------------------------------------------------------------------------


class _Tensors(Mapping):
    """A safetensors file's tensors, read on access (diffusers' converters take a mapping): a
    component's tensors are in memory only while it is converted."""

    def __init__(self, handle, keys):
        self._handle = handle
        self._keys = list(keys)
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._set

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())


_PICKLE_WHY = "unpickling can run any code in the file; it is never unpickled here"


def open_checkpoint(path: str | Path):
    """(safe_open handle, _Tensors) of a safetensors file. Pickle files are refused by name before
    any byte is read, and by content (a torch.save zip or a pickle stream) when a file of another
    name is not safetensors; only the safetensors header (JSON) is ever parsed."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: a pickle checkpoint ({path.suffix}) is refused ({_PICKLE_WHY}); "
                              f"use the model's .safetensors file")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
    except Exception as err:  # safetensors raises its own error type for a bad header
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK" or head[:1] == b"\x80":  # torch.save's zip archive, or a raw pickle stream
            named = f"named {path.suffix}" if path.suffix else "without a suffix"
            raise CheckpointError(f"{path}: pickle content (a torch.save/.ckpt file {named}) is refused "
                                  f"({_PICKLE_WHY}); use the model's .safetensors file") from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a safetensors file ({reason}); single-file checkpoints are served "
                              f"from .safetensors only") from None
    return handle, _Tensors(handle, keys)


# -- what is in it ---------------------------------------------------------------------------------


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def classify(path: Path, tensors: _Tensors) -> str:
    """The family of a checkpoint ("sd1", "sd2", "sdxl") from its key layout, or CheckpointError
    naming what the file is instead."""
    keys = list(tensors)
    if not keys:
        raise CheckpointError(f"{path}: an empty safetensors file, not a model checkpoint")
    lora = [k for k in keys if re.search(r"(^|[._])lora[._]|\.alpha$|lora_(up|down|A|B)\b|\.hada_|\.lokr_", k)]
    if lora:
        raise CheckpointError(f"{path}: a LoRA adapter ({len(lora)} LoRA tensors, e.g. {lora[0]!r}), not a model "
                              f"checkpoint: import it as an adapter (steerserve adapters import)")
    if any(k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys) or \
            (len(keys) <= 2 and any(k.startswith("<") for k in keys)):
        raise CheckpointError(f"{path}: a textual-inversion embedding ({', '.join(keys[:2])}), not a model checkpoint: "
                              f"import it as an adapter")
    if not _has(keys, UNET + "input_blocks."):
        if _has(keys, UNET + "joint_blocks.") or _has(keys, "joint_blocks."):
            what = "a Stable Diffusion 3 checkpoint"
        elif _has(keys, UNET + "double_blocks.") or _has(keys, "double_blocks."):
            what = "a Flux checkpoint"
        elif _has(keys, "down_blocks.") or _has(keys, "text_model.") or _has(keys, "encoder.down_blocks."):
            what = "a diffusers-layout weights file (one component of a diffusers folder): serve the folder itself"
        else:
            what = f"no Stable Diffusion UNet ({UNET}input_blocks.*) in it (e.g. {keys[0]!r})"
        raise CheckpointError(f"{path}: {what}; not a single-file SD 1.x/2.x/XL checkpoint")
    if UNET + "input_blocks.0.0.weight" not in tensors:
        raise CheckpointError(f"{path}: its UNet has no input convolution ({UNET}input_blocks.0.0.weight): "
                              f"not a complete checkpoint")
    in_channels = tensors.shape(UNET + "input_blocks.0.0.weight")[1]
    if in_channels != 4:
        raise CheckpointError(f"{path}: its UNet takes {in_channels} input channels (an inpainting or instruct "
                              f"model); served: text-to-image UNets of 4 latent channels")
    if not any(_has(keys, p + "encoder.") for p in VAE_PREFIXES):
        raise CheckpointError(f"{path}: no VAE (first_stage_model.*) in it; a checkpoint without its VAE is not served")
    if _has(keys, XL_OPENCLIP) and _has(keys, XL_CLIP):
        return "sdxl"
    if _has(keys, XL_REFINER_OPENCLIP):
        raise CheckpointError(f"{path}: an SDXL refiner (one OpenCLIP text encoder, aesthetic-score conditioning), "
                              f"which is not served; served: SD 1.x, SD 2.x, SDXL base")
    if _has(keys, SD2_OPENCLIP):
        return "sd2"
    if _has(keys, SD1_CLIP):
        return "sd1"
    raise CheckpointError(f"{path}: no text encoder (cond_stage_model.* or conditioner.embedders.*) in it; "
                          f"a checkpoint without its text encoder is not served")


# -- sidecars and the prediction type --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sidecars:
    overrides: dict  # component -> config values (<name>.steerserve.json)
    original: dict | None  # the original (ldm) yaml config, safe-loaded
    files: tuple[Path, ...]


def sidecar_paths(path: Path) -> list[Path]:
    base = path.with_suffix("")
    return [p for p in [base.with_name(base.name + SIDECAR_JSON), *(base.with_suffix(s) for s in SIDECAR_YAML)]
            if p.is_file()]


def read_sidecars(path: Path) -> Sidecars:
    overrides: dict = {}
    original = None
    files = sidecar_paths(path)
    for side in files:
        if side.name.endswith(SIDECAR_JSON):
            try:
                overrides = json.loads(side.read_text())
            except ValueError as err:
                raise CheckpointError(f"{side}: not JSON ({err})") from None
            unknown = set(overrides) - set(COMPONENT_KEYS) if isinstance(overrides, dict) else {"(not an object)"}
            if unknown:
                raise CheckpointError(f"{side}: unknown keys {sorted(unknown)}; an object of {', '.join(COMPONENT_KEYS)}")
        else:
            import yaml

            try:
                original = yaml.safe_load(side.read_text())  # safe_load: plain data, never objects
            except yaml.YAMLError as err:
                raise CheckpointError(f"{side}: not YAML ({str(err).splitlines()[0]})") from None
            if not isinstance(original, dict) or not isinstance(original.get("model"), dict):
                raise CheckpointError(f"{side}: not an original (ldm) model config (no `model:` section)")
    return Sidecars(overrides, original, tuple(files))


def _original_params(original: dict | None) -> dict:
    return dict((original or {}).get("model", {}).get("params") or {})


def _original_unet_params(original: dict | None) -> dict:
    params = _original_params(original)
    section = params.get("unet_config") or params.get("network_config") or {}
    return dict(section.get("params") or {})


def prediction_type_for(family: str, tensors: _Tensors, sidecars: Sidecars, setting: str | None) -> tuple[str, str]:
    """(prediction type, the rule that chose it): see the module docstring."""
    if setting:
        if setting not in PREDICTION_TYPES:
            raise ValueError(f"prediction type {setting!r} is not one of {', '.join(PREDICTION_TYPES)}")
        return setting, "the prediction-type setting"
    side = (sidecars.overrides.get("scheduler") or {}).get("prediction_type")
    if side:
        if side not in PREDICTION_TYPES:
            raise CheckpointError(f"{SIDECAR_JSON}: scheduler.prediction_type {side!r} is not one of "
                                  f"{', '.join(PREDICTION_TYPES)}")
        return side, f"the {SIDECAR_JSON} sidecar"
    if sidecars.original is not None:
        param = _original_params(sidecars.original).get("parameterization", "eps")
        return ("v_prediction" if param == "v" else "epsilon"), f"the yaml sidecar (parameterization {param!r})"
    if "v_pred" in tensors:
        return "v_prediction", "the file's v_pred marker"
    if family == "sd2":
        step = _global_step(tensors)
        if step == SD2_BASE_GLOBAL_STEP:
            return "epsilon", f"SD 2.x with global_step {step} (SD 2.0 base), as diffusers"
        return "v_prediction", "SD 2.x default (768 px v-models), as diffusers' from_single_file"
    return "epsilon", f"{TITLES[family]} default"


def _global_step(tensors: _Tensors) -> int | None:
    if "global_step" not in tensors:
        return None
    try:
        return int(tensors["global_step"].reshape(-1)[0])
    except (RuntimeError, IndexError, ValueError):
        return None


# -- architecture from shapes ----------------------------------------------------------------------


class _Shapes:
    """Shapes of the tensors under one prefix (keys without it)."""

    def __init__(self, tensors: _Tensors, prefix: str):
        self.prefix = prefix
        self.keys = [k[len(prefix):] for k in tensors if k.startswith(prefix)]
        self._tensors = tensors

    def __contains__(self, key: str) -> bool:
        return self.prefix + key in self._tensors

    def __getitem__(self, key: str) -> tuple[int, ...]:
        if key not in self:
            raise CheckpointError(f"the checkpoint has no {self.prefix}{key}, which its layout needs")
        return self._tensors.shape(self.prefix + key)

    def count(self, prefix: str) -> int:
        """How many numbered children `prefix<N>.` has (N = 0, 1, ...)."""
        found = {int(m.group(1)) for k in self.keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return max(found) + 1 if found else 0

    def first(self, suffix: str) -> tuple[int, ...] | None:
        for k in self.keys:
            if k.endswith(suffix):
                return self[k]
        return None


def _heads(widths: list[int], needed: list[bool], rule: tuple[str, int], what: str, where: str) -> list[int]:
    """Attention heads per level by a rule: ("heads", n) or ("channels", c) per head."""
    kind, n = rule
    heads = []
    for width, need in zip(widths, needed):
        if kind == "heads":
            h = n
        else:
            h = width // n if width % n == 0 else 0
        if h <= 0 or width % h:
            if need:
                raise CheckpointError(
                    f"{where}: {what} is {width} wide, which {n}{'' if kind == 'heads' else '-channel'} heads do not "
                    f"divide; give its heads in a {SIDECAR_JSON} or yaml sidecar")
            h = 1
        heads.append(h)
    return heads


def unet_config(shapes: _Shapes, base: dict, family: str, original: dict | None, pooled_width: int | None,
                where: str) -> dict:
    """The shipped UNet config with every size the tensors show replaced by it."""
    s = shapes
    conv_in = s["input_blocks.0.0.weight"]
    config = dict(base)
    n_in = s.count("input_blocks.")
    levels: list[list[tuple[int, int]]] = [[]]
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in s:
            levels.append([])
            continue
        width = s[f"input_blocks.{i}.0.out_layers.3.weight"][0]
        levels[-1].append((width, s.count(f"input_blocks.{i}.1.transformer_blocks.")))
    per_level = {len(level) for level in levels}
    if len(per_level) != 1 or 0 in per_level:
        raise CheckpointError(f"{where}: UNet levels with different numbers of blocks ({[len(l) for l in levels]}): "
                              f"not an SD UNet layout")
    layers = per_level.pop()
    for level in levels:
        if len({w for w, _ in level}) != 1 or len({t for _, t in level}) != 1:
            raise CheckpointError(f"{where}: a UNet level mixes widths or attention depths: not an SD UNet layout")
    widths = [level[0][0] for level in levels]
    depth = [level[0][1] for level in levels]
    mid_depth = s.count("middle_block.1.transformer_blocks.")
    if not mid_depth:
        raise CheckpointError(f"{where}: its UNet has no middle-block attention: not an SD UNet layout")
    n_out = s.count("output_blocks.")
    if n_out != len(levels) * (layers + 1):
        raise CheckpointError(f"{where}: {n_out} UNet output blocks for {len(levels)} levels of {layers}: "
                              f"not an SD UNet layout")
    up_depth = []
    for u in range(len(levels)):
        found = {s.count(f"output_blocks.{u * (layers + 1) + j}.1.transformer_blocks.") for j in range(layers + 1)}
        if len(found) != 1:
            raise CheckpointError(f"{where}: a UNet up level mixes attention depths: not an SD UNet layout")
        up_depth.append(found.pop())
    placeholder = [d or (mid_depth if i == len(depth) - 1 else 1) for i, d in enumerate(depth)]
    up_placeholder = [d or placeholder[len(depth) - 1 - u] for u, d in enumerate(up_depth)]
    cross = s.first("attn2.to_k.weight")
    proj_in = s.first("proj_in.weight")
    config.update(
        in_channels=conv_in[1], out_channels=s["out.2.weight"][0], conv_in_kernel=conv_in[-1],
        conv_out_kernel=s["out.2.weight"][-1], block_out_channels=widths, layers_per_block=layers,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depth],
        cross_attention_dim=cross[1], use_linear_projection=len(proj_in) == 2,
        transformer_layers_per_block=placeholder[0] if len(set(placeholder)) == 1 else placeholder,
    )
    if up_placeholder != placeholder[::-1]:
        config["reverse_transformer_layers_per_block"] = up_placeholder
    time_embed = s["time_embed.0.weight"][0]
    config["time_embedding_dim"] = None if time_embed == 4 * widths[0] else time_embed
    if "label_emb.0.0.weight" in s:
        if family != "sdxl" or pooled_width is None:
            raise CheckpointError(f"{where}: its UNet takes class/added conditioning (label_emb), which "
                                  f"{TITLES[family]} does not have: not served")
        total = s["label_emb.0.0.weight"][1]
        if (total - pooled_width) <= 0 or (total - pooled_width) % 6:
            raise CheckpointError(f"{where}: its UNet's added conditioning ({total} wide) is not the pooled text "
                                  f"embedding ({pooled_width}) plus 6 size ids: not SDXL base")
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=total,
                      addition_time_embed_dim=(total - pooled_width) // 6)
    elif family == "sdxl":
        raise CheckpointError(f"{where}: an SDXL-layout checkpoint whose UNet takes no added conditioning: not SDXL base")
    # Heads: not in the weights (the yaml's num_heads / num_head_channels say them; otherwise the
    # published rule: SD 1.x 8 heads, SD 2.x/XL 64-channel heads).
    unet_params = _original_unet_params(original)
    if unet_params.get("num_heads", -1) not in (-1, None):
        rule = ("heads", int(unet_params["num_heads"]))
    elif unet_params.get("num_head_channels", -1) not in (-1, None):
        rule = ("channels", int(unet_params["num_head_channels"]))
    else:
        rule = ("heads", 8) if family == "sd1" else ("channels", 64)
    needed = [bool(d) or i == len(depth) - 1 for i, d in enumerate(depth)]  # the mid block uses the last
    config["_heads_rule"] = (rule, needed, widths)
    return config


def _resolve_heads(config: dict, where: str) -> dict:
    rule, needed, widths = config.pop("_heads_rule")
    if "attention_head_dim" in config.get("_overridden", ()):
        return config
    heads = _heads(widths, needed, rule, "a UNet level", where)
    config["attention_head_dim"] = heads[0] if len(set(heads)) == 1 else heads
    return config


def vae_config(shapes: _Shapes, base: dict, original: dict | None) -> dict:
    s = shapes
    levels = s.count("encoder.down.")
    config = dict(base)
    config.update(
        in_channels=s["encoder.conv_in.weight"][1], out_channels=s["decoder.conv_out.weight"][0],
        block_out_channels=[s[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        layers_per_block=s.count("encoder.down.0.block."),
        latent_channels=s["decoder.conv_in.weight"][1],
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        use_quant_conv="quant_conv.weight" in s, use_post_quant_conv="post_quant_conv.weight" in s,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in s,
    )
    scale = _original_params(original).get("scale_factor")
    if scale is not None:
        config["scaling_factor"] = float(scale)
    return config


def clip_config(shapes: _Shapes, base: dict, openclip: bool, drop_last: bool = False) -> dict:
    """A CLIP text config from the tensors of a CLIP (`text_model.*`) or OpenCLIP layout."""
    s = shapes
    config = dict(base)
    if openclip:
        tokens, positions = s["token_embedding.weight"], s["positional_embedding"]
        layers = s.count("transformer.resblocks.")
        mlp = s["transformer.resblocks.0.mlp.c_fc.weight"][0]
        if drop_last:
            if layers > SD2_UNUSED_BLOCK + 1:
                raise CheckpointError(f"an SD 2.x OpenCLIP text encoder of {layers} blocks (ViT-H has 24): not SD 2.x")
            layers = min(layers, SD2_UNUSED_BLOCK)
        elif "text_projection" in s:
            config["projection_dim"] = s["text_projection"][1]
    else:
        tokens, positions = s["text_model.embeddings.token_embedding.weight"], s["text_model.embeddings.position_embedding.weight"]
        layers = s.count("text_model.encoder.layers.")
        mlp = s["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        if "text_projection.weight" in s:
            config["projection_dim"] = s["text_projection.weight"][0]
    config.update(vocab_size=tokens[0], hidden_size=tokens[1], max_position_embeddings=positions[0],
                  num_hidden_layers=layers, intermediate_size=mlp)
    return config


def _text_heads(config: dict, where: str) -> dict:
    if "num_attention_heads" not in config.get("_overridden", ()):
        config["num_attention_heads"] = _heads([config["hidden_size"]], [True], ("channels", 64),
                                               f"a {config['hidden_size']}-wide text encoder", where)[0]
    return config


def _overlay(config: dict, overrides: dict | None) -> dict:
    if overrides:
        config = {**config, **overrides, "_overridden": tuple(overrides)}
    return config


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


# -- conversion --------------------------------------------------------------------------------------


def _check_fits(name: str, model: torch.nn.Module, state: dict, where: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} "
                         f"for {expected[wrong[0]]})")
        raise CheckpointError(f"{where}: its {name} does not fit the layout its tensors describe: "
                              f"{'; '.join(parts)}")


def _save_weights(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _diffusers_model(cls, config: dict):
    with torch.device("meta"):
        return cls.from_config(config)


def _text_model(cls, config: dict):
    from transformers import CLIPTextConfig

    text_config = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    text_config.architectures = [cls.__name__]
    with torch.device("meta"):
        return cls(text_config)


def _tokenizer(settings: dict, max_length: int):
    from service.engine.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(model_max_length=max_length)
    pad = settings.get("pad_token", "<|endoftext|>")
    if pad != tokenizer.pad_token:
        tokenizer.pad_token = pad
    return tokenizer


def _scheduler_config(base: dict, prediction_type: str, tensors: _Tensors, original: dict | None,
                      overrides: dict | None) -> dict:
    config = dict(base)
    params = _original_params(original)
    for ours, theirs in (("beta_start", "linear_start"), ("beta_end", "linear_end"), ("num_train_timesteps", "timesteps")):
        if params.get(theirs) is not None:
            config[ours] = params[theirs]
    if "ztsnr" in tensors:  # zero terminal SNR (ComfyUI's marker), as diffusers configures it
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config.update(overrides or {})
    config["prediction_type"] = prediction_type
    return config


@dataclasses.dataclass
class Plan:
    """The diffusers configs of one checkpoint, decided before any weight is read."""

    family: str
    configs: str  # the shipped config set (checkpoint_configs)
    prediction_type: str
    prediction_source: str
    shipped: dict
    unet: dict
    vae: dict
    vae_prefix: str
    # (subfolder, tokenizer subfolder, model class name, config, layout "clip"/"openclip", key prefix)
    towers: list[tuple[str, str, str, dict, str, str]]
    scheduler: dict


def plan(where: str, tensors, family: str, sidecars: Sidecars, prediction_type: str | None = None) -> Plan:
    """Configs of every component from the tensors' shapes (any mapping with `.shape(key)`)."""
    import diffusers

    prediction, why = prediction_type_for(family, tensors, sidecars, prediction_type)
    name = {"sd1": "sd1", "sd2": "sd2-v" if prediction == "v_prediction" else "sd2-base", "sdxl": "sdxl-base"}[family]
    shipped = checkpoint_configs.load(name)
    over = sidecars.overrides
    if family == "sd1":
        towers = [("text_encoder", "tokenizer", "CLIPTextModel",
                   clip_config(_Shapes(tensors, SD1_CLIP), shipped["text_encoder"], openclip=False), "clip", SD1_CLIP)]
    elif family == "sd2":
        towers = [("text_encoder", "tokenizer", "CLIPTextModel",
                   clip_config(_Shapes(tensors, SD2_OPENCLIP), shipped["text_encoder"], openclip=True, drop_last=True),
                   "openclip", SD2_OPENCLIP)]
    else:
        towers = [("text_encoder", "tokenizer", "CLIPTextModel",
                   clip_config(_Shapes(tensors, XL_CLIP), shipped["text_encoder"], openclip=False), "clip", XL_CLIP),
                  ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection",
                   clip_config(_Shapes(tensors, XL_OPENCLIP), shipped["text_encoder_2"], openclip=True),
                   "openclip", XL_OPENCLIP)]
    towers = [(f, t, c, _clean(_text_heads(_overlay(cfg, over.get(f)), where)), layout, prefix)
              for f, t, c, cfg, layout, prefix in towers]
    pooled = towers[1][3]["projection_dim"] if family == "sdxl" else None  # SDXL's added conditioning
    unet = unet_config(_Shapes(tensors, UNET), shipped["unet"], family, sidecars.original, pooled, where)
    unet = _clean(_resolve_heads(_overlay(unet, over.get("unet")), where))
    vae_prefix = next(p for p in VAE_PREFIXES if _has(tensors, p + "encoder."))
    vae = _clean(_overlay(vae_config(_Shapes(tensors, vae_prefix), shipped["vae"], sidecars.original), over.get("vae")))
    sched = _scheduler_config(shipped["scheduler"], prediction, tensors, sidecars.original, over.get("scheduler"))
    if not hasattr(diffusers, str(sched.get("_class_name"))):
        raise CheckpointError(f"{where}: scheduler class {sched.get('_class_name')!r} is not a diffusers scheduler")
    return Plan(family, name, prediction, why, shipped, unet, vae, vae_prefix, towers, sched)


def component_states(the_plan: Plan, tensors, where: str) -> Iterator[tuple[str, torch.nn.Module, dict, dict]]:
    """(subfolder, model on the meta device, config, converted state dict) per weighted component,
    one at a time (UNet, VAE, text encoders), each checked to fit its model key for key and shape
    for shape. The renaming is diffusers' own (single_file_utils)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    unet = _diffusers_model(UNet2DConditionModel, the_plan.unet)
    state = sfu.convert_ldm_unet_checkpoint(tensors, the_plan.unet)
    _check_fits("unet", unet, state, where)
    yield "unet", unet, the_plan.unet, state
    vae = _diffusers_model(AutoencoderKL, the_plan.vae)
    state = sfu.convert_ldm_vae_checkpoint(tensors, the_plan.vae)
    _check_fits("vae", vae, state, where)
    yield "vae", vae, the_plan.vae, state
    for folder, _, cls_name, cfg, layout, prefix in the_plan.towers:
        model = _text_model(getattr(transformers, cls_name), cfg)
        if layout == "clip":  # strips `cond_stage_model.transformer.` / `conditioner.embedders.0.transformer.`
            state = sfu.convert_ldm_clip_checkpoint(tensors)
        else:  # splits OpenCLIP's fused q/k/v, transposes text_projection, renames
            state = sfu.convert_open_clip_checkpoint(model, tensors, prefix=prefix)
            if cls_name == "CLIPTextModel":  # SD 2.x: CLIPTextModel has no projection
                state.pop("text_projection.weight", None)
        keys = set(model.state_dict())
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the converters name it.
        state = {(k if k in keys else k.removeprefix("text_model.")): v for k, v in state.items()
                 if not k.endswith("position_ids")}
        _check_fits(folder, model, state, where)
        yield folder, model, cfg, state


def convert_checkpoint(path: str | Path, out_dir: str | Path, prediction_type: str | None = None) -> Converted:
    """Writes the diffusers folder of a single-file checkpoint at out_dir (new or empty). Raises
    CheckpointError (one line) for a file it does not convert, leaving nothing behind."""
    import diffusers

    path, out = Path(path), Path(out_dir)
    where = str(path)
    _, tensors = open_checkpoint(path)
    family = classify(path, tensors)
    sidecars = read_sidecars(path)
    the_plan = plan(where, tensors, family, sidecars, prediction_type)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; convert into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        for folder, model, cfg, state in component_states(the_plan, tensors, where):
            if folder in ("unet", "vae"):
                model.save_config(out / folder)
                _save_weights(state, out / folder / "diffusion_pytorch_model.safetensors")
            else:
                model.config.save_pretrained(out / folder)
                _save_weights(state, out / folder / "model.safetensors")
            del state
        for folder, tok_folder, _, cfg, _, _ in the_plan.towers:
            _tokenizer(the_plan.shipped[tok_folder], cfg["max_position_embeddings"]).save_pretrained(out / tok_folder)
        sched = the_plan.scheduler
        (out / "scheduler").mkdir()
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": sched["_class_name"], "_diffusers_version": diffusers.__version__,
             **{k: v for k, v in sorted(sched.items()) if not k.startswith("_")}}, indent=2) + "\n")
        index = the_plan.shipped["model_index"]
        index = {"_class_name": index["_class_name"], "_diffusers_version": diffusers.__version__,
                 **{k: v for k, v in index.items() if not k.startswith("_")}}
        (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (out / "steerserve_checkpoint.json").write_text(json.dumps({
            "source": path.name, "family": family, "configs": the_plan.configs,
            "prediction_type": the_plan.prediction_type, "prediction_source": the_plan.prediction_source,
            "sidecars": [p.name for p in sidecars.files], "converter_version": CONVERTER_VERSION}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return Converted(out, family, the_plan.configs, the_plan.prediction_type, the_plan.prediction_source)


# -- serving a file: converted once into a cache folder ----------------------------------------------


_lock = threading.Lock()
_memo: dict[tuple, Path] = {}


def _file_digest(path: Path, root: Path) -> str:
    """sha256 of the file's content, remembered per (path, size, mtime) in root/digests.json: a
    restart with the same file reads no byte of it; a changed file is hashed again."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = root / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if ident in memo:
        return memo[ident]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    memo[ident] = digest.hexdigest()
    root.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_name(f"digests.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1))
    os.replace(tmp, memo_path)
    return memo[ident]


def cache_key(path: Path, root: Path, prediction_type: str | None) -> str:
    """What the converted folder depends on: the file's content, its sidecars' content, the
    prediction-type setting, and this converter's version."""
    sides = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sidecar_paths(path)}
    material = json.dumps({"file": _file_digest(path, root), "sidecars": sides, "prediction_type": prediction_type,
                           "converter": CONVERTER_VERSION}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def served_folder(path: str | Path, cache_root: str | Path, prediction_type: str | None = None) -> Path:
    """The diffusers folder serving a single-file checkpoint: cache_root/<name>-<key>, converted on
    the first call (atomically: concurrent starts either win or find it done), found afterwards."""
    path, root = Path(path), Path(cache_root)
    st = path.stat()
    ident = (str(path.resolve()), st.st_size, st.st_mtime_ns, str(root.resolve()), prediction_type,
             tuple((p.name, p.stat().st_mtime_ns) for p in sidecar_paths(path)))
    with _lock:
        if ident in _memo and (_memo[ident] / "model_index.json").is_file():
            return _memo[ident]
        handle, tensors = open_checkpoint(path)  # refuse what is not a checkpoint before hashing it
        classify(path, tensors)
        del handle, tensors
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:64] or "checkpoint"
        folder = root / f"{stem}-{cache_key(path, root, prediction_type)}"
        if not (folder / "model_index.json").is_file():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("converting %s into %s (once; later starts reuse it)", path, folder)
            converted = convert_checkpoint(path, tmp, prediction_type=prediction_type)
            publish_folder(tmp, folder)
            log.info("converted %s: %s", path.name, converted.describe())
        _memo[ident] = folder
        return folder
