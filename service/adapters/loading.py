"""Where adapters come from: the adapter store's blob folder, and a model's shapes to check them by.

Both the in-process engine and the Triton model instances load by content key (the blob's sha256)
from the same blob folder (`<data_dir>/adapters/sha256/<2 hex>/<sha256>.safetensors`, written by
service.stores; one volume shared by every replica), so a model server needs no database; the
gateway has already checked that the caller's tenant owns the adapter behind the key. The bytes are
checked against the key when loaded: a damaged file is refused, never served.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from .bank import DEFAULT_UNET_CONV_TARGETS, SERVED_TEXT_ENCODER_TARGETS, SERVED_UNET_TARGETS, AdapterBank
from .errors import AdapterFormatError, AdapterNotFoundError
from .formats import Adapter, parse_adapter, serialize_adapter

_ADAPTER_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CONTENT_KEY = re.compile(r"^[0-9a-f]{64}$")


def blob_loader(adapter_dir: Path, request_dir: Path | None = None) -> "BlobLoader":
    """key (adapter id) -> parsed Adapter. Ids are opaque tokens, so anything else (a path, a glob)
    is refused before it reaches the filesystem. `request_dir`: where per-request adapters are
    (default <adapter_dir>/request)."""
    return BlobLoader(adapter_dir, request_dir)


class BlobLoader:
    """The loader of blob_loader. Its `per_request` (RequestAdapterFiles) tells an AdapterManager
    which keys are per-request adapters and when their request has ended, so a model process drops
    them from its slots and host memory then (AdapterManager's `per_request`)."""

    def __init__(self, adapter_dir: Path, request_dir: Path | None = None):
        self.adapter_dir = Path(adapter_dir)
        self.per_request = RequestAdapterFiles(
            Path(request_dir) if request_dir is not None else self.adapter_dir / REQUEST_ADAPTERS)

    def __call__(self, key: str) -> Adapter:
        adapter_dir = self.adapter_dir
        if _CONTENT_KEY.match(key):
            path = adapter_dir / "sha256" / key[:2] / f"{key}.safetensors"
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise AdapterNotFoundError(f"adapter {key[:12]}... is not in the store at {adapter_dir}") from None
            if hashlib.sha256(data).hexdigest() != key:
                raise AdapterFormatError(f"adapter {key[:12]}...: the stored file fails its checksum")
            return parse_adapter(data)
        # Files written under an adapter id (tests and tools that place one by hand).
        if not _ADAPTER_KEY.match(key):
            raise AdapterNotFoundError(f"adapter key {key!r} is not an adapter id")
        if self.per_request.owns(key):
            path = self.per_request.path(key)
            if not path.is_file():
                raise AdapterNotFoundError(f"per-request adapter {key!r} is gone (its request ended)")
            return parse_adapter(str(path))
        matches = list(adapter_dir.glob(f"*/{key}.safetensors"))
        if len(matches) != 1:
            raise AdapterNotFoundError(f"adapter {key!r} is not in the store at {adapter_dir}")
        return parse_adapter(str(matches[0]))


class RequestAdapterFiles:
    """The per-request adapters in `folder` (written by request_adapter), as the AdapterManager's
    PerRequestKeys: a key is one by its prefix, and its request has ended once its file is gone."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    @staticmethod
    def owns(key: str) -> bool:
        return key.startswith(REQUEST_PREFIX) and bool(_ADAPTER_KEY.match(key))

    def ended(self, key: str) -> bool:
        return not self.path(key).is_file()


# Per-request adapters every model process of one server can load (a DreamSteerer edit's steered
# copy on Triton): <request dir>/<key>.safetensors (Settings.request_adapters_path(), by default
# <adapter dir>/request), found by blob_loader by their key's prefix. No tenant owns such a key, so
# no request from the gateway can name one; the store's start-up sweep removes any a crash left in
# the default folder (deploy/ puts it on the pod's /tmp, emptied with the pod). A model process drops
# such a key from its bank's slots and host memory at its first call after the file is gone
# (RequestAdapterFiles, the AdapterManager's `per_request`).
REQUEST_ADAPTERS = "request"
REQUEST_PREFIX = "request-"


@contextmanager
def request_adapter(adapter: Adapter, folder: Path) -> Iterator[str]:
    """`adapter` written into `folder` for the block under a fresh random key that blob_loader
    resolves in every process of this server; the file is gone when the block ends, however it ends."""
    key = f"{REQUEST_PREFIX}{uuid.uuid4().hex}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(serialize_adapter(adapter))
    os.replace(tmp, path)  # readers never see half a file
    try:
        yield key
    finally:
        path.unlink(missing_ok=True)


def adapter_checker(model_dir: Path, max_rank: int,
                    conv_target_modules=DEFAULT_UNET_CONV_TARGETS) -> Callable[[Adapter], Adapter]:
    """`prepare` of a bank built on the model's architecture on the meta device: it checks an
    uploaded adapter against the exact layers the serving bank will have, without loading weights
    (so the gateway can validate imports whichever backend holds the real model). Its conv layers
    default to the serving bank's (BankedAdapters.attach)."""
    from service.engine.pipeline import Engine

    skeleton = Engine.from_pretrained(model_dir, components=())  # every model on the meta device
    with torch.device("meta"):
        # Both of SDXL's text encoders: the serving bank puts LoRA on each, and a learned token's
        # vector is checked against their widths side by side.
        bank = AdapterBank(skeleton.unet, 2, max_rank, target_modules=SERVED_UNET_TARGETS,
                           conv_target_modules=conv_target_modules, text_encoder=skeleton.text_encoder,
                           text_encoder_target_modules=SERVED_TEXT_ENCODER_TARGETS,
                           text_encoder_2=skeleton.text_encoder_2, max_rows=1, family_title=skeleton.family.title)
    # Values are checked in float32 (meta tensors hold none; the bank's dtype is the model's).
    bank.dtype = torch.float32
    return bank.prepare
