"""Domain errors that cross package lines. Each layer raises what happened; the gateway's servicer
(service/gateway/servicer.py: _status_for) is the one place that turns them into gRPC codes.

Errors that belong to one package stay there (adapters: AdapterNotFoundError, AdapterBankFull;
edit: EditRefused; engine: GenerationCancelled; stores: NotFound, QuotaExceeded ...)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request's content cannot be served as asked (INVALID_ARGUMENT)."""


class Busy(RuntimeError):
    """Capacity is taken: a queue is full or every adapter slot is pinned (RESOURCE_EXHAUSTED);
    the caller should retry later."""


class Unavailable(RuntimeError):
    """The model server cannot be reached or has not loaded its models (UNAVAILABLE)."""
