"""Supervision of the Triton server the gateway depends on.

With `--backend triton` the gateway either owns an embedded Triton child (service.triton.launcher)
or talks to an external one (STEERSERVE_TRITON_URL, e.g. a sidecar in deploy/). Either way one
`TritonSupervisor` task probes it every `poll_s`:

    child exited     -> down; restarted on the same ports after a backoff (1 s, 2 s, 4 s ... 30 s,
                        back to 1 s once it has stayed up for `stable_s`); a restart that fails
                        counts as another exit
    not ready        -> down (an external server: Kubernetes restarts it, we only report)
    ready again      -> up

Each change of state calls `on_change(up, reason)`: the gateway turns its gRPC health NOT_SERVING /
SERVING. While the child is down (`exited`) the backend fails requests at once with UNAVAILABLE and
the reason instead of waiting on a dead channel; a live server that is not ready still gets them,
since its own answer names what is missing (one model unloaded, say) and others may still work. Since the probe runs every `poll_s` (0.5 s), health follows a Triton
that is back within a second. Only a child that exits is restarted: a live server that is not
ready (loading, or one model down) is reported, not killed, because a restart would not help it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from .launcher import TritonServer, TritonStartError

log = logging.getLogger("steerserve.triton.supervisor")

OnChange = Callable[[bool, str], Awaitable[None] | None]


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.up = Gauge("steerserve_triton_up", "1 while the Triton server answers ready, else 0.", registry=registry)
        self.restarts = Counter(
            "steerserve_triton_restarts", "Restarts of the embedded Triton child after it exited, by outcome.",
            ["outcome"], registry=registry,
        )
        self.down_seconds = Counter(
            "steerserve_triton_down_seconds", "Seconds the Triton server was not ready since the gateway started.",
            registry=registry,
        )


class TritonSupervisor:
    """Watches one Triton server; restarts it when it is the gateway's own child and it exits.

    Args:
        probe: answers whether the server is ready (an HTTP or gRPC readiness call).
        server: the embedded child to restart, or None for an external server (watched only).
        on_change: called with (up, reason) on every change of state.
    """

    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        server: TritonServer | None = None,
        on_change: OnChange | None = None,
        metrics: SupervisorMetrics | None = None,
        poll_s: float = 0.5,
        backoff_s: tuple[float, float] = (1.0, 30.0),
        stable_s: float = 60.0,
    ):
        self.probe, self.server, self.on_change, self.metrics = probe, server, on_change, metrics
        self.poll_s, self.backoff_s, self.stable_s = poll_s, backoff_s, stable_s
        self.up = True  # the gateway starts it only once the server is ready
        self.exited = False  # the child exited and is not back yet: requests fail at once
        self.reason = ""
        self.restarts = 0
        self._backoff = backoff_s[0]
        self._up_since = self._down_since = time.monotonic()
        self._became_up = asyncio.Event()
        self._became_up.set()
        self._task: asyncio.Task | None = None
        if metrics is not None:
            metrics.up.set(1)

    def start(self) -> "TritonSupervisor":
        self._task = asyncio.get_running_loop().create_task(self._run(), name="triton-supervisor")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def wait_up(self) -> None:
        """Returns once the server is ready (at once when it is)."""
        await self._became_up.wait()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failed probe
                log.exception("Triton supervisor: probe failed")

    async def _check(self) -> None:
        child = self.server.process if self.server is not None else None
        if child is not None and child.poll() is not None:
            self.exited = True
            await self._set(False, f"the Triton server exited with code {child.returncode}; restarting it")
            await self._restart()
            return
        ready = await self.probe()
        if ready != self.up:
            await self._set(ready, "" if ready else "the Triton server is not ready (loading, or a model is down)")
        if ready and time.monotonic() - self._up_since >= self.stable_s:
            self._backoff = self.backoff_s[0]  # stayed up: the next crash restarts quickly again

    async def _restart(self) -> None:
        delay, self._backoff = self._backoff, min(self._backoff * 2, self.backoff_s[1])
        self.restarts += 1
        log.error("Triton exited (code %s); restart %d in %.0f s:\n%s", self.server.process.returncode,
                  self.restarts, delay, self.server.log_tail(20))
        await asyncio.sleep(delay)
        self.reason = f"the Triton server exited; restart {self.restarts} under way (it takes a while to load its models)"
        try:
            await asyncio.to_thread(self.server.restart)
        except TritonStartError as exc:
            self._count("failed")
            log.error("Triton restart %d failed: %s", self.restarts, exc)
            return  # the next probe sees the exited child and tries again, after a longer backoff
        self._count("succeeded")
        self.exited = False
        await self._set(True, "")

    async def _set(self, up: bool, reason: str) -> None:
        if up == self.up and reason == self.reason:
            return
        now = time.monotonic()
        if not up and self.up:
            self._down_since = now
            self._became_up.clear()
        if up and not self.up:
            self._up_since = now
            if self.metrics is not None:
                self.metrics.down_seconds.inc(now - self._down_since)
            self._became_up.set()
        changed = up != self.up
        self.up, self.reason = up, reason
        if self.metrics is not None:
            self.metrics.up.set(1 if up else 0)
        if changed:
            log.warning("Triton %s%s", "ready again" if up else "down: ", reason)
            if self.on_change is not None:
                result = self.on_change(up, reason)
                if asyncio.iscoroutine(result):
                    await result

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.restarts.labels(outcome).inc()
