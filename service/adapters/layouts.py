"""LoRA key layouts: the one place that knows how every accepted file names its modules.

Each key of a LoRA file is read to ``(module path, role)``: the module path is the component-prefixed
diffusers name the bank serves (``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.mlp.fc1``), the role is ``down`` (A), ``up`` (B) or
``alpha``. Layouts (docs/adapters.md has an example key of each):

- ``peft``: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (diffusers ``save_lora_weights``);
  ``peft save_pretrained``: ``base_model.model.<module>.lora_A.weight``
- ``diffusers lora.down``: ``unet.<module>.lora.down.weight`` / ``lora.up.weight``
- ``diffusers lora_linear_layer``: ``text_encoder.<module>.lora_linear_layer.down.weight``
  (``convert_state_dict_to_diffusers``, diffusers' DreamBooth-LoRA example)
- ``diffusers attention processor``: ``unet.<...>.attn1.processor.to_q_lora.down.weight``,
  ``text_encoder.<...>.self_attn.to_q_lora.down.weight``
- ``kohya suffixes``: ``<dotted module>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``
- ``kohya``: ``lora_unet_<module with _>.lora_down.weight``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``;
  ``kohya (SGM block names)``: SDXL's original UNet names ``input_blocks_4_1_...``,
  ``middle_block_1_...``, ``output_blocks_...``, mapped with the UNet's ``layers_per_block``

What the reference does: diffusers' ``lora_conversion_utils._convert_non_diffusers_lora_to_diffusers``
(kohya names, underscore to dot by known identifiers) and ``_maybe_map_sgm_blocks_to_diffusers`` (SGM
block arithmetic, only ``layers_per_block``). Here the same mapping is written out so that it needs no
model and gets two cases right that diffusers' heuristics do not: an upsampler at inner index 1 of an
output block without attentions (``output_blocks_2_1_conv``), and a file mixing SGM and diffusers names
(diffusers drops the SGM keys; here both are mapped, and a module named twice is refused).

Adapter types the bank cannot apply as a low-rank update of one layer (LoHa, LoKr, DoRA, (IA)³, GLoRA,
OFT, full weight differences, LoRA biases, Tucker-decomposed LoCon) are recognized by their key and
named in the refusal (``refusal``): a file holding any of them is refused whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Published Stable Diffusion UNets (1.x, 2.x, XL) all have two resnets per down block (three per up
# block): what SGM block indices mean when the caller does not say otherwise.
DEFAULT_LAYERS_PER_BLOCK = 2

KOHYA_PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                  "lora_te2": "text_encoder_2"}
_KOHYA_RE = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_([A-Za-z0-9_]+)\.(.+)$")

# Multi-word identifiers of diffusers / transformers / SGM module names. kohya writes a module path
# with every "." replaced by "_"; after turning every "_" into ".", these are joined back.
_IDENTIFIERS = (
    # diffusers UNet2DConditionModel
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "add_k_proj", "add_v_proj", "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
    "conv_norm_out", "time_embedding", "add_embedding", "linear_1", "linear_2",
    # transformers CLIPTextModel(WithProjection)
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "text_projection",
    "token_embedding", "position_embedding", "layer_norm1", "layer_norm2",
    # SGM (the original Stable Diffusion UNet, kohya's SDXL UNet)
    "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "in_layers", "out_layers",
    "emb_layers", "skip_connection",
)
_IDENT_RE = re.compile(
    r"(?<![^.])(" + "|".join(re.escape(i.replace("_", ".")) for i in sorted(_IDENTIFIERS, key=len, reverse=True))
    + r")(?![^.])"
)

# (suffix of the down/A key, suffix of the up/B key, layout), most specific first.
LORA_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight", "peft"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", "diffusers lora_linear_layer"),
    (".lora.down.weight", ".lora.up.weight", "diffusers lora.down"),
    (".lora_down.weight", ".lora_up.weight", "kohya suffixes"),
    ("_lora.down.weight", "_lora.up.weight", "diffusers attention processor"),
)
_PROCESSOR_RE = re.compile(r"(?:^|\.)(?:(processor)\.)?to_(q|k|v|out)$")

# Adapter types recognized by a key's last part(s): (pattern on the key, what it is).
_REFUSED = (
    (re.compile(r"(^|[._])hada_(w1_a|w1_b|w2_a|w2_b|t1|t2)(\.|$)"), "LoHa (LyCORIS Hadamard-product adapter)"),
    (re.compile(r"(^|[._])lokr_(w1|w2|w1_a|w1_b|w2_a|w2_b|t1|t2)(\.|$)"), "LoKr (LyCORIS Kronecker-product adapter)"),
    (re.compile(r"(^|\.)(dora_scale|lora_magnitude_vector)(\.|$)"), "DoRA (weight-decomposed LoRA)"),
    (re.compile(r"(^|\.)(ia3_l|on_input)(\.|$)"), "(IA)³ (learned activation scaling)"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA (LyCORIS generalized LoRA)"),
    (re.compile(r"(^|\.)(oft_blocks|oft_diag|oft_r|oft_R|boft_R|boft_s|rescale)(\.|$)"),
     "OFT/BOFT (orthogonal finetuning)"),
    (re.compile(r"\.(diff|diff_b)$"), "a full weight difference (LyCORIS 'full' / diff)"),
    (re.compile(r"\.(w_norm|b_norm)$"), "a norm-layer weight difference (LyCORIS norm module)"),
    (re.compile(r"(^|\.)lora_mid\.weight$"), "LoCon with Tucker decomposition (lora_mid)"),
    (re.compile(r"(^|\.)lora_(A|B|up|down)\.bias$|\.lora(_linear_layer)?\.(up|down)\.bias$"),
     "a LoRA bias (peft lora_bias=True; an unrecognized LoRA key for this server)"),
    (re.compile(r"(^|\.)lora_embedding_(A|B)(\.|$)"), "LoRA on an embedding layer"),
    (re.compile(r"^bundle_emb\."), "an embedding bundled in a LoRA (bundle_emb): import it as its own file"),
)


@dataclass(frozen=True)
class LoraKey:
    """What one key of a LoRA file is."""

    module: str  # component-prefixed diffusers module path
    role: str  # "down" (A), "up" (B) or "alpha"
    layout: str  # which layout named it (for the import's report)


def refusal(key: str) -> str | None:
    """The adapter type a key belongs to when the bank cannot serve that type (None: not one of them)."""
    for pattern, what in _REFUSED:
        if pattern.search(key):
            return what
    return None


def is_lora_key(key: str) -> bool:
    """Whether a key belongs to some LoRA-family layout (a key that is not must be an embedding)."""
    return bool(_KOHYA_RE.match(key)) or "lora" in key or refusal(key) is not None


def parse_lora_key(key: str, layers_per_block: int | Sequence[int] = DEFAULT_LAYERS_PER_BLOCK) -> LoraKey | None:
    """``(module, role, layout)`` of a LoRA down/up/alpha key; None when the key is none of those.

    Raises ValueError (its message says why) on a kohya name that maps to no module of the
    architecture (e.g. an SGM block index out of range).
    """
    m = _KOHYA_RE.match(key)
    if m:
        prefix, name, param = m.groups()
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(param)
        if role is None:
            return None
        component = KOHYA_PREFIXES[prefix]
        module, sgm = kohya_module(component, name, layers_per_block)
        return LoraKey(module, role, "kohya (SGM block names)" if sgm else "kohya")
    if key.endswith(".alpha"):
        return LoraKey(_component_path(key.removesuffix(".alpha")), "alpha", "alpha tensor")
    for down, up, layout in LORA_SUFFIXES:
        for suffix, role in ((down, "down"), (up, "up")):
            if key.endswith(suffix):
                path = key.removesuffix(suffix)
                if layout == "diffusers attention processor":
                    path = _processor_module(path + "_lora")
                    if path is None:
                        return None
                elif path.startswith("base_model.model."):
                    layout = "peft save_pretrained"
                return LoraKey(_component_path(path), role, layout)
    return None


def _processor_module(path: str) -> str | None:
    """``<...>.attn1.processor.to_q_lora`` -> ``<...>.attn1.to_q``; ``<...>.self_attn.to_q_lora`` ->
    ``<...>.self_attn.q_proj`` (diffusers' DIFFUSERS_OLD text-encoder keys)."""
    base = path.removesuffix("_lora")
    m = _PROCESSOR_RE.search(base)
    if not m:
        return None
    processor, proj = m.groups()
    head = base[: m.start()]
    if head.endswith("self_attn") and not processor:
        return f"{head}.{proj}_proj"
    if not processor and not head:
        return None
    return f"{head}.{'to_out.0' if proj == 'out' else 'to_' + proj}"


def _component_path(path: str) -> str:
    """A component-prefixed module path. peft's ``base_model.model.`` is dropped; a path without a
    component is a UNet path (as diffusers reads it) unless it names CLIP's text model."""
    path = path.removeprefix("base_model.model.")
    if path.startswith(tuple(c + "." for c in COMPONENTS)):
        return path
    if path.startswith(("text_model.", "encoder.layers.")):
        return "text_encoder." + path
    return "unet." + path


def kohya_module(component: str, name: str, layers_per_block: int | Sequence[int] = DEFAULT_LAYERS_PER_BLOCK
                 ) -> tuple[str, bool]:
    """``(module path, whether SGM block names were mapped)`` of a kohya module name (``.`` written ``_``)."""
    dotted = _IDENT_RE.sub(lambda m: m.group(1).replace(".", "_"), name.replace("_", "."))
    if component != "unet":
        return f"{component}.{dotted}", False
    head = dotted.split(".", 1)[0]
    if head in ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"):
        return "unet." + sgm_to_diffusers(dotted, layers_per_block), True
    return "unet." + dotted, False


# -- SGM (original Stable Diffusion) UNet names -------------------------------------------------------

# ResBlock parts: in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, Conv].
_SGM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_SGM_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
            "out.0": "conv_norm_out", "out.2": "conv_out", "input_blocks.0.0": "conv_in"}


def _resnet_part(rest: str) -> str:
    for sgm, diffusers in _SGM_RESNET.items():
        if rest == sgm or rest.startswith(sgm + "."):
            return diffusers + rest[len(sgm):]
    raise ValueError(f"{rest!r} is not a part of a ResBlock")


def sgm_to_diffusers(path: str, layers_per_block: int | Sequence[int] = DEFAULT_LAYERS_PER_BLOCK) -> str:
    """An SGM UNet module path (``input_blocks.4.1.proj_in``) as diffusers names it
    (``down_blocks.1.attentions.0.proj_in``), for a UNet with ``layers_per_block`` resnets per down block.

    input_blocks: 0 is conv_in, then per down block its layers ([resnet, attention]) and, except in the
    last block, a downsampler; middle_block: resnet, attention, resnet; output_blocks: per up block
    layers_per_block + 1 layers ([resnet, attention or upsampler, upsampler]).
    """
    for sgm, diffusers in _SGM_TOP.items():
        if path == sgm or path.startswith(sgm + "."):
            return diffusers + path[len(sgm):]
    parts = path.split(".")
    try:
        if parts[0] == "middle_block":
            inner, rest = int(parts[1]), ".".join(parts[2:])
            if inner == 1:
                return f"mid_block.attentions.0.{rest}"
            if inner in (0, 2):
                return f"mid_block.resnets.{inner // 2}.{_resnet_part(rest)}"
            raise ValueError(f"middle_block has no layer {inner}")
        index, inner, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
    except (IndexError, ValueError) as e:
        raise ValueError(f"{path!r} is not an SGM UNet module ({e})") from None
    per_block = _per_block(layers_per_block)
    if parts[0] == "input_blocks":
        block, layer = _locate(index - 1, [n + 1 for n in per_block])
        if layer == per_block[block]:  # the slot after the block's layers: its downsampler
            if inner != 0 or not (rest == "op" or rest.startswith("op.")):
                raise ValueError(f"input_blocks.{index} is down block {block}'s downsampler; {path!r} is not")
            return f"down_blocks.{block}.downsamplers.0.conv{rest[2:]}"
        if inner == 0:
            return f"down_blocks.{block}.resnets.{layer}.{_resnet_part(rest)}"
        if inner == 1:
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
    elif parts[0] == "output_blocks":
        block, layer = _locate(index, [n + 1 for n in reversed(per_block)])
        # An Upsample module holds one conv; a SpatialTransformer has no child named conv.
        if inner in (1, 2) and (rest == "conv" or rest.startswith("conv.")):
            return f"up_blocks.{block}.upsamplers.0.conv{rest[4:]}"
        if inner == 0:
            return f"up_blocks.{block}.resnets.{layer}.{_resnet_part(rest)}"
        if inner == 1:
            return f"up_blocks.{block}.attentions.{layer}.{rest}"
    raise ValueError(f"{path!r} is not an SGM UNet module")


def _per_block(layers_per_block: int | Sequence[int]) -> list[int]:
    if isinstance(layers_per_block, int):
        return [layers_per_block] * 16  # more blocks than any UNet has; only the indices used matter
    return list(layers_per_block)


def _locate(index: int, sizes: Sequence[int]) -> tuple[int, int]:
    """(block, position in block) of a flat index over consecutive blocks of ``sizes``."""
    if index < 0:
        raise ValueError(f"block index {index} is negative")
    for block, size in enumerate(sizes):
        if index < size:
            return block, index
        index -= size
    raise ValueError(f"block index past the UNet's {len(sizes)} blocks")


__all__ = [
    "COMPONENTS",
    "DEFAULT_LAYERS_PER_BLOCK",
    "KOHYA_PREFIXES",
    "LORA_SUFFIXES",
    "LoraKey",
    "is_lora_key",
    "kohya_module",
    "parse_lora_key",
    "refusal",
    "sgm_to_diffusers",
]
