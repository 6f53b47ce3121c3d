"""Exceptions of the adapter bank, each meant for one gRPC status code.

The gateway maps them without parsing messages:

- AdapterFormatError   -> INVALID_ARGUMENT   (the file or tensors are not a LoRA this model can serve)
- AdapterNotFoundError -> NOT_FOUND          (a loader has no adapter under that key)
- AdapterBankFull      -> RESOURCE_EXHAUSTED (every slot is pinned by in-flight requests)
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every adapter-bank error."""


class AdapterFormatError(AdapterError, ValueError):
    """An adapter file or its tensors cannot be served; the message names the bad key or shape."""


class AdapterNotFoundError(AdapterError, KeyError):
    """A loader has no adapter stored under the requested key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterBankFull(AdapterError, RuntimeError):
    """All slots are pinned by requests in flight; retry later or raise num_slots."""
