"""When a failed call is retried, and after how long: one policy for the sync and async clients.

Retried, with exponential backoff and jitter, only where a retry cannot do something twice:
- UNAVAILABLE (a replica restarting, the database reconnecting, a dropped connection: the call may
  or may not have taken effect, hence only repeatable calls below);
- RESOURCE_EXHAUSTED only when the server sent a wait estimate (`grpc-retry-pushback-ms`: admission's
  queue is full or the tenant is over its rate), after at least that long; without one (a quota, a
  full disk, a queue wait that would miss the deadline) a retry would fail the same way, so the
  error is raised at once.
and only for calls that are safe to repeat: reads, Generate and Edit (no stored effect), CancelJob
(cancelling twice is cancelling once), and Personalize / ImportAdapter because the client sends an
idempotency key with each (a repeated call returns the first call's job or adapter). DeleteAdapter
is not retried: a repeat after a lost reply would answer NOT_FOUND for a delete that succeeded.
A retry never outlives the call's deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from .errors import SteerServeError

# RPC name -> whether a repeat is harmless (see above).
SAFE_TO_RETRY = {
    "Generate": True, "Edit": True, "EditStream": True, "GetServerInfo": True,
    "GetJob": True, "ListJobs": True, "WatchJob": True, "CancelJob": True,
    "ListAdapters": True, "GetAdapter": True, "ExportAdapter": True,
    "Personalize": True, "ImportAdapter": True,  # with the idempotency key the client always sends
    "DeleteAdapter": False,
}


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5          # including the first
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2            # +-20 %: clients that failed together do not retry together
    max_pushback_s: float = 120.0  # a longer server estimate is raised to the caller instead

    def delay(self, rpc: str, attempt: int, error: SteerServeError, time_left_s: float | None) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to raise `error` now."""
        if not SAFE_TO_RETRY.get(rpc, False) or attempt >= self.max_attempts:
            return None
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        backoff *= 1 + random.uniform(-self.jitter, self.jitter)
        if error.code == grpc.StatusCode.UNAVAILABLE:
            wait = backoff
        elif error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after_s is not None:
            if error.retry_after_s < 0 or error.retry_after_s > self.max_pushback_s:
                return None
            wait = max(error.retry_after_s, 0.05) * (1 + random.uniform(0, self.jitter))
        else:
            return None
        if time_left_s is not None and wait >= time_left_s:
            return None  # the retry could not finish in time: the caller hears the real reason now
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)
