"""Idempotency keys: a retried Personalize or ImportAdapter returns what the first call created.

A caller that lost a reply cannot tell whether its call took effect; with a key it simply retries.
The key is remembered per tenant and kind with a fingerprint of the request (its bytes without the
key) and the id of what it created, in the SAME transaction as the creation, under the lock that
already serializes those creations on every replica: two concurrent calls with one key cannot both
create. A key is kept for `TTL_S` (24 hours, like Stripe's); the same key with another request is
refused (INVALID_ARGUMENT) rather than silently answered with the first call's result.
"""

from __future__ import annotations

import hashlib
import re
import time

from service.errors import InvalidRequest

from .db import Connection, Database

TTL_S = 24 * 3600
_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class IdempotencyMismatch(InvalidRequest):
    """The key was used before for a different request."""


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise InvalidRequest("idempotency_key: must be 1-128 characters of A-Z a-z 0-9 . _ : - "
                             f"(got {len(key)} characters)")
    return key


def fingerprint(request) -> str:
    """sha256 of the request message without its idempotency_key (deterministic serialization)."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("idempotency_key")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


_SWEEP_EVERY_S = 60.0
_last_sweep = 0.0


def sweep(db: Database) -> None:
    """Forgets expired keys, in a short transaction of its own (at most once a minute per process):
    never inside a creating transaction, where its row locks would be taken after, and held with,
    the creation's own locks (PostgreSQL deadlocks between a Personalize and an import)."""
    global _last_sweep
    now = time.time()
    if now - _last_sweep < _SWEEP_EVERY_S:
        return
    _last_sweep = now
    with db.transaction() as conn:
        conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (now - TTL_S,))


def recall(conn: Connection, tenant: str, kind: str, key: str, digest: str) -> str | None:
    """The id the key's first call created, or None for a key not (or no longer) known."""
    row = conn.execute("SELECT fingerprint, result_id FROM idempotency_keys WHERE tenant=? AND kind=? AND idem_key=? "
                       "AND created_at >= ?", (tenant, kind, key, time.time() - TTL_S)).fetchone()
    if row is None:
        return None
    if row["fingerprint"] != digest:
        raise IdempotencyMismatch(f"idempotency_key: {key!r} was used for a different {kind} request "
                                  "within the last 24 hours; use a new key for a new request")
    return row["result_id"]


def remember(conn: Connection, tenant: str, kind: str, key: str, digest: str, result_id: str) -> None:
    conn.execute("DELETE FROM idempotency_keys WHERE tenant=? AND kind=? AND idem_key=?", (tenant, kind, key))
    conn.execute("INSERT INTO idempotency_keys (tenant, kind, idem_key, fingerprint, result_id, created_at) "
                 "VALUES (?, ?, ?, ?, ?, ?)", (tenant, kind, key, digest, result_id, time.time()))
