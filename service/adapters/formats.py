"""LoRA / textual-inversion adapters: the canonical in-memory form, import from and export to diffusers.

Import reads every LoRA layout of service/adapters/layouts.py (kohya/A1111 ``lora_unet_*`` /
``lora_te*_`` with SD 1.x/2.x or SDXL's SGM block names, peft ``lora_A``/``lora_B`` with or without
``base_model.model.``, diffusers' ``lora.down``/``lora_linear_layer``/attention-processor keys) to one
module path such as ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``; keys without
a component prefix are UNet keys (as diffusers < 0.21 read them). docs/adapters.md lists each with an example
key, and what is refused and why. A file is imported whole or refused naming a key: adapter types the
bank cannot apply (LoHa, LoKr, DoRA, (IA)³, GLoRA, OFT, weight differences, LoRA biases), a key no
layout knows, half a down/up pair, and pickle files (.pt/.ckpt/.bin, which can run code when loaded:
recognized by their first bytes, never unpickled).

Alpha comes, in order of precedence, from a per-module ``<module>.alpha`` tensor (kohya), the
``lora_adapter_metadata`` JSON that ``save_lora_weights`` writes (``unet.lora_alpha`` with
``alpha_pattern``, ``use_rslora``), the caller's ``default_alpha`` (peft ``save_pretrained``'s
adapter_config.json ``lora_alpha``), and otherwise equals the rank (scale 1.0, the diffusers/peft/
A1111 convention for a module without alpha). Tensors keep their dtype (fp16/bf16 files too).

Textual-inversion vectors travel in our own files as ``textual_inversion.<token>`` tensors of shape
[num_vectors, hidden] (or [hidden]); accepted too: diffusers' ``learned_embeds.safetensors``
({token: vector}; the caller's token renames its one vector, as in diffusers), A1111's ``emb_params``
or ``string_to_param.*`` (the token named by the caller), and the published SDXL layout (``clip_l``
[n, 768] and ``clip_g`` [n, 1280], the token named by the caller), as one [n, 768 + 1280] vector:
hidden is every text encoder's width concatenated, in the model's encoder order. diffusers' LoRA
loader refuses any key without "lora" in it, so the diffusers export writes the LoRA and the token
vectors as two separate files.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from . import layouts
from .errors import AdapterFormatError

COMPONENTS = layouts.COMPONENTS
TI_PREFIX = "textual_inversion."
# The key diffusers' save_lora_weights uses for the JSON-serialized peft LoraConfig(s).
LORA_METADATA_KEY = "lora_adapter_metadata"
KIND_METADATA_KEY = "steerserve_adapter_kind"
ADAPTER_KINDS = ("subject", "style")

# The published SDXL textual-inversion layout: the token's vectors for each text encoder, CLIP ViT-L
# (text_encoder) then OpenCLIP ViT-bigG (text_encoder_2). diffusers loads them one encoder at a time.
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")
# Text-conditioning widths of the published Stable Diffusion generations (the UNet's cross-attention
# input, and a learned token's width: SDXL's is 768 + 1280): what a refusal guesses an adapter was
# made for. Titles as service/engine/families names them.
FAMILY_OF_TEXT_WIDTH = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}
_TWO_ENCODER_FAMILY = "Stable Diffusion XL"
# A UNet's cross-attention key/value projections take the text conditioning: their down/A matrices
# are as wide as the conditioning of the model a LoRA was trained on.
_CROSS_ATTENTION_KV = re.compile(r"^unet\..*\battn2\.to_[kv]$")

# Keys of A1111's textual-inversion files: one unnamed vector set (the token is the file's name).
_A1111_EMBEDDING_KEYS = ("emb_params", "string_to_param.*")
# A key that is no LoRA key and names a model parameter is not a token: it would be read as one.
_WEIGHT_KEY = re.compile(r"(^(unet|text_encoder|text_encoder_2|base_model|model|diffusion_model|cond_stage_model|"
                         r"first_stage_model|conditioner)\.)|\.(weight|bias|alpha|scale)$")


@dataclass
class LoraModule:
    """One low-rank update W + scale * up @ down of a Linear or Conv2d layer.

    down (A): [rank, in_features]; for a Conv2d with a k x k kernel (k > 1, LyCORIS LoCon) the conv
    kernel [rank, in_channels, kh, kw]. A 1x1 conv's (kohya's proj_in/proj_out on SD 1.x) is stored
    flattened, like a Linear's. up (B): [out_features, rank] (a conv's 1x1 up kernel, flattened).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    use_rslora: bool = False
    # The file's down/A key this module came from (refusals name it); None when built in memory.
    source_key: str | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        # peft: lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilized LoRA.
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class Adapter:
    """A parsed adapter: LoRA modules keyed by full module path, plus textual-inversion tokens."""

    lora: dict[str, LoraModule] = field(default_factory=dict)
    # token string -> [num_vectors, hidden] vectors that replace the token in prompts.
    token_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    # "subject" (what it learned is a thing) or "style" (a FineStyle adapter: sampling may apply it
    # to a separate, style-conditional prediction). Stored in the file's metadata.
    kind: str = "subject"
    # The key layout(s) the file was read from ("kohya", "peft", "A1111 embedding", ...: layouts.py),
    # comma-separated; "" for an adapter built in memory.
    layout: str = ""

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.lora.values()), default=0)

    @property
    def num_parameters(self) -> int:
        n = sum(m.down.numel() + m.up.numel() for m in self.lora.values())
        return n + sum(v.numel() for v in self.token_embeddings.values())

    def nbytes(self) -> int:
        n = sum(
            m.down.numel() * m.down.element_size() + m.up.numel() * m.up.element_size()
            for m in self.lora.values()
        )
        return n + sum(v.numel() * v.element_size() for v in self.token_embeddings.values())


# ------------------------------------------------------------------------------------------------
# Import

PICKLE_REFUSAL = (
    "{what}: pickle files can run arbitrary code when they are loaded, so they are never unpickled here; "
    "convert it to .safetensors on a machine you trust (e.g. load it with torch.load(weights_only=True) and "
    "save with safetensors.torch.save_file) and import that"
)


def pickle_kind(data: bytes) -> str | None:
    """What a file is when it is a pickle (torch.save's .pt/.ckpt/.bin), None otherwise. Never unpickles."""
    if data[:4] == b"PK\x03\x04":
        try:  # the zip's directory only: names of its members, nothing of their contents is read
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                pickled = any(n.endswith(".pkl") for n in z.namelist())
        except (zipfile.BadZipFile, ValueError, OSError):
            pickled = True  # a damaged zip that starts like torch.save's is refused as one
        return "a PyTorch checkpoint (torch.save zip: .pt, .ckpt, .bin)" if pickled else None
    # PROTO 2-5, then an opcode (never 0x00; a damaged safetensors' header length 0x0280.. has zeros there).
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and data[2:3] not in (b"", b"\x00"):
        return "a Python pickle (legacy torch.save: .pt, .ckpt, .bin)"
    return None


def _read(source: bytes | str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:  # a missing file is the caller's OSError, not a format error
            data = f.read()
    else:
        data = bytes(source)
    try:
        # One deserialization call: reading tensor by tensor (safe_open) is slower on a cold load.
        tensors = load_safetensors_bytes(data)
        # The metadata lives in the JSON header: 8-byte little-endian length, then the header.
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as e:  # safetensors raises several types for truncated or garbled files
        # safetensors never unpickles; a pickle is only recognized by its first bytes, and refused.
        kind = pickle_kind(data)
        if kind is not None:
            raise AdapterFormatError(PICKLE_REFUSAL.format(what=f"this is {kind}")) from None
        if data[:4] == b"PK\x03\x04":
            raise AdapterFormatError("not a readable safetensors file: this is a zip archive") from None
        raise AdapterFormatError(f"not a readable safetensors file: {e}") from e
    return tensors, metadata


def _pattern_lookup(patterns: Mapping[str, float], module: str) -> float | None:
    # peft matches rank/alpha patterns as regexes against the end of the module name.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return None


def _metadata_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """Per-component peft config dicts from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"metadata '{LORA_METADATA_KEY}' is not valid JSON: {e}") from e
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        if component in COMPONENTS and name:
            configs.setdefault(component, {})[name] = value
    return configs


def _refuse_unsupported_types(keys: list[str]) -> None:
    """The first key (in order) of an adapter type the bank cannot apply refuses the whole file."""
    for key in sorted(keys):
        what = layouts.refusal(key)
        if what is not None:
            raise AdapterFormatError(
                f"{key}: {what} is not supported: the bank applies LoRA (one down/up matrix pair per layer), "
                "so nothing of this file is imported")


def parse_adapter(
    source: bytes | str,
    *,
    default_alpha: float | None = None,
    token: str | None = None,
    layers_per_block: int | Sequence[int] | None = None,
) -> Adapter:
    """Parse a LoRA and/or textual-inversion safetensors file (bytes or path) into an Adapter.

    Every layout of service/adapters/layouts.py is read to the same module paths. ``default_alpha``
    applies to modules whose file carries no alpha; ``token`` names the concept of a
    textual-inversion file that stores unnamed vectors (A1111's ``emb_params`` / ``string_to_param``,
    SDXL's ``clip_l`` + ``clip_g``) and renames the one vector of a diffusers ``{token: vector}`` file,
    as diffusers' ``load_textual_inversion(token=...)`` does. ``layers_per_block``: the UNet's (its
    config's), for SGM block names (kohya SDXL); by default 2, every published SD UNet's.
    Raises AdapterFormatError naming the offending key on anything that cannot be served; a file is
    imported whole or not at all.
    """
    tensors, metadata = _read(source)
    if not tensors:
        raise AdapterFormatError("the file holds no tensors")
    _refuse_unsupported_types(list(tensors))
    configs = _metadata_configs(metadata)
    blocks = layouts.DEFAULT_LAYERS_PER_BLOCK if layers_per_block is None else layers_per_block

    downs: dict[str, tuple[str, torch.Tensor]] = {}
    ups: dict[str, tuple[str, torch.Tensor]] = {}
    alphas: dict[str, tuple[str, float]] = {}
    found: set[str] = set()
    tokens: dict[str, torch.Tensor] = {}
    plain: list[tuple[str, torch.Tensor]] = []  # unnamed or diffusers-named single embeddings
    sdxl = _sdxl_embedding(tensors, token)
    if sdxl is not None:
        tokens[token] = sdxl
        found.add("SDXL embedding (clip_l + clip_g)")
    for key, value in tensors.items():
        if key in SDXL_EMBEDDING_KEYS:
            continue
        if key.startswith(TI_PREFIX):
            tokens[key[len(TI_PREFIX) :]] = value
            continue
        if key in _A1111_EMBEDDING_KEYS:
            plain.append((key, value))
            found.add("A1111 embedding")
            continue
        if key.startswith("string_to_token.") and "string_to_param.*" in tensors:
            continue  # A1111's token-id bookkeeping next to the vector: nothing to apply
        try:
            parsed = layouts.parse_lora_key(key, blocks)
        except ValueError as e:
            raise AdapterFormatError(f"{key}: names no module of this UNet architecture ({e})") from None
        if parsed is None:
            if layouts.is_lora_key(key):
                raise AdapterFormatError(
                    f"{key}: unrecognized LoRA key (not a down/up matrix or alpha of any layout this server "
                    "reads; see docs/adapters.md)")
            if _WEIGHT_KEY.search(key):
                raise AdapterFormatError(
                    f"{key}: neither a LoRA nor a textual-inversion key (a model weight? single-file "
                    "checkpoints are not adapters)")
            plain.append((key, value))  # diffusers' {token: vectors}
            found.add("diffusers embedding")
            continue
        if parsed.role != "alpha":  # an alpha key says nothing of the layout its matrices name
            found.add(parsed.layout)
        table = {"down": downs, "up": ups, "alpha": alphas}[parsed.role]
        if parsed.module in table:
            raise AdapterFormatError(
                f"{key}: names the same layer ({parsed.module}) as {table[parsed.module][0]}")
        table[parsed.module] = (key, _scalar(key, value) if parsed.role == "alpha" else value)

    for module in sorted(downs.keys() ^ ups.keys()):
        key = (downs.get(module) or ups.get(module))[0]
        missing = "up/B" if module in downs else "down/A"
        raise AdapterFormatError(f"{key}: the matching {missing} matrix is missing")
    for module in sorted(alphas.keys() - downs.keys()):
        raise AdapterFormatError(f"{alphas[module][0]}: an alpha for a layer without LoRA matrices")

    for key, value in plain:
        unnamed = key in _A1111_EMBEDDING_KEYS
        if token and (unnamed or len(plain) == 1):
            name = token
        elif unnamed:
            raise AdapterFormatError(f"{key}: a textual-inversion vector needs a token name")
        else:
            name = key
        if name in tokens:
            raise AdapterFormatError(f"{key}: a second embedding for token {name!r}")
        tokens[name] = value

    kind = metadata.get(KIND_METADATA_KEY, "subject")
    if kind not in ADAPTER_KINDS:
        raise AdapterFormatError(f"metadata '{KIND_METADATA_KEY}': {kind!r} is not one of {', '.join(ADAPTER_KINDS)}")
    adapter = Adapter(kind=kind, layout=", ".join(sorted(found)))
    for module in sorted(downs):
        (down_key, down), (up_key, up) = downs[module], ups[module]
        down, up = _check_pair(down_key, down, up_key, up)
        component, _, local = module.partition(".")
        config = configs.get(component, {})
        alpha = alphas[module][1] if module in alphas else None
        if alpha is None and config:
            alpha = _pattern_lookup(config.get("alpha_pattern") or {}, local)
            if alpha is None and config.get("lora_alpha") is not None:
                alpha = float(config["lora_alpha"])
        if alpha is None:
            alpha = default_alpha if default_alpha else float(down.shape[0])
        adapter.lora[module] = LoraModule(
            down=down, up=up, alpha=alpha, use_rslora=bool(config.get("use_rslora", False)), source_key=down_key
        )

    for name, vectors in tokens.items():
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or not name.strip() or any(c.isspace() for c in name):
            raise AdapterFormatError(
                f"textual-inversion token {name!r}: expected a token without spaces and a "
                f"[num_vectors, hidden] tensor, got shape {tuple(vectors.shape)}"
            )
        adapter.token_embeddings[name] = vectors
    return adapter


def _check_pair(down_key: str, down: torch.Tensor, up_key: str, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear pair ([r, in], [out, r]) or a Conv2d pair ([r, in, kh, kw], [out, r, 1, 1]), in the
    stored form: 1x1 kernels flattened to matrices (a 1x1 conv computes what a Linear does), a k x k
    down kept 4-D (LyCORIS LoCon), up always [out, r]."""
    for key, t in ((down_key, down), (up_key, up)):
        if not (t.ndim == 2 or (t.ndim == 4 and (t is down or t.shape[2:] == (1, 1)))):
            raise AdapterFormatError(
                f"{key}: expected a 2-D matrix (or a 4-D conv kernel, 1x1 for up/B), got shape {tuple(t.shape)}")
    down = down.flatten(1) if down.ndim == 4 and down.shape[2:] == (1, 1) else down
    up = up.flatten(1)
    if up.shape[1] != down.shape[0]:
        raise AdapterFormatError(
            f"{up_key}: rank mismatch, up/B is {tuple(up.shape)} but down/A is {tuple(down.shape)}"
        )
    return down, up


def _sdxl_embedding(tensors: Mapping[str, torch.Tensor], token: str | None) -> torch.Tensor | None:
    """The token vector [n, w_l + w_g] of a file in SDXL's ``clip_l`` / ``clip_g`` layout (None: not one).

    One tensor per token serves every family: PromptEncoder gives each text encoder its own columns,
    text_encoder's first, so clip_l's columns come first.
    """
    present = [k for k in SDXL_EMBEDDING_KEYS if k in tensors]
    if not present:
        return None
    if len(present) == 1:
        (other,) = set(SDXL_EMBEDDING_KEYS) - set(present)
        raise AdapterFormatError(
            f"{present[0]}: an SDXL embedding holds vectors for both text encoders; {other} is missing")
    if not token:
        raise AdapterFormatError("clip_l, clip_g: an SDXL embedding needs a token name")
    parts = [tensors[k] for k in SDXL_EMBEDDING_KEYS]
    parts = [t[None] if t.ndim == 1 else t for t in parts]
    if any(t.ndim != 2 for t in parts) or parts[0].shape[0] != parts[1].shape[0]:
        raise AdapterFormatError(
            f"clip_l {tuple(tensors['clip_l'].shape)}, clip_g {tuple(tensors['clip_g'].shape)}: expected "
            "[n, width] each, with the same number of vectors n")
    if not all(t.is_floating_point() for t in parts):
        raise AdapterFormatError(f"clip_l, clip_g: dtypes {parts[0].dtype}, {parts[1].dtype} are not floating-point")
    dtype = torch.promote_types(parts[0].dtype, parts[1].dtype)
    return torch.cat([t.to(dtype) for t in parts], dim=1)


def _scalar(key: str, value: torch.Tensor) -> float:
    if value.numel() != 1:
        raise AdapterFormatError(f"{key}: alpha must be a scalar, got shape {tuple(value.shape)}")
    return float(value.reshape(()).item())


# ------------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class ServedModel:
    """What a bank knows of its model beyond the layers, so a refusal can name a family mismatch."""

    title: str | None = None  # the model family's title ("Stable Diffusion XL"); None: not known
    text_width: int | None = None  # the UNet's cross-attention input width (its text conditioning)
    # Text encoder component -> its token-embedding width, in the order of a token's columns.
    text_encoders: Mapping[str, int] = field(default_factory=dict)


def validate_adapter(
    adapter: Adapter,
    module_shapes: Mapping[str, tuple[int, ...]],
    max_rank: int,
    dtype: torch.dtype,
    hidden_size: int | None = None,
    model: ServedModel | None = None,
) -> None:
    """Check an adapter against the modules a bank serves; raise AdapterFormatError on the first problem.

    ``module_shapes`` maps module path -> (out_features, in_features) of each served Linear, or
    (out_channels, in_channels, kh, kw) of each served Conv2d (a 1x1 conv's down may be [r, in]);
    values are checked finite after the cast to ``dtype`` (fp16 overflows to inf). With ``model``,
    an adapter whose shapes say it was made for another model family is refused saying so, before
    any per-module message (which would only name the first layer that differs).
    """
    if not adapter.lora and not adapter.token_embeddings:
        raise AdapterFormatError("the adapter holds no LoRA weights and no token embeddings")
    if model is not None:
        mismatch = family_mismatch(adapter, model, hidden_size)
        if mismatch:
            raise AdapterFormatError(mismatch)
    for module, lora in adapter.lora.items():
        origin = _origin(module, lora)
        if module not in module_shapes:
            near = [m for m in module_shapes if m.split(".")[-1] == module.split(".")[-1]][:2]
            hint = f" (e.g. {', '.join(near)})" if near else f" (it serves {_served_kinds(module, module_shapes)})"
            raise AdapterFormatError(f"{module}: not a module this model serves adapters on{hint}{origin}")
        shape = tuple(module_shapes[module])
        out_features, in_features, kernel = shape[0], shape[1], shape[2:]
        if lora.rank > max_rank:
            raise AdapterFormatError(f"{module}: rank {lora.rank} exceeds the bank's maximum rank {max_rank}{origin}")
        if lora.rank == 0:
            raise AdapterFormatError(f"{module}: rank 0{origin}")
        # A pointwise layer (a Linear, a 1x1 conv) takes [r, in] or [r, in, 1, 1] alike (kohya stores
        # SD 1.x's 1x1 proj_in/proj_out 4-D); a k x k conv needs its kernel: [r, in, kh, kw].
        pointwise = kernel in ((), (1, 1))
        down_kernel = tuple(lora.down.shape[2:])
        if lora.down.shape[1] != in_features or down_kernel not in (((), (1, 1)) if pointwise else (kernel,)):
            expected = ", ".join(map(str, (lora.rank, in_features, *kernel)))
            what = ""
            if not kernel and down_kernel not in ((), (1, 1)):
                what = " (a convolution's LoRA for a Linear layer)"
            elif not pointwise and not down_kernel:
                what = f" (the layer is a {kernel[0]}x{kernel[1]} convolution)"
            raise AdapterFormatError(
                f"{module}: down/A has shape {tuple(lora.down.shape)}, expected [{expected}]{what}{origin}"
            )
        if lora.up.ndim != 2 or lora.up.shape[0] != out_features:
            raise AdapterFormatError(
                f"{module}: up/B has shape {tuple(lora.up.shape)}, expected [{out_features}, {lora.rank}]{origin}"
            )
        if not math.isfinite(lora.scale):
            raise AdapterFormatError(f"{module}: alpha {lora.alpha} is not finite{origin}")
    for token, vectors in adapter.token_embeddings.items():
        if hidden_size is None:
            raise AdapterFormatError(f"token {token!r}: this model does not serve textual inversion")
        if vectors.shape[1] != hidden_size:
            raise AdapterFormatError(
                f"token {token!r}: vectors have shape {tuple(vectors.shape)}, expected [n, {hidden_size}]"
            )
    _check_values(adapter, dtype)


def _origin(module: str, lora: LoraModule) -> str:
    """`` (file key ...)`` when the file named the module otherwise (kohya, peft's base_model.model.)."""
    key = lora.source_key
    return f" (file key {key})" if key and not key.startswith(module + ".") else ""


def _layer_kind(module: str) -> str:
    """The part of a module path after its last block index: ``attn1.to_out.0``, ``self_attn.q_proj``."""
    parts = module.split(".")
    numeric = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    return ".".join(parts[numeric[-1] + 1 :] if numeric else parts[1:])


def _served_kinds(module: str, module_shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The kinds of layer (``attn1.to_q``, ``self_attn.q_proj``) served in the module's component."""
    component = module.partition(".")[0]
    kinds = sorted({_layer_kind(m) for m in module_shapes if m.startswith(component + ".")})
    return f"LoRA on {component} {', '.join(kinds)}" if kinds else f"no LoRA on {component}"


def _guess(width: int | None, fallback: str | None = None) -> str:
    family = FAMILY_OF_TEXT_WIDTH.get(width) or fallback
    return f" ({family}?)" if family else ""


def family_mismatch(adapter: Adapter, model: ServedModel, hidden_size: int | None = None) -> str | None:
    """One line saying which model family the adapter's shapes were made for and which this model
    is, or None when they do not say it is another (per-module checks still apply)."""
    this = f"this model is {model.title}" if model.title else "this model"
    # LoRA: the text conditioning its cross-attention was trained on, and a second text encoder.
    # Only when several cross-attention K/V modules (a LoRA made elsewhere has dozens) all agree on
    # another width: one odd module is a damaged or hand-made file, which the per-module check names.
    width, evidence = None, []
    cross = {m: lora.down.shape[1] for m, lora in sorted(adapter.lora.items()) if _CROSS_ATTENTION_KV.match(m)}
    if model.text_width and len(cross) > 1 and len(set(cross.values())) == 1 and model.text_width not in cross.values():
        module, width = next(iter(cross.items()))
        evidence.append(f"{module} takes {width} inputs")
    one_encoder = "text_encoder" in model.text_encoders and "text_encoder_2" not in model.text_encoders
    second = sorted(m for m in adapter.lora if m.startswith("text_encoder_2.")) if one_encoder else []
    evidence += second[:1]
    if evidence:
        made = " and ".join(filter(None, [
            f"{width}-wide text conditioning" if width is not None else "",
            "a second text encoder (text_encoder_2)" if second else ""]))
        ours = ", ".join(filter(None, [
            f"{model.text_width}-wide text conditioning" if model.text_width else "",
            "one text encoder" if second else ""]))
        guess = _guess(width, _TWO_ENCODER_FAMILY if second else None)
        return f"this LoRA was made for a model with {made}{guess} (e.g. {', '.join(evidence)}); {this} ({ours})"
    # Textual inversion: a token's vector is every text encoder's width side by side.
    if hidden_size is not None:
        for token, vectors in adapter.token_embeddings.items():
            width = vectors.shape[1]
            if width == hidden_size:
                continue
            columns = ""
            if len(model.text_encoders) > 1:
                columns = " (" + " + ".join(f"{c} {w}" for c, w in model.text_encoders.items()) + " columns"
                if list(model.text_encoders) == ["text_encoder", "text_encoder_2"]:
                    l_width, g_width = model.text_encoders.values()
                    columns += (f"; SDXL's layout: a file with clip_l [n, {l_width}] and clip_g [n, {g_width}] "
                                "and the token's name")
                columns += ")"
            return (f"token {token!r}: vectors of shape {tuple(vectors.shape)} were made for a model with {width}-wide "
                    f"token embeddings{_guess(width)}; {this}: expected [n, {hidden_size}]{columns}")
    return None


def _check_values(adapter: Adapter, dtype: torch.dtype) -> None:
    """Floating point and finite in ``dtype``, including B after the scale is folded in.

    One fused check over all tensors (a cold load is on the request path); only when it fails is
    each tensor checked on its own, to name the culprit.
    """
    named = [(f"{m} down/A", lora.down) for m, lora in adapter.lora.items()]
    named += [(f"{m} up/B", lora.up) for m, lora in adapter.lora.items()]
    named += [(f"token {t!r}", v) for t, v in adapter.token_embeddings.items()]
    for what, t in named:
        if not t.is_floating_point():
            raise AdapterFormatError(f"{what}: dtype {t.dtype} is not a floating-point type")
    flat = torch.cat([t.reshape(-1).to(dtype) for _, t in named])
    # |scale * B| fits the dtype if the largest |B| times the largest scale does.
    max_scale = max((abs(lora.scale) for lora in adapter.lora.values()), default=0.0)
    up_max = max((lora.up.abs().max().item() for lora in adapter.lora.values() if lora.up.numel()), default=0.0)
    if torch.isfinite(flat).all() and up_max * max_scale <= torch.finfo(dtype).max:
        return
    for what, t in named:
        if not torch.isfinite(t.to(dtype)).all():
            raise AdapterFormatError(f"{what}: contains NaN or Inf values (in {dtype})")
    for module, lora in adapter.lora.items():
        if not torch.isfinite((lora.up.double() * lora.scale).to(dtype)).all():
            raise AdapterFormatError(f"{module} scale * up/B: overflows {dtype} (alpha {lora.alpha})")


# ------------------------------------------------------------------------------------------------
# Export


def to_diffusers_lora(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata in the layout ``save_lora_weights`` writes (peft keys + LoraConfig JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    flat_config: dict[str, object] = {}
    for component in COMPONENTS:
        modules = {k: v for k, v in adapter.lora.items() if k.startswith(component + ".")}
        if not modules:
            continue
        for module, lora in modules.items():
            tensors[f"{module}.lora_A.weight"] = lora.down.contiguous()
            # A conv LoRA's up is a 1x1 kernel (what peft's Conv2d LoRA loads).
            up = lora.up[:, :, None, None] if lora.down.ndim == 4 and lora.up.ndim == 2 else lora.up
            tensors[f"{module}.lora_B.weight"] = up.contiguous()
        local = {k[len(component) + 1 :]: v for k, v in modules.items()}
        # The most common rank/alpha become r/lora_alpha; the rest go in full-name patterns,
        # which is how diffusers itself describes mixed ranks to peft.
        r = _most_common([m.rank for m in local.values()])
        alpha = _most_common([m.alpha for m in local.values()])
        rslora = {m.use_rslora for m in local.values()}
        if len(rslora) > 1:
            raise AdapterFormatError(f"{component}: mixing rsLoRA and plain LoRA modules cannot be exported")
        config = {
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {re.escape(k): m.rank for k, m in local.items() if m.rank != r},
            "alpha_pattern": {re.escape(k): m.alpha for k, m in local.items() if m.alpha != alpha},
            "target_modules": sorted(local),
            "use_rslora": rslora.pop(),
            "use_dora": False,
            "lora_bias": False,
            "peft_type": "LORA",
        }
        flat_config.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {"format": "pt"}
    if flat_config:
        metadata[LORA_METADATA_KEY] = json.dumps(flat_config, indent=2, sort_keys=True)
    if adapter.kind != "subject":
        metadata[KIND_METADATA_KEY] = adapter.kind
    return tensors, metadata


def _most_common(values: list):
    return max(sorted(set(values)), key=values.count)


def export_diffusers_lora(adapter: Adapter) -> bytes:
    """The adapter's LoRA as a ``pytorch_lora_weights.safetensors`` that ``load_lora_weights`` reads."""
    if not adapter.lora:
        raise AdapterFormatError("the adapter has no LoRA weights to export")
    tensors, metadata = to_diffusers_lora(adapter)
    return save_safetensors_bytes(tensors, metadata=metadata)


def export_textual_inversion(adapter: Adapter) -> bytes:
    """The token vectors as diffusers' ``learned_embeds.safetensors`` ({token: [n, hidden]})."""
    if not adapter.token_embeddings:
        raise AdapterFormatError("the adapter has no textual-inversion tokens to export")
    return save_safetensors_bytes({t: v.contiguous() for t, v in adapter.token_embeddings.items()})


def serialize_adapter(adapter: Adapter) -> bytes:
    """One self-contained file (LoRA in diffusers layout + ``textual_inversion.<token>`` vectors).

    This is what the adapter store keeps; ``parse_adapter`` reads it back exactly.
    """
    tensors, metadata = to_diffusers_lora(adapter) if adapter.lora else ({}, {"format": "pt"})
    tensors.update({TI_PREFIX + t: v.contiguous() for t, v in adapter.token_embeddings.items()})
    if not tensors:
        raise AdapterFormatError("the adapter is empty")
    return save_safetensors_bytes(tensors, metadata=metadata)


def write_diffusers_lora_dir(adapter: Adapter, directory: str) -> str:
    """Write ``<directory>/pytorch_lora_weights.safetensors`` (the name load_lora_weights looks for)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "pytorch_lora_weights.safetensors")
    with open(path, "wb") as f:
        f.write(export_diffusers_lora(adapter))
    return path


__all__ = [
    "Adapter",
    "LoraModule",
    "parse_adapter",
    "validate_adapter",
    "family_mismatch",
    "ServedModel",
    "export_diffusers_lora",
    "export_textual_inversion",
    "serialize_adapter",
    "write_diffusers_lora_dir",
    "to_diffusers_lora",
]
