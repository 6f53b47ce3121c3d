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
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .bank import AdapterBank
from .errors import AdapterBankFull
from .formats import Adapter

Loader = Callable[[str], Adapter]
Owners = Mapping[str, str]  # adapter key -> the tenant using it (fair eviction); "" when unknown

log = logging.getLogger(__name__)


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
    ):
        self.bank = bank
        self.loader = loader
        self.host_cache_size = host_cache_size
        self.host_cache_bytes = host_cache_bytes
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
        self._host_size: dict[str, int] = {}  # key -> its bytes
        self._host_total = 0
        self._tenant_bytes: dict[str, int] = {}  # tenant -> bytes of its adapters in the host cache
        self._owner: dict[str, str] = {}  # key -> the tenant that used it last (slots and host cache)
        self._prefetching: set[str] = set()  # keys queued for or being read by the loader thread
        self._prefetch_started: set[str] = set()  # those of them the loader thread is reading now
        self._prefetcher: ThreadPoolExecutor | None = None  # created on first use
        # Bumped by invalidate(key), so a load racing a delete/re-import of that key is not published.
        self._versions: dict[str, int] = {}
        # Per-request adapters (an edit's steered copy): never stored, never in the host cache,
        # reachable only by their random key while the request that made them runs.
        self._ephemeral: dict[str, Adapter] = {}

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
        with self._cond:
            # Resident ones first: pinning them before any miss evicts keeps a miss from evicting an
            # adapter this very acquisition needs (and then loading it back). Owners: noted by _pin.
            keys.sort(key=lambda k: k not in self._slot_of)
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

    def _pin(self, key: str, owner: str | None = None) -> int:
        with self._cond:
            if owner is not None:
                self._note_owners({key: owner})
            while True:
                slot = self._slot_of.get(key)
                if slot is not None:
                    self._slot_of.move_to_end(key)
                    self._pins[slot] = self._pins.get(slot, 0) + 1
                    self.metrics.hits.inc()
                    return slot
                if key in self._prefetching and key not in self._prefetch_started:
                    # Still queued behind other reads on the loader thread: read it here now rather
                    # than wait for them (the loader skips it when its turn comes).
                    self._prefetching.discard(key)
                    break
                if key not in self._loading and key not in self._prefetching:
                    break
                self._cond.wait()  # another thread is reading this key: share its result
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
            slot = self._reserve_slot(owner if owner is not None else self._owner.get(key, ""))
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

    def _reserve_slot(self, tenant: str) -> int:
        """A free slot, else an unpinned one (evicted, see _slot_victim); pinned once for the caller."""
        with self._cond:
            if self._free:
                slot = self._free.pop()
            else:
                victim = self._slot_victim(tenant)
                if victim is None:
                    raise _NoFreeSlot
                slot = self._slot_of.pop(victim)
                self._adapter_in.pop(slot, None)
                self._forget_owner_if_unknown(victim)
                self.metrics.evictions.inc()
                self.metrics.resident.set(len(self._slot_of))
            self._pins[slot] = 1
            return slot

    def _slot_victim(self, tenant: str) -> str | None:
        """The resident adapter to evict, least recently used first among: the requesting tenant's
        own if taking one more slot would put it over its share (slots / tenants resident, itself
        included), else those of a tenant over its share, else any unpinned one. A tenant's burst of
        new adapters thus recycles its own slots once it holds its share, and leaves the others'."""
        held: dict[str, int] = {}
        for k in self._slot_of:
            owner = self._owner.get(k, "")
            held[owner] = held.get(owner, 0) + 1
        share = (self.bank.num_slots - 1) / len(held.keys() | {tenant})
        unpinned = [k for k, s in self._slot_of.items() if not self._pins.get(s)]  # least recently used first
        return self._fair_victim(unpinned, tenant, held.get(tenant, 0) + 1 > share, held, share)

    def _fair_victim(self, candidates: Sequence[str], tenant: str, tenant_over: bool,
                     held: Mapping[str, float], share: float) -> str | None:
        """The eviction rule of slots and host memory alike, over `candidates` (least recently used
        first): `tenant`'s own if it is (or would be) over its share, else one of a tenant holding
        more than `share`, else the least recently used."""
        if tenant_over:
            own = next((k for k in candidates if self._owner.get(k, "") == tenant), None)
            if own is not None:
                return own
        over = next((k for k in candidates if held.get(self._owner.get(k, ""), 0) > share), None)
        return over if over is not None else (candidates[0] if candidates else None)

    def _note_owners(self, owners: Owners | None) -> None:
        """Record who uses each key now (one blob imported by two tenants is theirs in turn)."""
        for key, tenant in (owners or {}).items():
            before = self._owner.get(key)
            if before == tenant:
                continue
            self._owner[key] = tenant
            size = self._host_size.get(key)
            if size is not None:  # its host-cache bytes move to the new owner's account
                self._charge(before or "", -size)
                self._charge(tenant, size)

    def _charge(self, tenant: str, size: int) -> None:
        """Add `size` (negative: remove) to the bytes `tenant` holds in the host cache."""
        left = self._tenant_bytes.get(tenant, 0) + size
        if left > 0:
            self._tenant_bytes[tenant] = left
        else:
            self._tenant_bytes.pop(tenant, None)

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
        """Keep ``key``'s parsed adapter in host memory, evicting (fairly, see _host_victim) to stay
        within the entry and byte bounds. One larger than the whole byte bound is not kept."""
        if key in self._host and self._host[key] is adapter:
            self._host.move_to_end(key)  # already kept (and charged to its owner)
            return
        size = adapter.nbytes()
        if self.host_cache_size <= 0 or (self.host_cache_bytes is not None and size > self.host_cache_bytes):
            return
        if key in self._host:  # a different copy (re-read after a delete and re-import): replace it
            self._host_size_remove(key)
        self._host[key] = adapter
        self._host_size[key] = size
        self._host_total += size
        self._charge(self._owner.get(key, ""), size)
        while len(self._host) > self.host_cache_size or (
                self.host_cache_bytes is not None and self._host_total > self.host_cache_bytes):
            self._forget_on_host(self._host_victim(keep=key))
        self._host_gauges()

    def _host_victim(self, keep: str) -> str:
        """The host-cache entry to drop (never `keep`, the one just added, unless it is alone),
        least recently used first among: those of `keep`'s tenant if it is over its share of the
        bytes (the bound / tenants present), else those of any tenant over its share, else any."""
        bound = self.host_cache_bytes if self.host_cache_bytes is not None else self._host_total
        share = bound / max(1, len(self._tenant_bytes))
        tenant = self._owner.get(keep, "")
        others = [k for k in self._host if k != keep]  # least recently used first
        if not others:
            return keep
        return self._fair_victim(others, tenant, self._tenant_bytes.get(tenant, 0) > share, self._tenant_bytes, share)

    def _forget_on_host(self, key: str) -> None:
        if key not in self._host:
            return
        self._host_size_remove(key)
        self._forget_owner_if_unknown(key)

    def _host_size_remove(self, key: str) -> None:
        """Drop `key` from the host cache and its bytes from the totals."""
        del self._host[key]
        size = self._host_size.pop(key)
        self._host_total -= size
        self._charge(self._owner.get(key, ""), -size)

    def _forget_owner_if_unknown(self, key: str) -> None:
        """A key in no slot, no host cache and no read any more: its tenant is noted again at its
        next use (so the owner map stays as large as what is kept, not as all keys ever seen)."""
        if (key not in self._slot_of and key not in self._host and key not in self._loading
                and key not in self._prefetching):
            self._owner.pop(key, None)

    def _host_gauges(self) -> None:
        self.metrics.host_cached.set(len(self._host))
        self.metrics.host_cache_bytes.set(self._host_total)

    # --------------------------------------------------------------------------------------------
    # Prefetch: reading adapters off the request path

    def prefetch_async(self, keys: Sequence[str], owners: Owners | None = None) -> None:
        """Start reading ``keys`` that are in neither a slot nor host memory into the host cache, on
        the loader thread; returns at once. A later acquire() of a key still being read waits for
        it instead of reading it again; a read that fails is forgotten (that acquire() reads it
        again and raises the error to its request)."""
        if self.host_cache_size <= 0 or self.host_cache_bytes == 0:
            return
        with self._cond:
            self._note_owners(owners)
            todo = [k for k in dict.fromkeys(keys)
                    if k not in self._slot_of and k not in self._host and k not in self._loading
                    and k not in self._prefetching and k not in self._ephemeral]
            if not todo:
                return
            self._prefetching.update(todo)
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-prefetch",
                                                      initializer=_loader_thread)
            versions = {k: self._versions.get(k, 0) for k in todo}
        for key in todo:
            try:
                future = self._prefetcher.submit(self._prefetch_one, key, versions[key])
            except RuntimeError:  # closed (or broken): the request reads it itself
                self._unmark_prefetch(key)
            else:
                # A read that never runs (cancelled at close, a broken pool) must not leave its key
                # marked: an acquire would wait for it for ever.
                future.add_done_callback(lambda f, k=key: self._unmark_prefetch(k) if f.cancelled() or f.exception() else None)

    def _unmark_prefetch(self, key: str) -> None:
        with self._cond:
            self._prefetching.discard(key)
            self._prefetch_started.discard(key)
            self._forget_owner_if_unknown(key)
            self._cond.notify_all()

    def _prefetch_one(self, key: str, version: int) -> None:
        with self._cond:
            if key not in self._prefetching:  # an acquire took it over while it was queued
                return
            self._prefetch_started.add(key)
        adapter = None
        try:
            adapter = self.bank.prepare(self.loader(key))
        except Exception as exc:  # noqa: BLE001 - the request that uses it reads it again and fails alone
            log.debug("prefetch of adapter %s failed: %s", key[:12], exc)
        finally:
            with self._cond:  # (re-entrant: _unmark_prefetch takes it again)
                if adapter is not None and version == self._versions.get(key, 0) and key not in self._slot_of:
                    self._remember_on_host(key, adapter)
                    self.metrics.prefetched.inc()
                self._unmark_prefetch(key)

    def prefetching(self) -> list[str]:
        with self._cond:
            return list(self._prefetching)

    def close(self) -> None:
        """Stop the loader thread. Reads still queued are dropped, and so are their keys' marks: an
        acquire() waiting for one reads the adapter itself."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
        with self._cond:
            self._prefetching.clear()
            self._prefetch_started.clear()
            self._cond.notify_all()

    # --------------------------------------------------------------------------------------------
    # Management

    def invalidate(self, key: str) -> None:
        """Forget ``key`` (deleted or replaced in the store): drop it from host memory and, once no
        request uses it, from its slot. Requests already holding it finish with the old weights."""
        with self._cond:
            self._versions[key] = self._versions.get(key, 0) + 1
            slot = self._slot_of.pop(key, None)
            self._forget_on_host(key)
            self._forget_owner_if_unknown(key)
            if slot is not None:
                if self._pins.get(slot):
                    self._orphans.add(slot)  # freed by the last release
                else:
                    self._adapter_in.pop(slot, None)
                    self._free.append(slot)
            self.metrics.resident.set(len(self._slot_of))
            self._host_gauges()

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

    def prefetch(self, key: str, owner: str | None = None) -> None:
        """Make ``key`` resident without keeping it pinned (e.g. right after ImportAdapter)."""
        with self.acquire([key], {key: owner} if owner is not None else None):
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


def _loader_thread() -> None:
    """The prefetch thread's torch ops (validation) on one intra-op thread: beside the model thread,
    a second multi-threaded OpenMP team would fight it for the cores (service/engine/batching.py)."""
    import torch

    torch.set_num_threads(1)
