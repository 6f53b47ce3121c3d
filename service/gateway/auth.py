"""Bearer-token authentication: `authorization: Bearer <token>` -> tenant.

Configured keys are tokens or their digests: `sha256:<64 hex digits>` (`steerserve hash-token`
prints one), so a config file need not hold usable secrets. Every presented token is hashed and
compared with every configured digest in constant time (hmac.compare_digest on equal-length
digests): neither a prefix nor a length shows in the response time.
"""

from __future__ import annotations

import hmac
from typing import Mapping, Sequence

import grpc

from service.keys import key_digest, token_digest

from .errors import ServiceError


class Authenticator:
    def __init__(self, api_keys: Mapping[str, str]):
        self._keys = [(key_digest(key), tenant) for key, tenant in api_keys.items()]

    def tenant_for(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        header = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if header is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        if isinstance(header, bytes):
            header = header.decode("utf-8", "replace")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'")
        presented = token_digest(token.strip())
        tenant = None
        # Every key, no early exit, equal-length digests: the time does not depend on which matched.
        for known, known_tenant in self._keys:
            if hmac.compare_digest(known, presented):
                tenant = known_tenant
        if tenant is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "unknown API token")
        return tenant
