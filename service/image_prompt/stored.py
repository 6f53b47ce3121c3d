"""A stored image prompt (adapter method IMAGE_PROMPT): the tokens CreateImagePrompt encoded, kept
as a small safetensors file so using it costs no encoder call.

    tokens                [n, D]  the photos' tokens, side by side
    unconditional_tokens  [n, D]  guidance's unconditional tokens for as many photos
    metadata: format "steerserve.image_prompt.v1", model (served.identity: IP-Adapter + encoder), photos

Tokens only mean something to the model and IP-Adapter file that made them: `parse` refuses a file
made for another (ImagePromptFileError, naming both).
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load, save

from .files import ImagePromptFileError
from .packing import ImagePrompt

FORMAT = "steerserve.image_prompt.v1"


def serialize(prompt: ImagePrompt, identity: str, photos: int) -> bytes:
    return save({"tokens": prompt.tokens.detach().float().cpu().contiguous(),
                 "unconditional_tokens": prompt.unconditional_tokens.detach().float().cpu().contiguous()},
                metadata={"format": FORMAT, "model": identity, "photos": str(photos)})


def parse(data: bytes, identity: str, scale: float, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> ImagePrompt:
    try:  # the metadata is in the file's JSON header, after its 8-byte length
        header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same answer
        raise ImagePromptFileError(f"not a stored image prompt ({exc})") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT or set(tensors) != {"tokens", "unconditional_tokens"}:
        raise ImagePromptFileError("not a stored image prompt (no steerserve.image_prompt.v1 tokens)")
    if meta.get("model") != identity:
        raise ImagePromptFileError(f"made for another IP-Adapter or image encoder ({meta.get('model')}); this server "
                                   f"serves {identity}: create it again here from its photos")
    return ImagePrompt(tensors["tokens"].to(device, dtype), tensors["unconditional_tokens"].to(device, dtype), scale)
