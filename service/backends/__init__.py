"""Where the gateway sends model work: in-process (development, unit tests) or Triton (serving).

Both run the same engine library code; the gateway only sees the `Backend` protocol.
"""

from .base import Backend, BackendBusy, BackendUnavailable
from .inprocess import InProcessBackend

__all__ = ["Backend", "BackendBusy", "BackendUnavailable", "InProcessBackend"]
