"""Bearer-token authentication: `authorization: Bearer <token>` -> tenant."""

from __future__ import annotations

import hmac
from typing import Mapping, Sequence

import grpc

from .errors import ServiceError


class Authenticator:
    def __init__(self, api_keys: Mapping[str, str]):
        self._keys = dict(api_keys)

    def tenant_for(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        header = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if header is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        if isinstance(header, bytes):
            header = header.decode("utf-8", "replace")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'")
        token = token.strip()
        tenant = None
        # Compare against every key in constant time so response timing does not reveal prefixes.
        for known, known_tenant in self._keys.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                tenant = known_tenant
        if tenant is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "unknown API token")
        return tenant
