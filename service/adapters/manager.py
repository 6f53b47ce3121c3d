"""Residency: which adapter lives in which bank slot, what stays parsed in host memory, what loads.

One ``AdapterManager`` owns a bank's slots. Requests ``acquire`` the adapters they use, which pins
their slots (refcounts) until the request is done; a miss loads the adapter (host LRU, else the
``loader``, e.g. the safetensors blob store), validates it against the bank and copies it in place
into a free slot or the least recently used unpinned one. Loads of different adapters run in
parallel outside the lock; concurrent requests for the same missing adapter share one load.

At thousands of adapters (bench/scale.py) three more rules matter:
- the host cache is bounded by bytes (adapters differ 10x in size with their rank and layers), as
  well as by entries;
- eviction is fair between tenants: a slot or a host-cache entry is taken from a tenant holding more
  than its share (slots or bytes divided by the tenants present) before anyone else's, least
  recently used first, so one tenant's burst of new adapters recycles its own and cannot flush
  everyone's;
- reading, parsing and validating an adapter happens off the request path: ``prefetch_async`` hands
  it to a loader thread as soon as a request names it (the step batcher does, while the current
  UNet call runs), so the step that uses it only copies it into a slot.

State (all under one lock, ``_cond``):
- ``_Entry``, one per adapter key the manager knows, holds everything about that key: resident in
  slot N, its parsed copy in host memory (and its bytes), loading for an acquisition, queued for or
  being read by the loader thread, its owner (tenant). A key has an entry exactly while it is in one
  of those states (``_Entry.idle`` says when not, ``_forget_if_idle`` drops it), so nothing grows
  with the keys ever seen. ``invalidate`` detaches a key's entry and marks it stale: a load of it in
  flight serves its own request and publishes nothing (the key's next use makes a new entry).
- ``_Slot``, one per bank slot: its pins, the adapter copied there, and the entry published in it.
  A slot is free, reserved (pinned by a load copying into it), resident (an entry's), or orphaned
  (its key invalidated while requests use it; freed by the last release).
- ``_HostCache``: the parsed copies, least recently used first overall and per tenant, with each
  tenant's bytes, so an eviction picks its victim without scanning the cache.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .bank import AdapterBank
from .errors import AdapterBankFull
from .formats import Adapter

Loader = Callable[[str], Adapter]
Owners = Mapping[str, str]  # adapter key -> the tenant using it (fair eviction); "" when unknown

log = logging.getLogger(__name__)


class _NoFreeSlot(Exception):
    """Internal: every slot is pinned right now; acquire() backs off and retries."""


class PerRequestKeys(Protocol):
    """Per-request adapters that the loader serves for as long as their request runs (a DreamSteerer
    edit's steered copy on Triton, a file in the request-adapter folder: service.adapters.loading).
    The manager drops such a key from its slots and host memory once its request has ended."""

    def owns(self, key: str) -> bool:
        """Whether ``key`` names a per-request adapter (cheap: called under the manager's lock)."""

    def ended(self, key: str) -> bool:
        """Whether the request of the per-request adapter ``key`` has ended (called without the lock)."""


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
        self.host_cache_bytes = Gauge(
            "steerserve_adapter_host_cache_bytes",
            "Bytes of the parsed adapters kept in host memory (bounded by STEERSERVE_ADAPTER_HOST_CACHE_BYTES).",
            registry=registry,
        )
        self.prefetched = Counter(
            "steerserve_adapter_prefetched",
            "Adapters read, parsed and validated into host memory ahead of their first step, off the request path.",
            registry=registry,
        )


# -- state ---------------------------------------------------------------------------------------------

QUEUED, READING = "queued", "reading"  # _Entry.prefetch: waiting on the loader thread, or being read there


@dataclass(eq=False)
class _Entry:
    """Everything the manager knows about one adapter key (see the module's State)."""

    key: str
    owner: str = ""  # the tenant that used it last (fair eviction)
    slot: int | None = None  # resident: the bank slot it is published in (in AdapterManager._resident)
    host: Adapter | None = None  # its parsed copy kept in host memory (in the _HostCache)
    nbytes: int = 0  # that copy's bytes, charged to `owner` in the host cache
    tick: int = 0  # when the host copy was last used (the host cache's recency)
    loading: bool = False  # an acquisition is reading it and copying it into a slot
    prefetch: str | None = None  # QUEUED for the loader thread, or READING there
    stale: bool = False  # invalidated (detached from the manager): publish nothing of it

    def idle(self) -> bool:
        """In no slot, not in host memory, not being loaded or read: nothing to remember it for."""
        return self.slot is None and self.host is None and not self.loading and self.prefetch is None


@dataclass(eq=False)
class _Slot:
    """One bank slot. Free (in AdapterManager._free): no pins, no adapter. Reserved: pinned once by
    the load copying into it, no adapter yet. Resident: `entry` is published in it. Orphaned: no
    entry but pinned (its key was invalidated while requests used it, or during its load); its last
    release frees it."""

    index: int
    pins: int = 0
    adapter: Adapter | None = None  # what was copied into it (valid while pinned or resident)
    entry: _Entry | None = None


class _Pool(Protocol):
    """Eviction candidates, least recently used first, as the fair rule asks for them."""

    def oldest_of(self, tenant: str) -> _Entry | None: ...

    def oldest_over(self, share: float) -> _Entry | None: ...

    def oldest(self) -> _Entry | None: ...


def _fair_victim(pool: _Pool, tenant: str, tenant_over: bool, share: float) -> _Entry | None:
    """The eviction rule of slots and host memory alike: `tenant`'s own least recently used if it
    is (or would be) over its share, else the least recently used of any tenant holding more than
    `share`, else the least recently used of all."""
    if tenant_over:
        own = pool.oldest_of(tenant)
        if own is not None:
            return own
    over = pool.oldest_over(share)
    return over if over is not None else pool.oldest()


class _Listed:
    """A _Pool over a short list (the unpinned resident entries: at most the bank's slots)."""

    def __init__(self, candidates: Sequence[_Entry], held: Mapping[str, float]):
        self.candidates, self.held = candidates, held

    def oldest_of(self, tenant: str) -> _Entry | None:
        return next((e for e in self.candidates if e.owner == tenant), None)

    def oldest_over(self, share: float) -> _Entry | None:
        return next((e for e in self.candidates if self.held.get(e.owner, 0) > share), None)

    def oldest(self) -> _Entry | None:
        return self.candidates[0] if self.candidates else None


@dataclass(eq=False)
class _TenantHost:
    """One tenant's part of the host cache: its entries, least recently used first, and their bytes."""

    lru: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    nbytes: int = 0


class _HostCache:
    """Parsed adapters kept in host memory: least recently used first overall and per tenant, with
    each tenant's bytes. Adding, using, dropping and choosing a victim cost O(1), but for the fair
    rule's step that looks among the tenants over their share (O(tenants present), not O(entries))."""

    def __init__(self, max_entries: int, max_bytes: int | None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.lru: OrderedDict[str, _Entry] = OrderedDict()
        self.tenants: dict[str, _TenantHost] = {}
        self.total = 0
        self._clock = itertools.count(1)

    def keeps(self, nbytes: int) -> bool:
        """Whether an adapter of `nbytes` may be kept at all (one larger than the whole bound is not)."""
        return self.max_entries > 0 and (self.max_bytes is None or nbytes <= self.max_bytes)

    def over_bound(self) -> bool:
        return len(self.lru) > self.max_entries or (self.max_bytes is not None and self.total > self.max_bytes)

    def add(self, entry: _Entry, adapter: Adapter, nbytes: int) -> None:
        entry.host, entry.nbytes, entry.tick = adapter, nbytes, next(self._clock)
        self.lru[entry.key] = entry
        mine = self.tenants.setdefault(entry.owner, _TenantHost())
        mine.lru[entry.key] = entry
        mine.nbytes += nbytes
        self.total += nbytes

    def remove(self, entry: _Entry) -> None:
        del self.lru[entry.key]
        self._leave_tenant(entry)
        self.total -= entry.nbytes
        entry.host, entry.nbytes = None, 0

    def touch(self, entry: _Entry) -> None:
        entry.tick = next(self._clock)
        self.lru.move_to_end(entry.key)
        self.tenants[entry.owner].lru.move_to_end(entry.key)

    def change_owner(self, entry: _Entry, tenant: str) -> None:
        """`entry` (kept here) is now `tenant`'s: its bytes move to that tenant's account, in its
        place by recency (a rare event: one blob imported by two tenants, used in turn)."""
        self._leave_tenant(entry)
        entry.owner = tenant
        mine = self.tenants.setdefault(tenant, _TenantHost())
        mine.nbytes += entry.nbytes
        newest = next(reversed(mine.lru.values()), None)
        mine.lru[entry.key] = entry
        if newest is not None and newest.tick > entry.tick:
            mine.lru = OrderedDict(sorted(mine.lru.items(), key=lambda item: item[1].tick))

    def _leave_tenant(self, entry: _Entry) -> None:
        mine = self.tenants[entry.owner]
        del mine.lru[entry.key]
        mine.nbytes -= entry.nbytes
        if not mine.lru:
            del self.tenants[entry.owner]

    def victim(self, keep: _Entry) -> _Entry:
        """The entry to drop (never `keep`, the one just added or used, unless it is alone): the fair
        rule over the bytes, a tenant's share being the byte bound / the tenants present."""
        if len(self.lru) == 1:
            return keep
        bound = self.max_bytes if self.max_bytes is not None else self.total
        share = bound / max(1, len(self.tenants))
        tenant_over = self.tenants[keep.owner].nbytes > share
        victim = _fair_victim(_HostPool(self, keep), keep.owner, tenant_over, share)
        assert victim is not None  # the cache holds another entry than `keep`
        return victim


class _HostPool:
    """The host cache's entries but `keep` as a _Pool; `keep` is the most recently used (last) of
    its tenant and of the whole cache, so each lookup skips at most that one entry."""

    def __init__(self, cache: _HostCache, keep: _Entry):
        self.cache, self.keep = cache, keep

    def _first(self, lru: OrderedDict[str, _Entry]) -> _Entry | None:
        return next((e for e in lru.values() if e is not self.keep), None)

    def oldest_of(self, tenant: str) -> _Entry | None:
        mine = self.cache.tenants.get(tenant)
        return self._first(mine.lru) if mine is not None else None

    def oldest_over(self, share: float) -> _Entry | None:
        heads = (self._first(t.lru) for t in self.cache.tenants.values() if t.nbytes > share)
        return min((e for e in heads if e is not None), key=lambda e: e.tick, default=None)

    def oldest(self) -> _Entry | None:
        return self._first(self.cache.lru)


# -- the manager ---------------------------------------------------------------------------------------


class AdapterManager:
    """Maps adapter keys to bank slots with LRU eviction of unpinned slots; thread-safe.

    Args:
        bank: the AdapterBank whose slots 1..S-1 this manager owns.
        loader: ``key -> Adapter`` for adapters in neither a slot nor the host cache; may raise
            AdapterNotFoundError or AdapterFormatError. Called without the manager's lock held.
        host_cache_size: parsed adapters kept in host memory after eviction from their slot (0: none).
        host_cache_bytes: the most bytes of parsed adapters kept in host memory (None: no byte bound).
        acquire_timeout_s: how long an acquisition waits for a pinned slot to free up before
            raising AdapterBankFull (0: fail at once).
        per_request: which of the loader's keys are per-request adapters, and when their request has
            ended (PerRequestKeys); default: the loader's ``per_request`` attribute if it has one
            (service.adapters.loading.blob_loader's request-adapter folder). Such a key leaves its slot
            and host memory at the first acquisition after its request ended.
    """

    def __init__(
        self,
        bank: AdapterBank,
        loader: Loader,
        *,
        host_cache_size: int = 64,
        host_cache_bytes: int | None = None,
        acquire_timeout_s: float = 0.0,
        registry: CollectorRegistry | None = None,
        per_request: PerRequestKeys | None = None,
    ):
        self.bank = bank
        self.loader = loader
        self.host_cache_size = host_cache_size
        self.host_cache_bytes = host_cache_bytes
        self.acquire_timeout_s = acquire_timeout_s
        self.per_request = per_request if per_request is not None else getattr(loader, "per_request", None)
        self.metrics = AdapterMetrics(registry)
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}  # every key known (see _Entry), none idle
        self._slots = [_Slot(i) for i in range(bank.num_slots)]  # slot 0 (the base model) is never used
        self._free: list[int] = list(range(bank.num_slots - 1, 0, -1))  # pop() gives slot 1 first
        self._resident: OrderedDict[str, _Entry] = OrderedDict()  # entries with a slot, LRU first
        self._host = _HostCache(host_cache_size, host_cache_bytes)
        self._request_keys: set[str] = set()  # known keys that per_request owns
        self._prefetcher: ThreadPoolExecutor | None = None  # created on first use
        # Per-request adapters of this process (an in-process edit's steered copy): never stored,
        # never in the host cache, reachable only by their random key while the request that made
        # them runs. What such a key resolves to, in place of the loader.
        self._ephemeral: dict[str, Adapter] = {}

    # --------------------------------------------------------------------------------------------
    # Entries: the one place keys are added and forgotten

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(key)
            if self.per_request is not None and self.per_request.owns(key):
                self._request_keys.add(key)
        return entry

    def _forget_if_idle(self, entry: _Entry) -> None:
        """Drop `entry` once it is in no state (its owner goes with it: noted again at its next use)."""
        if entry.idle() and self._entries.get(entry.key) is entry:
            self._detach(entry)

    def _detach(self, entry: _Entry) -> None:
        del self._entries[entry.key]
        self._request_keys.discard(entry.key)

    def _set_owner(self, entry: _Entry, tenant: str | None) -> None:
        """Record who uses the key now (one blob imported by two tenants is theirs in turn)."""
        if tenant is None or tenant == entry.owner:
            return
        if entry.host is not None:
            self._host.change_owner(entry, tenant)  # its host-cache bytes move to the new owner
        else:
            entry.owner = tenant

    # --------------------------------------------------------------------------------------------
    # Slots: publish, unpublish, reserve, release

    def _publish(self, entry: _Entry, index: int) -> None:
        entry.slot = index
        self._slots[index].entry = entry
        self._resident[entry.key] = entry

    def _unpublish(self, entry: _Entry) -> None:
        """`entry` leaves its slot: freed now if unpinned, else orphaned until its last release."""
        slot = self._slots[entry.slot]
        del self._resident[entry.key]
        entry.slot, slot.entry = None, None
        if not slot.pins:
            self._free_slot(slot)

    def _free_slot(self, slot: _Slot) -> None:
        slot.pins, slot.adapter, slot.entry = 0, None, None
        self._free.append(slot.index)

    def _reserve_slot(self, tenant: str) -> int:
        """A free slot, else an unpinned one (evicted, see _slot_victim); pinned once for the caller."""
        with self._cond:
            if not self._free:
                victim = self._slot_victim(tenant)
                if victim is None:
                    raise _NoFreeSlot
                self._unpublish(victim)
                self._forget_if_idle(victim)
                self.metrics.evictions.inc()
                self.metrics.resident.set(len(self._resident))
            slot = self._slots[self._free.pop()]
            slot.pins = 1
            return slot.index

    def _slot_victim(self, tenant: str) -> _Entry | None:
        """The resident adapter to evict, by the fair rule: a tenant's share is the slots / the
        tenants resident (itself included), and it is over its share if taking one more slot would
        put it there. A tenant's burst of new adapters thus recycles its own slots once it holds its
        share, and leaves the others'. (A scan of the resident entries: at most the bank's slots.)"""
        held = Tally(e.owner for e in self._resident.values())
        share = (self.bank.num_slots - 1) / len(held.keys() | {tenant})
        unpinned = [e for e in self._resident.values() if not self._slots[e.slot].pins]  # LRU first
        return _fair_victim(_Listed(unpinned, held), tenant, held[tenant] + 1 > share, share)

    def _release(self, slots: Sequence[int] | Iterator[int]) -> None:
        with self._cond:
            for index in slots:
                slot = self._slots[index]
                slot.pins -= 1
                if not slot.pins and slot.entry is None:  # orphaned: nobody can name it any more
                    self._free_slot(slot)
            self._cond.notify_all()

    # --------------------------------------------------------------------------------------------
    # Host memory

    def _remember_on_host(self, entry: _Entry, adapter: Adapter) -> None:
        """Keep `entry`'s parsed adapter in host memory, evicting (fairly, see _HostCache.victim) to
        stay within the entry and byte bounds. One larger than the whole byte bound is not kept."""
        if entry.host is adapter:
            self._host.touch(entry)  # already kept (and charged to its owner)
            return
        nbytes = adapter.nbytes()
        if not self._host.keeps(nbytes):
            return
        if entry.host is not None:  # a different copy (re-read after a delete and re-import): replace it
            self._host.remove(entry)
        self._host.add(entry, adapter, nbytes)
        while self._host.over_bound():
            victim = self._host.victim(keep=entry)
            self._host.remove(victim)
            self._forget_if_idle(victim)
        self._host_gauges()

    def _host_gauges(self) -> None:
        self.metrics.host_cached.set(len(self._host.lru))
        self.metrics.host_cache_bytes.set(self._host.total)

    # --------------------------------------------------------------------------------------------
    # Acquire / release

    @contextmanager
    def acquire(self, keys: Sequence[str], owners: Owners | None = None) -> Iterator[dict[str, int]]:
        """Pin the adapters ``keys`` (loading them if needed) and yield {key: slot} for the block.

        ``owners``: the tenant of each key, for fair eviction (missing: the tenant seen last).

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
        self._drop_ended_requests()
        with self._cond:
            # Resident ones first: pinning them before any miss evicts keeps a miss from evicting an
            # adapter this very acquisition needs (and then loading it back). Owners: noted by _pin.
            keys.sort(key=lambda k: k not in self._resident)
        deadline = time.monotonic() + self.acquire_timeout_s
        while True:
            slots: dict[str, int] = {}
            try:
                for key in keys:
                    slots[key] = self._pin(key, (owners or {}).get(key))
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
                known = [self._entries.get(k) for k in keys]
                needed = sum(1 for e in known if e is None or (e.slot is None and not e.loading))
                available = len(self._free) + sum(
                    1 for k, e in self._resident.items() if k not in keys and not self._slots[e.slot].pins
                )
                if available >= needed:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AdapterBankFull(
                        f"all {self.bank.num_slots - 1} adapter slots are in use by requests in flight"
                    )
                self._cond.wait(remaining)

    def _pin(self, key: str, owner: str | None = None) -> int:
        with self._cond:
            while True:
                entry = self._entry(key)
                self._set_owner(entry, owner)
                if entry.slot is not None:  # resident: a hit
                    self._resident.move_to_end(key)
                    self._slots[entry.slot].pins += 1
                    self.metrics.hits.inc()
                    return entry.slot
                if entry.prefetch == QUEUED:
                    # Still queued behind other reads on the loader thread: read it here now rather
                    # than wait for them (the loader skips it when its turn comes).
                    entry.prefetch = None
                    break
                if not entry.loading and entry.prefetch is None:
                    break
                self._cond.wait()  # another thread is reading this key: share its result
            entry.loading = True
            cached = entry.host
            if cached is not None:
                self._host.touch(entry)
            tenant = entry.owner

        # Slow path, without the lock: read + parse + validate, then copy into a reserved slot.
        t0 = time.perf_counter()
        slot = adapter = None
        try:
            adapter = cached if cached is not None else self._ephemeral.get(key)
            if adapter is None:
                # Validate before any slot is touched: a bad file is refused, never half-loaded.
                adapter = self.bank.prepare(self.loader(key))
            slot = self._reserve_slot(tenant)
            self.bank.load_slot(slot, adapter, check=False)
        except BaseException:
            with self._cond:
                entry.loading = False
                if slot is not None:
                    self._free_slot(self._slots[slot])
                elif adapter is not None and not entry.stale and key not in self._ephemeral:
                    self._remember_on_host(entry, adapter)  # read and valid: the retry needs no read
                self._forget_if_idle(entry)  # a failed read leaves nothing of the key behind
                self._cond.notify_all()
            raise
        with self._cond:
            entry.loading = False
            self._slots[slot].adapter = adapter
            if not entry.stale:
                self._publish(entry, slot)
                if key not in self._ephemeral:
                    self._remember_on_host(entry, adapter)
            # else: the adapter was invalidated (deleted/replaced) while loading: this request is
            # served what it asked for, but the slot is not published to later requests (orphaned).
            self.metrics.misses.labels(source="host" if cached is not None else "store").inc()
            self.metrics.load_seconds.observe(time.perf_counter() - t0)
            self.metrics.resident.set(len(self._resident))
            self._cond.notify_all()
        return slot

    # --------------------------------------------------------------------------------------------
    # Prefetch: reading adapters off the request path

    def prefetch_async(self, keys: Sequence[str], owners: Owners | None = None) -> None:
        """Start reading ``keys`` that are in neither a slot nor host memory into the host cache, on
        the loader thread; returns at once. A later acquire() of a key still being read waits for
        it instead of reading it again; a read that fails is forgotten (that acquire() reads it
        again and raises the error to its request)."""
        if self.host_cache_size <= 0 or self.host_cache_bytes == 0:
            return
        todo: list[_Entry] = []
        with self._cond:
            for key in dict.fromkeys(keys):
                known = key in self._entries  # resident, in host memory, loading or being read already
                if not known and key in self._ephemeral:
                    continue
                entry = self._entry(key)
                self._set_owner(entry, (owners or {}).get(key))
                if not known:
                    entry.prefetch = QUEUED
                    todo.append(entry)
            if not todo:
                return
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-prefetch",
                                                      initializer=_loader_thread)
        for entry in todo:
            try:
                future = self._prefetcher.submit(self._prefetch_one, entry)
            except RuntimeError:  # closed (or broken): the request reads it itself
                self._end_prefetch(entry)
            else:
                # A read that never runs (cancelled at close, a broken pool) must not leave its key
                # marked: an acquire would wait for it for ever.
                future.add_done_callback(lambda f, e=entry: self._end_prefetch(e) if f.cancelled() or f.exception() else None)

    def _end_prefetch(self, entry: _Entry) -> None:
        with self._cond:
            entry.prefetch = None
            self._forget_if_idle(entry)
            self._cond.notify_all()

    def _prefetch_one(self, entry: _Entry) -> None:
        with self._cond:
            if entry.prefetch != QUEUED or entry.stale:  # an acquire took it over, or it was invalidated
                return
            entry.prefetch = READING
        adapter = None
        try:
            adapter = self.bank.prepare(self.loader(entry.key))
        except Exception as exc:  # noqa: BLE001 - the request that uses it reads it again and fails alone
            log.debug("prefetch of adapter %s failed: %s", entry.key[:12], exc)
        finally:
            with self._cond:  # (re-entrant: _end_prefetch takes it again)
                if adapter is not None and not entry.stale and entry.slot is None:
                    self._remember_on_host(entry, adapter)
                    self.metrics.prefetched.inc()
                self._end_prefetch(entry)

    def prefetching(self) -> list[str]:
        """Keys queued for or being read by the loader thread."""
        with self._cond:
            return [key for key, entry in self._entries.items() if entry.prefetch is not None]

    def close(self) -> None:
        """Stop the loader thread. Reads still queued are dropped, and so are their keys' marks: an
        acquire() waiting for one reads the adapter itself."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
        with self._cond:
            for entry in [e for e in self._entries.values() if e.prefetch is not None]:
                entry.prefetch = None
                self._forget_if_idle(entry)
            self._cond.notify_all()

    # --------------------------------------------------------------------------------------------
    # Management

    def invalidate(self, key: str) -> None:
        """Forget ``key`` (deleted or replaced in the store): drop it from host memory and, once no
        request uses it, from its slot. Requests already holding it finish with the old weights; a
        load of it in flight serves its own request and publishes nothing."""
        with self._cond:
            entry = self._entries.get(key)
            if entry is None:
                return
            self._detach(entry)
            entry.stale = True
            if entry.slot is not None:
                self._unpublish(entry)
            if entry.host is not None:
                self._host.remove(entry)
            self.metrics.resident.set(len(self._resident))
            self._host_gauges()
            self._cond.notify_all()  # acquisitions waiting for its stale read start their own

    def _drop_ended_requests(self) -> None:
        """Invalidate the per-request keys whose request has ended (see PerRequestKeys)."""
        if not self._request_keys:  # (a racy read is fine: the next acquisition looks again)
            return
        with self._cond:
            keys = list(self._request_keys)
        for key in keys:
            if self.per_request.ended(key):  # a file system check: outside the lock
                self.invalidate(key)

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

    def ephemeral_keys(self) -> list[str]:
        with self._cond:
            return list(self._ephemeral)

    def get(self, key: str) -> Adapter:
        """The parsed adapter of ``key`` (host cache, a per-request adapter, or the loader), without
        making it resident: for code that needs its tensors (an edit's private model copy)."""
        with self._cond:
            entry = self._entries.get(key)
            adapter = (entry.host if entry is not None else None) or self._ephemeral.get(key)
            if adapter is not None:
                return adapter
            if entry is not None and entry.slot is not None and self._slots[entry.slot].adapter is not None:
                return self._slots[entry.slot].adapter
        return self.bank.prepare(self.loader(key))

    def prefetch(self, key: str, owner: str | None = None) -> None:
        """Make ``key`` resident without keeping it pinned (e.g. right after ImportAdapter)."""
        with self.acquire([key], {key: owner} if owner is not None else None):
            pass

    def resident(self) -> dict[str, int]:
        """{key: slot} of resident adapters, least recently used first."""
        with self._cond:
            return {key: entry.slot for key, entry in self._resident.items()}

    def pinned(self) -> dict[int, int]:
        """{slot: requests using it} of the pinned slots."""
        with self._cond:
            return {slot.index: slot.pins for slot in self._slots if slot.pins}

    def host_cached(self) -> list[str]:
        """Keys of the parsed adapters kept in host memory, least recently used first."""
        with self._cond:
            return list(self._host.lru)

    def owners(self) -> dict[str, str]:
        """{key: tenant} of the keys known (resident, in host memory, loading or being read)."""
        with self._cond:
            return {key: entry.owner for key, entry in self._entries.items()}

    def adapter_in_slot(self, slot: int) -> Adapter | None:
        """The adapter copied into ``slot`` (valid while the caller holds the slot pinned)."""
        with self._cond:
            return self._slots[slot].adapter

    def token_embeddings(self, slot: int) -> dict:
        """Textual-inversion vectors {token: [n, hidden]} of the adapter in a pinned slot."""
        adapter = self.adapter_in_slot(slot)
        return dict(adapter.token_embeddings) if adapter is not None else {}


def _loader_thread() -> None:
    """The prefetch thread's torch ops (validation) on one intra-op thread: beside the model thread,
    a second multi-threaded OpenMP team would fight it for the cores (service/engine/batching.py)."""
    import torch

    torch.set_num_threads(1)
