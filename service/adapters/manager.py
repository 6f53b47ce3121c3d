"""Residency: which adapter lives in which bank slot, what stays parsed in host memory, what loads.

One ``AdapterManager`` owns a bank's slots. Requests ``acquire`` the adapters they use, which pins
their slots (refcounts) until the request is done; a miss loads the adapter (host LRU, else the
``loader``, e.g. the safetensors blob store), validates it against the bank and copies it in place
into a free slot or the least recently used unpinned one. Loads of different adapters run in
parallel outside the lock; concurrent requests for the same missing adapter share one load.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .bank import AdapterBank
from .errors import AdapterBankFull
from .formats import Adapter

Loader = Callable[[str], Adapter]


class _NoFreeSlot(Exception):
    """Internal: every slot is pinned right now; acquire() backs off and retries."""


class AdapterMetrics:
    """The bank's Prometheus series; pass a CollectorRegistry to keep tests or instances apart."""

    def __init__(self, registry: CollectorRegistry | None = None):
        registry = registry if registry is not None else REGISTRY
        self.hits = Counter(
            "steerserve_adapter_cache_hits", "Adapter acquisitions served by a resident slot.", registry=registry
        )
        self.misses = Counter(
            "steerserve_adapter_cache_misses",
            "Adapter acquisitions that had to load into a slot, by where the adapter came from.",
            ["source"],  # "host" (parsed copy in memory) or "store" (the loader)
            registry=registry,
        )
        self.evictions = Counter(
            "steerserve_adapter_evictions", "Adapters evicted from a slot to make room.", registry=registry
        )
        self.load_seconds = Histogram(
            "steerserve_adapter_load_seconds",
            "Seconds to make a missing adapter resident (read, parse, validate, copy into the slot).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.resident = Gauge("steerserve_adapter_resident", "Adapters resident in bank slots.", registry=registry)
        self.host_cached = Gauge(
            "steerserve_adapter_host_cached", "Parsed adapters kept in host memory.", registry=registry
        )


class AdapterManager:
    """Maps adapter keys to bank slots with LRU eviction of unpinned slots; thread-safe.

    Args:
        bank: the AdapterBank whose slots 1..S-1 this manager owns.
        loader: ``key -> Adapter`` for adapters in neither a slot nor the host cache; may raise
            AdapterNotFoundError or AdapterFormatError. Called without the manager's lock held.
        host_cache_size: parsed adapters kept in host memory after eviction from their slot (0: none).
        acquire_timeout_s: how long an acquisition waits for a pinned slot to free up before
            raising AdapterBankFull (0: fail at once).
    """

    def __init__(
        self,
        bank: AdapterBank,
        loader: Loader,
        *,
        host_cache_size: int = 64,
        acquire_timeout_s: float = 0.0,
        registry: CollectorRegistry | None = None,
    ):
        self.bank = bank
        self.loader = loader
        self.host_cache_size = host_cache_size
        self.acquire_timeout_s = acquire_timeout_s
        self.metrics = AdapterMetrics(registry)
        self._cond = threading.Condition()
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident key -> slot, LRU first
        self._adapter_in: dict[int, Adapter] = {}  # slot -> the adapter copied there
        self._pins: dict[int, int] = {}  # slot -> requests using it
        self._free: list[int] = list(range(bank.num_slots - 1, 0, -1))  # pop() gives slot 1 first
        self._loading: set[str] = set()  # keys being loaded by some thread
        self._orphans: set[int] = set()  # slots of invalidated adapters, freed by their last release
        self._host: OrderedDict[str, Adapter] = OrderedDict()
        # Bumped by invalidate(key), so a load racing a delete/re-import of that key is not published.
        self._versions: dict[str, int] = {}
        # Per-request adapters (an edit's steered copy): never stored, never in the host cache,
        # reachable only by their random key while the request that made them runs.
        self._ephemeral: dict[str, Adapter] = {}

    # --------------------------------------------------------------------------------------------
    # Acquire / release

    @contextmanager
    def acquire(self, keys: Sequence[str]) -> Iterator[dict[str, int]]:
        """Pin the adapters ``keys`` (loading them if needed) and yield {key: slot} for the block.

        All or nothing: if one adapter cannot be made resident, the ones already pinned are
        released and the error (AdapterBankFull, AdapterNotFoundError, AdapterFormatError) raised.
        A request never waits while holding pins (two requests each holding one slot and waiting
        for another would deadlock): when no slot is free it releases everything, waits for
        another request's release (up to ``acquire_timeout_s``) and starts over.
        """
        keys = list(dict.fromkeys(keys))  # unique, in order
        if len(keys) > self.bank.num_slots - 1:
            raise AdapterBankFull(
                f"{len(keys)} adapters in one request, but the bank has {self.bank.num_slots - 1} slots"
            )
        deadline = time.monotonic() + self.acquire_timeout_s
        while True:
            slots: dict[str, int] = {}
            try:
                for key in keys:
                    slots[key] = self._pin(key)
                break
            except _NoFreeSlot:
                self._release(slots.values())
                if time.monotonic() >= deadline:
                    raise AdapterBankFull(
                        f"all {self.bank.num_slots - 1} adapter slots are in use by requests in flight"
                    ) from None
                self._wait_for_slots(keys, deadline)
            except BaseException:
                self._release(slots.values())
                raise
        try:
            yield slots
        finally:
            self._release(slots.values())

    def _wait_for_slots(self, keys: Sequence[str], deadline: float) -> None:
        """Block until enough slots are free or unpinned for ``keys``' misses, or raise at the deadline."""
        with self._cond:
            while True:
                needed = sum(1 for k in keys if k not in self._slot_of and k not in self._loading)
                available = len(self._free) + sum(
                    1 for k, s in self._slot_of.items() if k not in keys and not self._pins.get(s)
                )
                if available >= needed:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AdapterBankFull(
                        f"all {self.bank.num_slots - 1} adapter slots are in use by requests in flight"
                    )
                self._cond.wait(remaining)

    def _pin(self, key: str) -> int:
        with self._cond:
            while True:
                slot = self._slot_of.get(key)
                if slot is not None:
                    self._slot_of.move_to_end(key)
                    self._pins[slot] = self._pins.get(slot, 0) + 1
                    self.metrics.hits.inc()
                    return slot
                if key not in self._loading:
                    break
                self._cond.wait()  # another thread is loading this key: share its result
            self._loading.add(key)
            version = self._versions.get(key, 0)
            cached = self._host.get(key)
            if cached is not None:
                self._host.move_to_end(key)

        # Slow path, without the lock: read + parse + validate, then copy into a reserved slot.
        t0 = time.perf_counter()
        slot = adapter = None
        try:
            adapter = cached if cached is not None else self._ephemeral.get(key)
            if adapter is None:
                # Validate before any slot is touched: a bad file is refused, never half-loaded.
                adapter = self.bank.prepare(self.loader(key))
            slot = self._reserve_slot()
            self.bank.load_slot(slot, adapter, check=False)
        except BaseException:
            with self._cond:
                self._loading.discard(key)
                if slot is not None:
                    self._pins.pop(slot, None)
                    self._free.append(slot)
                elif adapter is not None and version == self._versions.get(key, 0):
                    self._remember_on_host(key, adapter)  # read and valid: the retry needs no read
                self._cond.notify_all()
            raise
        with self._cond:
            self._loading.discard(key)
            self._adapter_in[slot] = adapter
            if version == self._versions.get(key, 0):
                self._slot_of[key] = slot
                if key not in self._ephemeral:
                    self._remember_on_host(key, adapter)
            else:
                # The adapter was invalidated (deleted/replaced) while loading: serve this request
                # with what it asked for, but don't publish the slot to later requests.
                self._orphans.add(slot)
            self.metrics.misses.labels(source="host" if cached is not None else "store").inc()
            self.metrics.load_seconds.observe(time.perf_counter() - t0)
            self.metrics.resident.set(len(self._slot_of))
            self._cond.notify_all()
        return slot

    def _reserve_slot(self) -> int:
        """A free slot, else the LRU unpinned one (evicted); pinned once for the caller."""
        with self._cond:
            if self._free:
                slot = self._free.pop()
            else:
                victim = next((k for k, s in self._slot_of.items() if not self._pins.get(s)), None)
                if victim is None:
                    raise _NoFreeSlot
                slot = self._slot_of.pop(victim)
                self._adapter_in.pop(slot, None)
                self.metrics.evictions.inc()
                self.metrics.resident.set(len(self._slot_of))
            self._pins[slot] = 1
            return slot

    def _release(self, slots: Sequence[int] | Iterator[int]) -> None:
        with self._cond:
            for slot in slots:
                self._pins[slot] -= 1
                if self._pins[slot] == 0:
                    del self._pins[slot]
                    if slot in self._orphans:
                        self._orphans.discard(slot)
                        self._adapter_in.pop(slot, None)
                        self._free.append(slot)
            self._cond.notify_all()

    def _remember_on_host(self, key: str, adapter: Adapter) -> None:
        if self.host_cache_size <= 0:
            return
        self._host[key] = adapter
        self._host.move_to_end(key)
        while len(self._host) > self.host_cache_size:
            self._host.popitem(last=False)
        self.metrics.host_cached.set(len(self._host))

    # --------------------------------------------------------------------------------------------
    # Management

    def invalidate(self, key: str) -> None:
        """Forget ``key`` (deleted or replaced in the store): drop it from host memory and, once no
        request uses it, from its slot. Requests already holding it finish with the old weights."""
        with self._cond:
            self._versions[key] = self._versions.get(key, 0) + 1
            self._host.pop(key, None)
            slot = self._slot_of.pop(key, None)
            if slot is not None:
                if self._pins.get(slot):
                    self._orphans.add(slot)  # freed by the last release
                else:
                    self._adapter_in.pop(slot, None)
                    self._free.append(slot)
            self.metrics.resident.set(len(self._slot_of))
            self.metrics.host_cached.set(len(self._host))

    @contextmanager
    def ephemeral(self, adapter: Adapter, prefix: str = "request") -> Iterator[str]:
        """A per-request adapter under a fresh random key for the block: acquire() loads it into a
        slot like any other, nothing else can name it, and on exit it leaves its slot (once unpinned)
        and this manager for good. Validated first: a bad one is refused before any slot changes."""
        prepared = self.bank.prepare(adapter)
        key = f"{prefix}:{uuid.uuid4().hex}"
        with self._cond:
            self._ephemeral[key] = prepared
        try:
            yield key
        finally:
            with self._cond:
                self._ephemeral.pop(key, None)
            self.invalidate(key)
            with self._cond:
                if key not in self._loading:
                    self._versions.pop(key, None)  # the key is never used again

    def ephemeral_keys(self) -> list[str]:
        with self._cond:
            return list(self._ephemeral)

    def get(self, key: str) -> Adapter:
        """The parsed adapter of ``key`` (host cache, a per-request adapter, or the loader), without
        making it resident: for code that needs its tensors (an edit's private model copy)."""
        with self._cond:
            adapter = self._host.get(key) or self._ephemeral.get(key)
            if adapter is not None:
                return adapter
            slot = self._slot_of.get(key)
            if slot is not None and slot in self._adapter_in:
                return self._adapter_in[slot]
        return self.bank.prepare(self.loader(key))

    def prefetch(self, key: str) -> None:
        """Make ``key`` resident without keeping it pinned (e.g. right after ImportAdapter)."""
        with self.acquire([key]):
            pass

    def resident(self) -> dict[str, int]:
        """{key: slot} of resident adapters, least recently used first."""
        with self._cond:
            return dict(self._slot_of)

    def pinned(self) -> dict[int, int]:
        with self._cond:
            return dict(self._pins)

    def host_cached(self) -> list[str]:
        with self._cond:
            return list(self._host)

    def adapter_in_slot(self, slot: int) -> Adapter | None:
        """The adapter copied into ``slot`` (valid while the caller holds the slot pinned)."""
        with self._cond:
            return self._adapter_in.get(slot)

    def token_embeddings(self, slot: int) -> dict:
        """Textual-inversion vectors {token: [n, hidden]} of the adapter in a pinned slot."""
        adapter = self.adapter_in_slot(slot)
        return dict(adapter.token_embeddings) if adapter is not None else {}
