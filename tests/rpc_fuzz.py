"""Hypothesis strategies for every request message of the public API, built from the proto itself.

Each field gets hostile and valid values alike: NaN/inf and huge floats, huge and negative ints,
unknown enum numbers, unicode (no lone surrogates: protobuf strings are UTF-8), ids that look like
paths, and for bytes: nothing, noise, a real small PNG, a truncated PNG, a decompression bomb's
header, a real LoRA safetensors file, a safetensors header claiming terabytes, pickles. Used by
tests/test_fuzz.py (a fast subset) and bench/fuzz_rpcs.py (the long run).
"""

from __future__ import annotations

import io
import json
import pickle
import struct

import grpc
import numpy as np
from hypothesis import strategies as st
from PIL import Image

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from google.protobuf.descriptor import FieldDescriptor as F

SERVICE = pb.DESCRIPTOR.services_by_name["SteerServe"]
# Answers that mean the service did not handle the input: what the fuzzing must never see.
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _png(size=(64, 64), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(
        mode).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (a decompression bomb's start), with no real data."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _safetensors_claiming(size: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [size], "data_offsets": [0, size * 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def byte_values(lora: bytes | None = None) -> st.SearchStrategy[bytes]:
    png = _png()
    options = [
        st.just(b""), st.binary(max_size=256), st.just(png), st.just(png[: len(png) // 2]),
        st.just(_png((48, 40))), st.just(_png((64, 64), "L")), st.just(_png_header_claiming(100_000, 100_000)),
        st.just(_safetensors_claiming(10**12)), st.just(struct.pack("<Q", 2**63) + b"{}"),
        st.just(pickle.dumps({"w": [1, 2, 3]})), st.just(b"\x80\x04\x95" + b"\0" * 32),
    ]
    if lora is not None:
        options += [st.just(lora), st.just(lora[: len(lora) // 2]), st.just(lora[:8] + b"{" + lora[9:])]
    return st.one_of(options)


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
_STRINGS = st.one_of(
    _TEXT, st.just(""), st.just("a red circle on a blue background"), st.just("../../etc/passwd"),
    st.just("ad-" + "0" * 20), st.just("job-" + "f" * 20), st.just("sks"), st.just("<sks>"),
    st.text(max_size=5).map(lambda s: s * 400),  # long
)
_INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 2, 3, 8, 20, 64, 512, 513, 4096, -1]))
_INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, 42, -1]))
# No subnormals from the strategy: hypothesis refuses to run them when a test before has set the
# CPU to flush denormals (the engine does, for speed); tiny values still come from the constants.
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False, width=32),
                   st.sampled_from([0.0, -0.0, 1.0, 7.5, -1.0, 1e-40, 3.4e38]))


def _scalar(field, lora):
    t = field.type
    if t == F.TYPE_STRING:
        return _STRINGS
    if t == F.TYPE_BYTES:
        return byte_values(lora)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return _FLOATS
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _INT64
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 99))
    return _INT32


def message_strategy(descriptor, lora: bytes | None = None, depth: int = 0) -> st.SearchStrategy:
    """Messages of `descriptor` with any subset of fields set to any of the values above."""
    cls = getattr(pb, descriptor.name) if descriptor.file is pb.DESCRIPTOR else None
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            if depth >= 3 or field.message_type.full_name.startswith("google."):
                continue
            value = message_strategy(field.message_type, lora, depth + 1)
        else:
            value = _scalar(field, lora)
        if field.is_repeated:
            value = st.lists(value, max_size=6)
        fields[field.name] = st.one_of(st.none(), value)

    def build(values):
        message = cls()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                getattr(message, name).extend(value)
            elif field.message_type is not None:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields).map(build)


def call(stub: pb_grpc.SteerServeStub, method, request, metadata, timeout: float = 5.0):
    """One RPC of any kind (streams read through); returns the final status code."""
    rpc = getattr(stub, method.name)
    try:
        if method.server_streaming:
            for _ in rpc(request, metadata=metadata, timeout=timeout):
                pass
        else:
            rpc(request, metadata=metadata, timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        if err.code() in BAD_CODES:
            raise AssertionError(f"{method.name} answered {err.code().name}: {err.details()}\n{request}") from None
        return err.code()


def tokens() -> st.SearchStrategy[str | None]:
    """The caller's token: mostly a real one, sometimes a wrong, empty or absent one."""
    return st.one_of(st.just("token-alice"), st.just("token-alice"), st.just("token-bob"), st.just("wrong"),
                     st.just(""), st.none())


def metadata_for(token):
    return [] if token is None else [("authorization", f"Bearer {token}")]
