"""Residency: LRU slots, pinning, refused files, metrics, and threads racing for slots."""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from safetensors.torch import save as save_bytes
from torch import nn

from service.adapters import (
    Adapter,
    AdapterBank,
    AdapterBankFull,
    AdapterFormatError,
    AdapterManager,
    AdapterNotFoundError,
    BankedAdapters,
    LoraModule,
    parse_adapter,
    serialize_adapter,
)

DIM = 8
MODULES = [f"unet.blocks.{i}.attn{j}.{p}" for i in range(2) for j in (1, 2) for p in ("to_q", "to_out.0")]


class ToyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(DIM, DIM)
        self.to_out = nn.ModuleList([nn.Linear(DIM, DIM), nn.Dropout(0.0)])


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1, self.attn2 = ToyAttention(), ToyAttention()


class ToyUNet(nn.Module):
    """Just enough of a UNet's module names for the bank: blocks.N.attn{1,2}.{to_q,to_out.0}."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ToyBlock(), ToyBlock()])


def make_adapter(key: str, rank: int = 2) -> Adapter:
    g = torch.Generator().manual_seed(sum(map(ord, key)))
    return Adapter(lora={
        m: LoraModule(torch.randn(rank, DIM, generator=g), torch.randn(DIM, rank, generator=g), alpha=float(rank))
        for m in MODULES
    })


class Store:
    """A loader over serialized files, counting reads; optionally slow to widen race windows, and
    able to hold a key's read until the test lets it go (`hold`), to order a race exactly."""

    def __init__(self, keys, delay: float = 0.0):
        self.files = {k: serialize_adapter(make_adapter(k)) for k in keys}
        self.delay = delay
        self.reads: dict[str, int] = {}
        self.held: dict[str, tuple[threading.Event, threading.Event]] = {}  # key -> (reading, let go)
        self._lock = threading.Lock()

    def hold(self, key: str) -> tuple[threading.Event, threading.Event]:
        """Reads of `key` block until the returned `go` is set; `reading` is set once one has started."""
        reading, go = self.held[key] = (threading.Event(), threading.Event())
        return reading, go

    def __call__(self, key: str) -> Adapter:
        with self._lock:
            self.reads[key] = self.reads.get(key, 0) + 1
            data, held = self.files.get(key), self.held.get(key)  # the file as it is when the read starts
        if held is not None:
            reading, go = held
            reading.set()
            assert go.wait(10), f"the test never let the read of {key!r} go"
        if self.delay:
            time.sleep(self.delay)
        if data is None:
            raise AdapterNotFoundError(f"no adapter {key!r}")
        return parse_adapter(data)


def make_manager(keys="abcdef", num_slots=3, delay=0.0, **kw):
    bank = AdapterBank(ToyUNet(), num_slots=num_slots, max_rank=4)
    store = Store(keys, delay)
    return AdapterManager(bank, store, registry=CollectorRegistry(), **kw), store


def slot_holds(bank: AdapterBank, slot: int, key: str) -> bool:
    expected = make_adapter(key)
    return all(
        torch.equal(bank.layers[m].lora_A[slot, : lora.rank], lora.down)
        and torch.allclose(bank.layers[m].lora_Bt[slot, : lora.rank], (lora.up * lora.scale).T)
        for m, lora in expected.lora.items()
    )


def counts(manager: AdapterManager) -> dict[str, float]:
    m = manager.metrics
    return dict(
        hits=m.hits._value.get(),
        store=m.misses.labels(source="store")._value.get(),
        host=m.misses.labels(source="host")._value.get(),
        evictions=m.evictions._value.get(),
        resident=m.resident._value.get(),
    )


def test_hits_misses_and_lru_eviction():
    manager, store = make_manager(num_slots=3)  # 2 adapter slots
    for key in ("a", "b", "a"):
        with manager.acquire([key]) as slots:
            assert slot_holds(manager.bank, slots[key], key)
    assert list(manager.resident()) == ["b", "a"]  # a used last
    with manager.acquire(["c"]):  # evicts b, the least recently used
        pass
    assert list(manager.resident()) == ["a", "c"]
    assert counts(manager) == dict(hits=1, store=3, host=0, evictions=1, resident=2)
    with manager.acquire(["b"]) as slots:  # back from host memory, not the store
        assert slot_holds(manager.bank, slots["b"], "b")
    assert store.reads == {"a": 1, "b": 1, "c": 1}
    assert counts(manager)["host"] == 1 and manager.metrics.load_seconds._sum.get() > 0


def test_host_cache_is_bounded_lru():
    manager, store = make_manager(num_slots=2, host_cache_size=2)
    for key in "abc":
        manager.prefetch(key)
    assert manager.host_cached() == ["b", "c"]
    manager.prefetch("a")
    assert store.reads["a"] == 2


def test_pinned_slots_are_never_evicted_and_a_full_bank_raises():
    manager, _ = make_manager(num_slots=3)
    with manager.acquire(["a", "b"]) as held:
        with pytest.raises(AdapterBankFull, match="all 2 adapter slots are in use"):
            with manager.acquire(["c"]):
                pass
        assert manager.resident() == held and manager.pinned() == {held["a"]: 1, held["b"]: 1}
        assert slot_holds(manager.bank, held["a"], "a") and slot_holds(manager.bank, held["b"], "b")
    with manager.acquire(["c"]) as slots:
        assert slot_holds(manager.bank, slots["c"], "c")
    assert manager.pinned() == {}


def test_a_request_needing_more_adapters_than_slots_fails_at_once():
    manager, store = make_manager(num_slots=3, acquire_timeout_s=30.0)
    t0 = time.monotonic()
    with pytest.raises(AdapterBankFull, match="3 adapters in one request, but the bank has 2 slots"):
        with manager.acquire(["a", "b", "c"]):
            pass
    assert time.monotonic() - t0 < 1 and store.reads == {}


def test_acquire_waits_for_a_release_within_its_timeout():
    manager, _ = make_manager(num_slots=2, acquire_timeout_s=30.0)
    holding, release, acquired = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def holder():
        with manager.acquire(["a"]):
            holding.set()
            release.wait(30)

    def waiter():
        with manager.acquire(["b"]) as slots:
            seen["b"] = slot_holds(manager.bank, slots["b"], "b")
            acquired.set()

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    threads[0].start()
    assert holding.wait(10)
    threads[1].start()
    assert not acquired.wait(0.3)  # the only slot is pinned: the waiter waits, it does not fail
    release.set()
    assert acquired.wait(10) and seen == {"b": True}
    for t in threads:
        t.join()


def test_acquire_is_all_or_nothing():
    manager, _ = make_manager(num_slots=3)
    with pytest.raises(AdapterNotFoundError, match="no adapter 'zz'"):
        with manager.acquire(["a", "zz"]):
            pass
    assert manager.pinned() == {} and list(manager.resident()) == ["a"]


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda data: data[: len(data) // 2], "not a readable safetensors"),
        (lambda data: data[:8] + b"X" + data[9:], "not a readable safetensors"),  # garbled header
        (lambda data: save_bytes({f"{MODULES[0]}.lora_A.weight": torch.randn(2, DIM + 1),
                                  f"{MODULES[0]}.lora_B.weight": torch.randn(DIM, 2)}),
         r"down/A has shape \(2, 9\), expected \[2, 8\]"),
        (lambda data: save_bytes({f"{MODULES[0]}.lora_A.weight": torch.randn(6, DIM),
                                  f"{MODULES[0]}.lora_B.weight": torch.randn(DIM, 6)}),
         "rank 6 exceeds the bank's maximum rank 4"),
        (lambda data: save_bytes({f"{MODULES[0]}.lora_A.weight": torch.randn(2, DIM),
                                  f"{MODULES[0]}.lora_B.weight": torch.randn(DIM, 2),
                                  f"{MODULES[1]}.lora_A.weight": torch.randn(2, DIM),
                                  f"{MODULES[1]}.lora_B.weight": torch.full((DIM, 2), float("nan"))}),
         "NaN or Inf"),
    ],
)
def test_a_refused_file_leaves_every_slot_as_it_was(corrupt, match):
    manager, store = make_manager(num_slots=2)  # one slot, holding a, must be evicted for "bad"
    manager.prefetch("a")
    store.files["bad"] = corrupt(store.files["a"])
    with pytest.raises(AdapterFormatError, match=match):
        with manager.acquire(["bad"]):
            pass
    # Validation ran before eviction: a is still resident, intact, and no slot leaked.
    assert manager.resident() == {"a": 1} and slot_holds(manager.bank, 1, "a")
    assert manager.pinned() == {} and counts(manager)["evictions"] == 0
    with manager.acquire(["b"]) as slots:
        assert slot_holds(manager.bank, slots["b"], "b")


def test_concurrent_misses_of_one_adapter_load_it_once():
    manager, store = make_manager(num_slots=3, delay=0.2)
    barrier = threading.Barrier(4)
    seen = []

    def request():
        barrier.wait()
        with manager.acquire(["a"]) as slots:
            seen.append(slots["a"])

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.reads == {"a": 1} and len(set(seen)) == 1
    assert counts(manager)["hits"] == 3 and counts(manager)["store"] == 1


def test_requests_racing_for_slots_always_see_their_own_weights():
    """8 threads, 6 adapters, 3 slots: every pinned slot holds its adapter while in use."""
    manager, store = make_manager(keys="abcdef", num_slots=4, delay=0.002, acquire_timeout_s=10.0)
    errors: list[BaseException] = []

    def request(seed: int):
        rng = random.Random(seed)
        try:
            for _ in range(30):
                keys = rng.sample("abcdef", rng.choice((1, 1, 2)))
                with manager.acquire(keys) as slots:
                    assert len(set(slots.values())) == len(keys)
                    time.sleep(rng.random() * 0.002)
                    for key, slot in slots.items():
                        assert slot_holds(manager.bank, slot, key), (key, slot)
        except BaseException as e:  # surfaced below with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert manager.pinned() == {} and len(manager.resident()) == 3
    for key, slot in manager.resident().items():
        assert slot_holds(manager.bank, slot, key)
    c = counts(manager)
    assert c["store"] + c["host"] - c["evictions"] == 3  # every load either still resident or evicted
    # Host memory keeps all six parsed adapters: each was read from the store exactly once.
    assert store.reads == {k: 1 for k in store.reads} and c["store"] <= 6


def test_invalidate_keeps_in_flight_requests_on_the_old_weights():
    manager, store = make_manager(num_slots=3)
    with manager.acquire(["a"]) as old:
        store.files["a"] = serialize_adapter(make_adapter("a-v2"))
        manager.invalidate("a")
        assert slot_holds(manager.bank, old["a"], "a")  # still serving the in-flight request
        with manager.acquire(["a"]) as new:
            assert new["a"] != old["a"] and slot_holds(manager.bank, new["a"], "a-v2")
    assert manager.resident() == {"a": new["a"]} and manager.pinned() == {}
    manager.prefetch("b")  # the orphaned slot was freed for reuse
    assert sorted(manager.resident().values()) == [1, 2]


def test_metrics_are_exported_under_their_names():
    registry = CollectorRegistry()
    manager = AdapterManager(AdapterBank(ToyUNet(), num_slots=2, max_rank=4), Store("a"), registry=registry)
    manager.prefetch("a")
    text = generate_latest(registry).decode()
    for name in (
        "steerserve_adapter_cache_hits_total",
        'steerserve_adapter_cache_misses_total{source="store"} 1.0',
        "steerserve_adapter_evictions_total",
        "steerserve_adapter_load_seconds_bucket",
        "steerserve_adapter_resident 1.0",
    ):
        assert name in text


@dataclass(frozen=True)
class Use:
    key: str
    weight: float = 1.0


def test_engine_hook_routes_rows_to_pinned_slots():
    manager, _ = make_manager(num_slots=4)
    hook = BankedAdapters(manager.bank, manager)
    rows = [(Use("a"),), (), (Use("b", 0.5), Use("a")), (Use("a"),)]
    with hook.activate(rows):
        slots = manager.resident()
        assert manager.pinned() == {slots["a"]: 1, slots["b"]: 1}
        state = manager.bank.state
        assert state.slot_ids[:4, :2].tolist() == [[slots["a"], 0], [0, 0], [slots["b"], slots["a"]], [slots["a"], 0]]
        assert state.weights[:4, :2].tolist() == [[1, 0], [0, 0], [0.5, 1], [1, 0]]
    assert manager.pinned() == {} and not manager.bank.state.slot_ids.any()


# -- thousands of adapters: bytes, fairness, loading off the request path (bench/scale.py) ------------


def test_host_cache_is_bounded_by_bytes():
    size = make_adapter("a").nbytes()
    manager, store = make_manager(num_slots=2, host_cache_size=100, host_cache_bytes=int(2.5 * size))
    for key in "abcd":
        manager.prefetch(key)
    assert manager.host_cached() == ["c", "d"]  # two fit in 2.5 adapters' bytes
    assert manager.metrics.host_cache_bytes._value.get() == 2 * size
    manager, _ = make_manager(num_slots=2, host_cache_bytes=size - 1)  # larger than the whole bound: not kept
    manager.prefetch("a")
    assert manager.host_cached() == [] and manager.metrics.host_cache_bytes._value.get() == 0


def test_one_tenants_burst_recycles_its_own_host_cache_entries():
    size = make_adapter("a").nbytes()
    manager, store = make_manager(keys="abcdefgh", num_slots=2, host_cache_bytes=4 * size)
    manager.prefetch("a", owner="bob")
    manager.prefetch("b", owner="bob")
    for key in "cdefgh":  # alice's burst: six new adapters
        manager.prefetch(key, owner="alice")
    cached = manager.host_cached()
    assert "a" in cached and "b" in cached  # bob's two (his share: 2 of 4) survived
    assert len(cached) == 4 and cached[-1] == "h"
    # Without owners (plain LRU) the burst flushes them.
    manager, _ = make_manager(keys="abcdefgh", num_slots=2, host_cache_bytes=4 * size)
    for key in "abcdefgh":
        manager.prefetch(key)
    assert manager.host_cached() == list("efgh")


def test_one_tenants_burst_recycles_its_own_slots():
    manager, store = make_manager(keys="abcdefgh", num_slots=5, host_cache_size=0)  # 4 adapter slots
    manager.prefetch("a", owner="bob")
    manager.prefetch("b", owner="bob")
    for key in "cdefgh":
        manager.prefetch(key, owner="alice")
    resident = manager.resident()
    assert {"a", "b"} <= set(resident) and len(resident) == 4
    assert counts(manager)["evictions"] == 4  # alice's own, each time


def test_an_acquisition_pins_its_resident_adapters_before_loading_its_misses():
    manager, store = make_manager(num_slots=3)  # 2 adapter slots
    manager.prefetch("a")
    manager.prefetch("b")  # resident: a (least recently used), b
    slot_a = manager.resident()["a"]
    with manager.acquire(["c", "a"]) as slots:  # c must evict b, not a (which this call needs)
        assert slots["a"] == slot_a and slot_holds(manager.bank, slots["c"], "c")
    assert counts(manager)["evictions"] == 1 and store.reads == {"a": 1, "b": 1, "c": 1}


def test_prefetch_reads_off_the_callers_thread_and_the_use_only_copies():
    manager, store = make_manager(num_slots=3)
    reading, go = store.hold("a")
    manager.prefetch_async(["a", "b"], {"a": "bob"})  # returns with the read of "a" held: not this thread's
    assert reading.wait(10) and sorted(manager.prefetching()) == ["a", "b"]
    got = {}

    def use():
        with manager.acquire(["a"]) as slots:  # waits for the read under way instead of reading again
            got["a"] = slot_holds(manager.bank, slots["a"], "a")

    user = threading.Thread(target=use)
    user.start()
    go.set()
    user.join(10)
    assert got == {"a": True}
    deadline = time.monotonic() + 5
    while manager.prefetching() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.reads == {"a": 1, "b": 1}
    assert counts(manager)["host"] == 1 and counts(manager)["store"] == 0  # "a" came from host memory
    assert manager.metrics.prefetched._value.get() == 2
    manager.prefetch_async(["a", "b"])  # at hand: nothing read
    assert store.reads == {"a": 1, "b": 1}
    manager.close()


def test_a_failed_prefetch_leaves_the_error_to_the_request():
    manager, store = make_manager(keys="ab", num_slots=3)
    manager.prefetch_async(["missing"])
    deadline = time.monotonic() + 5
    while manager.prefetching() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(AdapterNotFoundError):
        with manager.acquire(["missing"]):
            pass
    assert store.reads["missing"] == 2 and manager.host_cached() == []


def wait_for_loader(manager: AdapterManager, marker: str = "f") -> None:
    """Return once the loader thread has done everything queued before now: it reads in order, so
    once a read of `marker` queued now lands in host memory, the earlier ones are done."""
    manager.prefetch_async([marker])
    deadline = time.monotonic() + 10
    while marker not in manager.host_cached():
        assert time.monotonic() < deadline, "the loader thread never got to the marker"
        time.sleep(0.01)


def test_a_prefetch_racing_a_delete_is_not_cached():
    manager, store = make_manager(num_slots=3)
    reading, go = store.hold("a")
    manager.prefetch_async(["a"])
    assert reading.wait(10)
    manager.invalidate("a")  # deleted while being read
    go.set()
    wait_for_loader(manager)
    assert manager.host_cached() == ["f"] and store.reads["a"] == 1


def test_an_acquire_reads_a_still_queued_prefetch_itself():
    """The loader thread reads one adapter at a time: an acquire of a key still waiting in its queue
    reads it at once instead of waiting behind the others; the loader then skips it."""
    manager, store = make_manager(num_slots=3)
    reading, go = store.hold("a")
    manager.prefetch_async(["a", "b"])
    assert reading.wait(10)  # "a" is being read (and held there), "b" waits in the queue
    with manager.acquire(["b"]) as slots:  # returns while a's read is still held: it read b itself
        assert slot_holds(manager.bank, slots["b"], "b")
    assert not go.is_set() and manager.prefetching() == ["a"]
    go.set()
    wait_for_loader(manager)  # the loader skipped "b" when its turn came
    assert store.reads == {"a": 1, "b": 1, "f": 1}
    manager.close()


def test_closing_the_loader_never_strands_an_acquire():
    manager, store = make_manager(keys="abcdef", num_slots=3)
    reading, go = store.hold("a")
    manager.prefetch_async(list("abcdef"))
    assert reading.wait(10)  # "a" held on the loader thread, the others queued behind it
    manager.close()  # queued reads dropped with their marks
    with manager.acquire(["f"]) as slots:
        assert slot_holds(manager.bank, slots["f"], "f")
    manager.prefetch_async(["e"])  # after close: nothing queued, nothing marked
    assert manager.prefetching() == []
    go.set()


def test_the_owner_map_keeps_only_what_is_kept():
    manager, store = make_manager(keys="abcdefgh", num_slots=3, host_cache_size=2)
    for key in "abcdefgh":
        manager.prefetch(key, owner=f"t-{key}")
    assert set(manager.owners()) == set(manager.resident()) | set(manager.host_cached())


# -- what the manager remembers: nothing of a key it no longer keeps (issue 34) ------------------------


def strings_held(manager: AdapterManager) -> set[str]:
    """Every string the manager's own state refers to (its bank, loader, metrics and lock aside),
    through its containers and state objects: what a forgotten key must not leave behind."""
    found: set[str] = set()
    seen: set[int] = set()

    def walk(obj) -> None:
        if isinstance(obj, str):
            found.add(obj)
            return
        if id(obj) in seen or isinstance(obj, (Adapter, torch.Tensor)):
            return
        seen.add(id(obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(k)
                walk(v)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                walk(v)
        elif type(obj).__module__ == AdapterManager.__module__ and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v)

    for name, value in vars(manager).items():
        if name not in ("bank", "loader", "metrics", "per_request", "_cond", "_prefetcher"):
            walk(value)
    return found


def test_invalidated_keys_leave_nothing_behind():
    """DeleteAdapter invalidates keys, loaded or not: the manager must not keep a record (a version)
    per key it was ever told about."""
    manager, store = make_manager(keys="ab", num_slots=3)
    for i in range(20):
        manager.invalidate(f"gone-never-loaded-{i}")
        store.files[f"gone-{i}"] = store.files["a"]
        manager.prefetch(f"gone-{i}", owner="gone-tenant")
        manager.invalidate(f"gone-{i}")
    with manager.ephemeral(make_adapter("c"), prefix="gone-request") as key:
        with manager.acquire([key]):
            pass
    assert not {s for s in strings_held(manager) if s.startswith("gone")}
    assert manager.resident() == {} and manager.host_cached() == [] and manager.pinned() == {}


def test_a_load_racing_an_invalidation_serves_its_request_but_publishes_nothing():
    """What versions were for: a read of the old file that ends after a delete + re-import must
    serve the request that asked for it, but never reach a later request (slot or host memory)."""
    manager, store = make_manager(keys="a", num_slots=3)
    reading, go = store.hold("a")
    inside, leave = threading.Event(), threading.Event()
    got = {}

    def request():
        with manager.acquire(["a"]) as slots:
            got["slot"], got["old"] = slots["a"], slot_holds(manager.bank, slots["a"], "a")
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=request)
    t.start()
    assert reading.wait(10)
    store.files["a"] = serialize_adapter(make_adapter("a-v2"))
    manager.invalidate("a")  # deleted and re-imported while its old file is being read
    del store.held["a"]
    go.set()
    assert inside.wait(10) and got["old"]  # the request got what it asked for...
    assert manager.resident() == {} and manager.host_cached() == []  # ...and nobody else will
    with manager.acquire(["a"]) as slots:
        assert slots["a"] != got["slot"] and slot_holds(manager.bank, slots["a"], "a-v2")
    leave.set()
    t.join(10)
    assert manager.pinned() == {} and list(manager.resident()) == ["a"] and store.reads["a"] == 2
    manager.invalidate("a")
    assert "a" not in strings_held(manager)


def test_a_failed_load_forgets_its_owner():
    manager, store = make_manager(keys="a", num_slots=3)
    store.files["gone-bad"] = store.files["a"][:40]
    for key in ("gone-missing", "gone-bad"):
        with pytest.raises((AdapterNotFoundError, AdapterFormatError)):
            with manager.acquire([key], {key: "gone-tenant"}):
                pass
    manager.prefetch_async(["gone-async"], {"gone-async": "gone-tenant"})  # a read that fails on the loader
    wait_for_loader(manager, marker="a")
    assert not {s for s in strings_held(manager) if s.startswith("gone")}
    assert manager.owners() == {"a": ""}


# -- a per-request adapter (DreamSteerer's steered copy on Triton) leaves when its request ends ----------


def test_a_request_adapter_leaves_slots_and_host_memory_when_its_request_ends(tmp_path):
    """On Triton the edit model writes the steered copy to the request-adapter folder and the `unet`
    and `text_encoder` instances load it by key like a stored adapter; the edit removes the file when
    it ends. Their managers (through blob_loader's per_request) drop it at their next acquisition,
    instead of keeping it in a slot and host memory until evicted."""
    from service.adapters.loading import blob_loader, request_adapter

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "stored.safetensors").write_bytes(serialize_adapter(make_adapter("stored")))
    folder = tmp_path / "request"
    manager = AdapterManager(AdapterBank(ToyUNet(), num_slots=3, max_rank=4), blob_loader(tmp_path, folder),
                             registry=CollectorRegistry())
    with request_adapter(make_adapter("steered"), folder) as key:
        for _ in range(2):  # the edit's steps: the copy stays at hand while its request runs
            with manager.acquire([key, "stored"]) as slots:
                assert slot_holds(manager.bank, slots[key], "steered")
        assert key in manager.resident() and key in manager.host_cached()
    with manager.acquire(["stored"]):  # the next call after the edit ended
        pass
    assert list(manager.resident()) == ["stored"] and manager.host_cached() == ["stored"]
    assert key not in strings_held(manager) and manager.pinned() == {}

    # A copy still pinned when its request ends (a cancelled edit's call in flight) keeps its
    # weights for that call and leaves with its last release.
    with contextlib.ExitStack() as in_flight:
        with request_adapter(make_adapter("steered-2"), folder) as key:
            slot = in_flight.enter_context(manager.acquire([key]))[key]
        with manager.acquire(["stored"]):
            assert key not in manager.resident() and slot_holds(manager.bank, slot, "steered-2")
        assert manager.pinned() == {slot: 1}
    assert manager.pinned() == {} and list(manager.resident()) == ["stored"]


# -- eviction costs what it costs whatever the host cache holds (issue 34) -------------------------------


def manager_lines(fn) -> int:
    """Lines of manager.py that `fn()` runs on this thread: the work it does, whatever the machine's speed."""
    path = AdapterManager.__init__.__code__.co_filename
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == path else None

    sys.settrace(calls)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def test_a_host_cache_eviction_does_not_scan_the_cache():
    """Evicting from a host cache of 1,500 adapters runs as many lines of the manager as from one of
    150, by each step of the fair rule: a tenant over its share recycles its own, a tenant under its
    share takes from those over theirs, and without owners plain LRU."""
    tiny = Adapter(lora={MODULES[0]: LoraModule(torch.ones(1, DIM), torch.ones(DIM, 1), alpha=1.0)})

    def evictions(n: int) -> list[int]:
        def manager() -> AdapterManager:
            bank = AdapterBank(ToyUNet(), num_slots=2, max_rank=4)
            return AdapterManager(bank, lambda key: tiny, host_cache_size=n, registry=CollectorRegistry())

        tenants, anonymous = manager(), manager()
        for i in range(n):
            tenants.prefetch(f"k{i}", owner=f"t{i % 4}")
            anonymous.prefetch(f"k{i}")
        assert len(tenants.host_cached()) == n
        work = [manager_lines(lambda: tenants.prefetch("own", owner="t0")),  # t0 goes over its share
                manager_lines(lambda: tenants.prefetch("new", owner="t-new")),  # under its share
                manager_lines(lambda: anonymous.prefetch("any"))]
        assert "k0" not in tenants.host_cached() and "k0" not in anonymous.host_cached()
        assert len(tenants.host_cached()) == n
        return work

    small, large = evictions(150), evictions(1500)
    assert all(big <= 1.2 * little + 10 for little, big in zip(small, large)), (small, large)
