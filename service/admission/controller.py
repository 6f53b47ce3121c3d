"""The admission controller: slots, per-tenant queues in fair order, estimates, refusals (see __init__)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from service.backends.base import BackendBusy
from service.engine.sampling import GenerationCancelled

from service.engine.width import BatchWidth

T = TypeVar("T")

# Weight of the newest measurement in the seconds-per-unit average: a few requests follow a change
# of load (another resolution, a busier GPU), one odd request does not swing it.
_EWMA = 0.3


class Refused(BackendBusy):
    """Refused at admission (RESOURCE_EXHAUSTED); `reason` is the metric label."""

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.reason = reason
        # When a retry may be admitted, by the queue's estimate: sent to the caller as gRPC's
        # standard `grpc-retry-pushback-ms` trailer (clients wait at least that long).
        self.retry_after_s = retry_after_s


@dataclass
class AdmissionLimits:
    slots: int = 1  # requests the backend runs at once; with a BatchWidth, the most it may choose
    max_queue: int = 64  # requests waiting, all tenants together
    tenant_max_queued: int = 16  # requests one tenant may have waiting
    tenant_max_running: int = 0  # of the slots, how many one tenant may hold (0: all)
    tenant_rate: float = 0.0  # requests a second one tenant may start (token bucket; 0: no limit)
    tenant_burst: int = 10  # the bucket's size


@dataclass(eq=False)
class _Ticket:
    tenant: str
    kind: str
    cost: float
    granted: asyncio.Future
    tag: float  # virtual start time: requests start in the order of their tags
    deadline: float | None = None
    started: float | None = None
    base: int = 1  # requests running at once when it started (what its time estimate assumes)


@dataclass
class _Bucket:
    tokens: float
    last: float


@dataclass
class _Rates:
    """Measured seconds per unit of work, per kind of request (Generate and Edit differ)."""

    seconds_per_unit: dict[str, float] = field(default_factory=dict)

    def seconds(self, kind: str, cost: float) -> float:
        rate = self.seconds_per_unit.get(kind)
        if rate is None and self.seconds_per_unit:  # nothing measured for this kind yet: the others'
            rate = max(self.seconds_per_unit.values())
        return cost * (rate or 0.0)

    def observe(self, kind: str, cost: float, seconds: float) -> None:
        rate = seconds / max(cost, 1e-9)
        old = self.seconds_per_unit.get(kind)
        self.seconds_per_unit[kind] = rate if old is None else (1 - _EWMA) * old + _EWMA * rate

    def observe_at_least(self, kind: str, cost: float, seconds: float) -> None:
        rate = seconds / max(cost, 1e-9)
        if rate > self.seconds_per_unit.get(kind, 0.0):
            self.observe(kind, cost, seconds)


class Admission:
    def __init__(self, limits: AdmissionLimits, metrics=None, clock: Callable[[], float] = time.monotonic,
                 width: BatchWidth | None = None):
        """`width`: how many requests share a UNet call on this device (service/engine/width.py:
        the backend's `batch_width`), which decides how many run at once, up to `limits.slots`;
        None: `limits.slots`."""
        if limits.slots < 1:
            raise ValueError("admission needs at least one slot")
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.width = width
        self.rates = _Rates()
        self._queues: dict[str, deque[_Ticket]] = {}
        # Start-time fair queuing: virtual time advances with the tag of each request started; a
        # tenant's next request is tagged where its previous one ends (tag + cost), or at the
        # current virtual time if it had fallen behind (it was idle). So a backlogged tenant's
        # requests are spaced by their cost and a newly active tenant's request lands right after
        # what runs: nobody's flood is ahead of it by more than one request, and nobody starves.
        self._virtual_time = 0.0
        self._finish: dict[str, float] = {}  # per tenant: where its last queued request's tag ends
        self._running: set[_Ticket] = set()
        self._running_by_tenant: Counter[str] = Counter()
        self._buckets: dict[str, _Bucket] = {}
        self._enqueued: dict[_Ticket, float] = {}

    # -- what the gateway calls ------------------------------------------------------------------

    async def run(self, tenant: str, kind: str, cost: float, deadline: float | None,
                  work: Callable[[], Awaitable[T]]) -> T:
        """Admits (or refuses at once), waits for a slot in fair order, runs ``work``."""
        ticket = self._admit(tenant, kind, cost, deadline)
        try:
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            await asyncio.wait_for(asyncio.shield(ticket.granted), timeout)
        except asyncio.TimeoutError:
            self._withdraw(ticket)
            raise GenerationCancelled("deadline passed while the request waited for admission") from None
        except BaseException:  # the client went away: give the place (or the slot) back
            self._withdraw(ticket)
            raise
        if self.metrics is not None:
            self.metrics.admission_wait.labels(tenant).observe(ticket.started - self._enqueued[ticket])
        outcome = "failed"
        try:
            result = await work()
            outcome = "done"
            return result
        except GenerationCancelled:
            outcome = "stopped"
            raise
        finally:
            elapsed = self.clock() - ticket.started
            if outcome == "done":
                self.rates.observe(kind, cost, elapsed)
            elif outcome == "stopped":
                # Stopped at its deadline: it would have taken at least this long. Without this a
                # too-low estimate would keep admitting requests that then time out.
                self.rates.observe_at_least(kind, cost, elapsed)
            if self.metrics is not None and kind in self.rates.seconds_per_unit:
                self.metrics.admission_seconds_per_unit.labels(kind).set(self.rates.seconds_per_unit[kind])
            self._release(ticket)

    def estimated_wait(self, tenant: str) -> float:
        """Seconds until a new request of ``tenant`` would start: the running requests' remaining
        time and the waiting requests tagged before it, over the requests run at once. (It does not
        model tenant_max_running: with that limit set, a capped tenant's wait is underestimated.)"""
        now = self.clock()
        ahead = sum(self._remaining(t, now) for t in self._running)
        tag = self._next_tag(tenant)
        ahead += sum(self.rates.seconds(t.kind, t.cost) for q in self._queues.values() for t in q if t.tag <= tag)
        return ahead / self.concurrency()

    def concurrency(self, deadlines: bool = False) -> int:
        """How many requests run at once now: the batch width this device pays for, at most the
        slots (with `deadlines`: and no wider than lets the running requests meet theirs)."""
        if self.width is None:
            return self.limits.slots
        return self.width.requests(self.limits.slots, self._deadline_slack(self.clock()) if deadlines else ())

    def _remaining(self, ticket: _Ticket, now: float) -> float:
        return max(0.0, self.rates.seconds(ticket.kind, ticket.cost) - (now - ticket.started))

    def _deadline_slack(self, now: float) -> list[tuple[float, int]]:
        """For each running request with a deadline: (time left over estimated time left, the
        requests running at once that estimate assumes), how much slower it may run and finish."""
        bounds = []
        for t in self._running:
            remaining = self._remaining(t, now) if t.deadline is not None else 0.0
            if remaining > 0:  # (not: about done by the estimate, or nothing measured yet)
                bounds.append((max(0.0, t.deadline - now) / remaining, t.base))
        return bounds

    def _next_tag(self, tenant: str) -> float:
        return max(self._virtual_time, self._finish.get(tenant, 0.0))

    def waiting(self, tenant: str | None = None) -> int:
        if tenant is not None:
            return len(self._queues.get(tenant, ()))
        return sum(len(q) for q in self._queues.values())

    def running(self, tenant: str | None = None) -> int:
        return len(self._running) if tenant is None else self._running_by_tenant[tenant]

    # -- inside ------------------------------------------------------------------------------------

    def _admit(self, tenant: str, kind: str, cost: float, deadline: float | None) -> _Ticket:
        lim, now = self.limits, self.clock()
        if self.waiting() >= lim.max_queue:
            self._refuse(tenant, "queue_full", f"the service is at capacity ({self.waiting()} requests waiting); "
                                               "retry later", self.estimated_wait(tenant))
        if self.waiting(tenant) >= lim.tenant_max_queued:
            self._refuse(tenant, "tenant_queue", f"this tenant already has {self.waiting(tenant)} requests waiting "
                                                 f"(at most {lim.tenant_max_queued}); retry when some finish",
                         self.estimated_wait(tenant))
        if lim.tenant_rate > 0:
            bucket = self._buckets.setdefault(tenant, _Bucket(float(lim.tenant_burst), now))
            bucket.tokens = min(float(lim.tenant_burst), bucket.tokens + (now - bucket.last) * lim.tenant_rate)
            bucket.last = now
            if bucket.tokens < 1.0:
                refill = (1 - bucket.tokens) / lim.tenant_rate
                self._refuse(tenant, "rate", f"this tenant's rate limit is {lim.tenant_rate:g} requests/s "
                                             f"(burst {lim.tenant_burst}); retry in {refill:.1f} s", refill)
        wait = self.estimated_wait(tenant)
        run = self.rates.seconds(kind, cost)
        idle = not self._running and not self._queues
        if deadline is not None and now + run > deadline and not idle:
            # Too slow even on an idle service: retrying later would not help (DEADLINE_EXCEEDED,
            # answered now rather than when the deadline has passed). On an idle service it runs
            # anyway: an estimate that is too high (one slow first request) must be able to learn
            # it was wrong, or short deadlines would be refused for good.
            if self.metrics is not None:
                self.metrics.admission_rejections.labels(tenant, "too_slow").inc()
            raise GenerationCancelled(
                f"this request takes about {run:.1f} s by the service's measurements and its deadline is "
                f"{deadline - now:.1f} s away; allow more time or ask for fewer steps, images or pixels")
        if deadline is not None and now + wait + run > deadline and not idle:
            self._refuse(tenant, "deadline", (
                f"estimated wait {wait:.1f} s + {run:.1f} s to run exceeds the deadline in {deadline - now:.1f} s; "
                "retry later or with a longer deadline"))  # no pushback: waiting would eat the same deadline
        if lim.tenant_rate > 0:  # admitted: it takes its token (refusals take none)
            self._buckets[tenant].tokens -= 1.0
        tag = self._next_tag(tenant)
        ticket = _Ticket(tenant, kind, cost, asyncio.get_running_loop().create_future(), tag, deadline)
        self._finish[tenant] = tag + cost
        self._enqueued[ticket] = now
        self._queues.setdefault(tenant, deque()).append(ticket)
        if self.metrics is not None:
            self.metrics.admission_estimated_wait.observe(wait)
        self._dispatch()
        return ticket

    def _refuse(self, tenant: str, reason: str, message: str, retry_after_s: float | None = None):
        if self.metrics is not None:
            self.metrics.admission_rejections.labels(tenant, reason).inc()
        raise Refused(reason, message, retry_after_s)

    def _dispatch(self) -> None:
        """Grants free slots to the waiting requests with the smallest tags (oldest first on a tie),
        skipping tenants that hold all the slots they may."""
        limit = self.limits.tenant_max_running or self.limits.slots
        while len(self._running) < self.concurrency(deadlines=True):
            heads = [q[0] for tenant, q in self._queues.items() if self._running_by_tenant[tenant] < limit]
            if not heads:
                break
            ticket = min(heads, key=lambda t: (t.tag, self._enqueued[t]))
            queue = self._queues[ticket.tenant]
            queue.popleft()
            if not queue:
                del self._queues[ticket.tenant]
            self._virtual_time = max(self._virtual_time, ticket.tag)
            self._running.add(ticket)
            self._running_by_tenant[ticket.tenant] += 1
            ticket.base = len(self._running)
            ticket.started = self.clock()  # now, not when its task wakes: estimates count it as running
            ticket.granted.set_result(None)
        self._export()

    def _withdraw(self, ticket: _Ticket) -> None:
        queue = self._queues.get(ticket.tenant)
        if queue is not None and ticket in queue:
            # Give back its place in virtual time: the tenant's later requests move up by its
            # cost, so a client that gives up is not charged for work never done.
            position = queue.index(ticket)
            del queue[position]
            for t in list(queue)[position:]:
                t.tag -= ticket.cost
            self._finish[ticket.tenant] -= ticket.cost
            if not queue:
                del self._queues[ticket.tenant]
            self._enqueued.pop(ticket, None)
            self._export()
        elif ticket in self._running:  # granted just as it gave up
            self._release(ticket)

    def _release(self, ticket: _Ticket) -> None:
        self._running.discard(ticket)
        self._enqueued.pop(ticket, None)
        self._running_by_tenant[ticket.tenant] -= 1
        if not self._running_by_tenant[ticket.tenant]:
            del self._running_by_tenant[ticket.tenant]
        self._dispatch()

    def _export(self) -> None:
        m = self.metrics
        if m is None:
            return
        tenants = set(self._queues) | set(self._running_by_tenant) | set(m.admission_tenants)
        for tenant in tenants:
            m.admission_queued.labels(tenant).set(self.waiting(tenant))
            m.admission_running.labels(tenant).set(self.running(tenant))
        m.admission_tenants.update(tenants)
        m.batch_width.set(self.concurrency())
