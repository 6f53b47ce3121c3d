"""Residency: LRU slots, pinning, refused files, metrics, and threads racing for slots."""

from __future__ import annotations

import random
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
    """A loader over serialized files, counting reads; optionally slow to widen race windows."""

    def __init__(self, keys, delay: float = 0.0):
        self.files = {k: serialize_adapter(make_adapter(k)) for k in keys}
        self.delay = delay
        self.reads: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> Adapter:
        with self._lock:
            self.reads[key] = self.reads.get(key, 0) + 1
        if self.delay:
            time.sleep(self.delay)
        if key not in self.files:
            raise AdapterNotFoundError(f"no adapter {key!r}")
        return parse_adapter(self.files[key])


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
    manager, _ = make_manager(num_slots=2, acquire_timeout_s=5.0)
    release = threading.Event()

    def holder():
        with manager.acquire(["a"]):
            release.wait()

    t = threading.Thread(target=holder)
    t.start()
    while not manager.pinned():
        time.sleep(0.01)
    threading.Timer(0.2, release.set).start()
    t0 = time.monotonic()
    with manager.acquire(["b"]) as slots:
        assert slot_holds(manager.bank, slots["b"], "b")
    assert 0.15 < time.monotonic() - t0 < 4
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
    manager, store = make_manager(num_slots=3, delay=0.2)
    t0 = time.perf_counter()
    manager.prefetch_async(["a", "b"], {"a": "bob"})
    assert time.perf_counter() - t0 < 0.1  # returned at once; the reads run on the loader thread
    with manager.acquire(["a"]) as slots:  # waits for the read under way instead of reading again
        assert slot_holds(manager.bank, slots["a"], "a")
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


def test_a_prefetch_racing_a_delete_is_not_cached():
    manager, store = make_manager(num_slots=3, delay=0.2)
    manager.prefetch_async(["a"])
    manager.invalidate("a")  # deleted while being read
    deadline = time.monotonic() + 5
    while manager.prefetching() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.host_cached() == []


def test_an_acquire_reads_a_still_queued_prefetch_itself():
    """The loader thread reads one adapter at a time: an acquire of a key still waiting in its queue
    reads it at once instead of waiting behind the others; the loader then skips it."""
    manager, store = make_manager(num_slots=3, delay=0.3)
    manager.prefetch_async(["a", "b"])
    time.sleep(0.05)  # "a" is being read, "b" waits in the queue
    t0 = time.perf_counter()
    with manager.acquire(["b"]) as slots:
        assert slot_holds(manager.bank, slots["b"], "b")
    assert time.perf_counter() - t0 < 0.5  # its own read (0.3 s), not a's and then its own
    deadline = time.monotonic() + 5
    while manager.prefetching() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert store.reads == {"a": 1, "b": 1}
    manager.close()


def test_closing_the_loader_never_strands_an_acquire():
    manager, store = make_manager(keys="abcdef", num_slots=3, delay=0.2)
    manager.prefetch_async(list("abcdef"))
    manager.close()  # queued reads dropped with their marks
    with manager.acquire(["f"]) as slots:
        assert slot_holds(manager.bank, slots["f"], "f")
    manager.prefetch_async(["e"])  # after close: nothing queued, nothing marked
    assert manager.prefetching() == []


def test_the_owner_map_keeps_only_what_is_kept():
    manager, store = make_manager(keys="abcdefgh", num_slots=3, host_cache_size=2)
    for key in "abcdefgh":
        manager.prefetch(key, owner=f"t-{key}")
    assert set(manager._owner) == set(manager.resident()) | set(manager.host_cached())
