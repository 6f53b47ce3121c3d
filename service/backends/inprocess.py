"""The in-process backend: the engine in this process, behind a bounded queue of worker threads."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from service.engine.pipeline import Engine, GenerationCancelled, GenerationResult, GenerationSpec

from .base import BackendBusy


class InProcessBackend:
    name = "inprocess"

    def __init__(self, engine: Engine, model_dir, workers: int = 1, max_queue: int = 64, metrics=None):
        self.engine = engine
        self.model_dir = model_dir
        self.model_name = engine.name
        self.limits = engine.limits
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine")
        self._max_queue = max_queue
        self._waiting = 0
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def forget_adapter(self, key: str) -> None:
        """A deleted adapter leaves the bank (its slot frees once no request uses it)."""
        manager = getattr(self.engine.adapters, "manager", None)
        if manager is not None:
            manager.invalidate(key)

    async def generate(
        self, spec: GenerationSpec, deadline: float | None, on_step: Callable[[int, int], None] | None = None
    ) -> GenerationResult:
        with self._lock:
            if self._waiting >= self._max_queue:
                raise BackendBusy(f"{self._waiting} requests are already queued; retry later")
            self._waiting += 1
            self._set_depth()
        enqueued = time.monotonic()
        started = threading.Event()
        abandoned = threading.Event()  # the caller went away: stop at the next step

        def should_stop() -> bool:
            return abandoned.is_set() or (deadline is not None and time.monotonic() >= deadline)

        def run() -> GenerationResult:
            with self._lock:
                self._waiting -= 1
                self._set_depth()
            started.set()
            queued = time.monotonic() - enqueued
            if self.metrics is not None:
                self.metrics.queue_wait.observe(queued)
            if should_stop():
                raise GenerationCancelled("deadline passed while the request was queued")
            result = self.engine.generate(spec, should_stop=should_stop, on_step=on_step)
            result.timings["queue_seconds"] = queued
            return result

        future = self._executor.submit(run)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The client went away: drop the request if it has not started, else stop it early.
            abandoned.set()
            if future.cancel() and not started.is_set():
                with self._lock:
                    self._waiting -= 1
                    self._set_depth()
            raise

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._waiting)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
