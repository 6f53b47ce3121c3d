"""Named crash points, for the crash-safety tests: a real SIGKILL of this process at a chosen step.

    STEERSERVE_CRASH_POINT=adapter.blob_written      # kill -9 the first time that point is reached
    STEERSERVE_CRASH_POINT=checkpoint.written:2      # ... the second time

A kill from outside lands at a random instant; these land exactly between the writes whose order
keeps the stores consistent (a file renamed into place but not yet registered, a row inserted but
not committed, an adapter registered but its job not yet finished), so tests can prove each gap is
safe. Unset (always, in production), `reached()` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "STEERSERVE_CRASH_POINT"

# Every point, in the order a write passes them (tests iterate over this).
POINTS = (
    "atomic_write.temp_written",  # stores: temp file written and fsynced, not yet renamed into place
    "adapter.blob_written",  # AdapterStore.create: blob in place, its row not yet inserted
    "adapter.row_inserted",  # AdapterStore.create: row inserted, transaction not yet committed
    "adapter.committed",  # AdapterStore.create: committed, the caller not yet answered
    "checkpoint.written",  # a job's checkpoint file in place, its step not yet recorded
    "job.adapter_registered",  # a job's adapter registered, the job not yet SUCCEEDED
)

_lock = threading.Lock()
_hits: dict[str, int] = {}


def reached(point: str) -> None:
    """Kills this process with SIGKILL if STEERSERVE_CRASH_POINT names `point` (and its count)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != point:
        return
    with _lock:
        _hits[point] = _hits.get(point, 0) + 1
        if _hits[point] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
