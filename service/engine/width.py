"""How many requests share a UNet call, and so how many admission lets run at once: the one place
that decides it. The step batcher measures into it; admission (service/admission) asks it.

The step batcher (service/engine/batching.py) puts the denoising steps of every request in flight
into one UNet call, so admitting k requests at once makes each call about k requests wide. Whether
that pays depends on the device. A call of x rows costs about

    c(x) = fixed + per_row * x

On a GPU `fixed` dominates (a call of 16 rows costs about what a call of 2 does): k requests share
it for almost nothing, throughput grows about k-fold. On a CPU `per_row` dominates (a call costs
about the sum of its rows): k requests at once make each of them nearly k times slower for little
gain in throughput, and another tenant's request that arrives under a flood waits for, then runs
beside, k of the flood's.

`BatchWidth` fits `fixed` and `per_row` from measured steps (the batcher's recent ones: from one
UNet call to the next, so each request's own guidance and scheduler step count too; before they
span widths far apart, a measurement at start of a 2-row call against a wide one) and answers
`requests(cap)`: the widest k <= cap whose steps cost each request at most `SLOWDOWN` times what it
pays alone, c(k r) <= SLOWDOWN c(r) with r the rows of one request. A request arriving under a
flood waits at most for one cohort already running and then runs in the next, so it takes at most
about 2 x SLOWDOWN = 2.8x its time alone (the goal is 3x; the rest is room for what the model
leaves out: the requests' text encoding and decoding, a loaded machine). On a CPU that is 1-2
requests; on a GPU the cap (STEERSERVE_ADMISSION_SLOTS). Deadlines cap it further: a widening that would slow
a running request past its deadline (its time left over its estimated time left) is not taken.

Thread-safe: the batcher's model thread observes, the gateway's event loop asks.
"""

from __future__ import annotations

import statistics
import threading
from collections import defaultdict, deque
from typing import Iterable, Mapping

# The most a request may be slowed down by sharing its calls (see above: under the 3x fairness goal / 2).
SLOWDOWN = 1.4
# UNet rows of one request's step: one image under classifier-free guidance.
ROWS_PER_REQUEST = 2
# Measured calls of a width before it counts in the fit (their lower quartile: other processes on
# the machine only ever add time to a call, so the low end is the device's own cost; a median moved
# with the load, and on a busy 2-core host fitted no per-row cost at all), and how many recent calls
# the fit reads.
_MIN_SAMPLES = 3
_WINDOW = 256
# How far apart (a ratio of rows) recent calls' widths must be to fit without the start-up measurement.
_SPAN = 4


def _low(times: list[float]) -> float:
    """The lower quartile of a width's call times (see _MIN_SAMPLES)."""
    return statistics.quantiles(times, n=4, method="inclusive")[0]


class BatchWidth:
    def __init__(self, slowdown: float = SLOWDOWN, rows_per_request: float = ROWS_PER_REQUEST,
                 window: int = _WINDOW, unknown: int | None = None):
        """`unknown`: how many requests at once while nothing is measured (None: the cap)."""
        self.unknown = unknown
        self.slowdown_budget = slowdown
        self.rows_per_request = rows_per_request
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)
        self._seed: dict[float, float] = {}
        self._fit: tuple[float, float] | None = None
        self._stale = False
        self.seeded_by = ""  # where the start-up measurement came from (for logs)

    # -- measurements ----------------------------------------------------------------------------

    def observe(self, rows: float, seconds: float) -> None:
        """One UNet call: `rows` rows (at the default resolution; scaled by pixels otherwise) took
        `seconds` of compute."""
        if rows > 0 and seconds > 0:
            with self._lock:
                self._recent.append((round(float(rows), 2), float(seconds)))
                self._stale = True

    def seed(self, seconds_by_rows: Mapping[float, float], source: str = "") -> None:
        """Calls of a few widths measured at start (e.g. {2: 0.031, 16: 0.12}): the fit until the
        recent calls span two widths themselves."""
        with self._lock:
            self._seed = {round(float(r), 2): float(s) for r, s in seconds_by_rows.items() if r > 0 and s > 0}
            self.seeded_by = source
            self._stale = True

    def fit(self) -> tuple[float, float] | None:
        """(fixed, per_row) seconds of a call, or None while not known (fewer than two widths)."""
        with self._lock:
            if self._stale:
                self._fit, self._stale = self._refit(), False
            return self._fit

    def _refit(self) -> tuple[float, float] | None:
        groups: dict[float, list[float]] = defaultdict(list)
        for rows, seconds in self._recent:
            groups[rows].append(seconds)
        recent = {rows: _low(times) for rows, times in groups.items() if len(times) >= _MIN_SAMPLES}
        # Recent calls decide alone when they span widths at least _SPAN apart. Narrower (a CPU
        # serving 1-2 requests: calls of 2 and 4 rows), the noise of two nearby points makes the
        # slope anything, and a flat one widens admission to the cap at once; there the
        # measurement at start (2 rows against a wide call) keeps the far end, and the recent
        # calls replace it at the widths they measured.
        points = recent
        if len(recent) < 2 or max(recent) < _SPAN * min(recent):
            points = {**self._seed, **recent}
        if len(points) < 2:
            return None
        xs, ys = list(points), list(points.values())
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        per_row = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
        per_row = max(0.0, per_row)
        fixed = my - per_row * mx
        if fixed < 0:  # steeper than proportional (noise): proportional
            fixed, per_row = 0.0, statistics.fmean(y / x for x, y in zip(xs, ys))
        return fixed, per_row

    # -- the decision ------------------------------------------------------------------------------

    def call_seconds(self, rows: float) -> float | None:
        fit = self.fit()
        return None if fit is None else fit[0] + fit[1] * rows

    def slowdown(self, requests: float, base: float = 1) -> float | None:
        """How much slower each request's steps run with `requests` sharing every call than with
        `base` (1.0: free; `requests / base`: a CPU), or None while not known."""
        fit = self.fit()
        if fit is None:
            return None
        fixed, per_row = fit
        r = self.rows_per_request
        denominator = fixed + per_row * r * base
        return (fixed + per_row * r * requests) / denominator if denominator > 0 else 1.0

    def requests(self, cap: int, deadlines: Iterable[tuple[float, int]] = ()) -> int:
        """How many requests to run at once, 1..cap: the widest whose calls slow each request by at
        most the budget (SLOWDOWN) against running alone, and slow none of the running requests
        that have a deadline past it. `deadlines`: for each of those, (slack, base): its time left
        over its estimated time left, estimated while `base` requests ran at once; running k at
        once then takes slowdown(k, base) times that. While the cost of wider calls is not known
        yet: `unknown` (a CPU's 1: wider calls almost never pay there), else `cap`."""
        cap = max(1, int(cap))
        if self.fit() is None:
            return min(cap, self.unknown) if self.unknown else cap
        deadlines = list(deadlines)
        width = 1
        for k in range(2, cap + 1):
            if self.slowdown(k) > self.slowdown_budget + 1e-9:
                break
            if any(k > base and self.slowdown(k, base) > slack for slack, base in deadlines):
                break
            width = k
        return width

    def describe(self) -> str:
        fit = self.fit()
        if fit is None:
            return "not measured yet"
        fixed, per_row = fit
        return (f"a step costs {1000 * fixed:.1f} ms + {1000 * per_row:.2f} ms a row: up to "
                f"{self.requests(64)} at once within {self.slowdown_budget:g}x each")


class ReplicatedWidth:
    """The width of several model servers alike (Triton replicas): each runs `width`'s requests at
    once, so admission runs that many per ready replica, at most `cap` in all."""

    def __init__(self, width: BatchWidth, replicas):
        self.width = width
        self.replicas = replicas  # () -> how many ready replicas

    def requests(self, cap: int, deadlines: Iterable[tuple[float, int]] = ()) -> int:
        replicas = max(1, self.replicas())
        # A running request's `base` counts requests on every replica; its own replica ran 1/n of them.
        per_replica = [(slack, max(1, base / replicas)) for slack, base in deadlines]
        return max(1, min(int(cap), self.width.requests(cap, per_replica) * replicas))

    def describe(self) -> str:
        return f"{self.width.describe()}, per replica ({self.replicas()} ready)"
