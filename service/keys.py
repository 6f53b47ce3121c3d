"""API keys as configured: a token, or its digest `sha256:<64 hex digits>`. Read by Settings (which
refuses a malformed or twice-configured key) and by the gateway's authentication alike."""

from __future__ import annotations

import hashlib

DIGEST_PREFIX = "sha256:"


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def key_digest(key: str) -> bytes:
    """A configured key as a digest: `sha256:<hex>` as given, a plain token hashed."""
    if key.startswith(DIGEST_PREFIX):
        value = key[len(DIGEST_PREFIX):]
        try:
            digest = bytes.fromhex(value)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError(f"API key {key[:16]}...: a digest must be 'sha256:' and 64 hex digits")
        return digest
    return token_digest(key)
