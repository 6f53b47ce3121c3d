"""Balancing across Triton replicas with adapter affinity (service/backends/triton_replicas.py).

The routing rules are checked on the router itself; then end to end, a TritonBackend pointed at two
stand-in Triton servers (real gRPC servers speaking KServe's GRPCInferenceService: ServerReady and
ModelStreamInfer for the `generate` model, answering with a tiny image) shows which replica each
request reached: requests for one adapter stay on one replica, requests for different adapters
spread, keyless requests alternate, and a replica that goes away is skipped until it is back.
(A real Triton behind the same client is exercised by tests/test_triton.py.)
"""

from __future__ import annotations

import asyncio
import json
import struct
from concurrent import futures

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service.backends.base import BackendUnavailable
from service.backends.triton import TritonBackend
from service.backends.triton_replicas import ReplicaRouter, parse_targets, resolve_dns
from service.engine.default_model import default_model_dir
from service.engine.pipeline import AdapterUse, GenerationSpec
from tests.conftest import free_port


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


async def until(predicate) -> None:
    """Returns once predicate() holds (callers bound it with asyncio.wait_for)."""
    while not predicate():
        await asyncio.sleep(0.01)


# -- the router ------------------------------------------------------------------------------------


def two(slots: int = 4, **kw) -> ReplicaRouter:
    return ReplicaRouter("10.0.0.1:8001,10.0.0.2:8001", slots, registry=CollectorRegistry(), **kw)


def test_one_adapter_stays_on_one_replica_and_different_ones_spread():
    router = two()
    first = router.pick(["k1"]).address
    assert all(router.pick(["k1"]).address == first for _ in range(5))
    # A new adapter, loads equal: round robin puts it on the other replica at its turn.
    homes = {key: router.pick([key]).address for key in ("k2", "k3", "k4")}
    assert set(homes.values()) == {"10.0.0.1:8001", "10.0.0.2:8001"}
    for key, home in homes.items():
        assert router.pick([key]).address == home
    hits = sum(router.metrics.routed.labels(r, "hit")._value.get() for r in router.replicas)
    misses = sum(router.metrics.routed.labels(r, "miss")._value.get() for r in router.replicas)
    assert (hits, misses) == (5 + 3, 1 + 3)


def test_keyless_requests_alternate():
    router = two()
    picked = [router.pick().address for _ in range(6)]
    assert picked.count("10.0.0.1:8001") == 3 and picked.count("10.0.0.2:8001") == 3


def test_affinity_gives_way_to_load():
    router = two(affinity_slack=2)
    home = router.pick(["hot"])
    other = next(r for r in router.replicas.values() if r is not home)
    home.in_flight = 2  # within the slack of the idle replica: still home
    assert router.pick(["hot"]) is home
    home.in_flight = 3  # beyond it: the other replica, which now remembers the adapter too
    assert router.pick(["hot"]) is other and other.hits(["hot"]) == 1


def test_not_ready_replicas_are_skipped_unless_none_is_ready():
    router = two()
    a, b = router.replicas.values()
    router.set_ready(a, False)
    assert {router.pick([k]).address for k in ("x", "y", "z")} == {b.address}
    router.set_ready(b, False)  # none ready: try them all rather than fail without trying
    assert {router.pick().address for _ in range(4)} == {a.address, b.address}
    assert router.metrics.replicas.labels("not_ready")._value.get() == 2


def test_affinity_memory_is_bounded_like_the_bank():
    router = ReplicaRouter("10.0.0.1:8001", slots=3, registry=CollectorRegistry())
    for key in ("a", "b", "c", "d"):
        router.pick([key])
    [replica] = router.replicas.values()
    assert list(replica.recent) == ["b", "c", "d"]


def headless_service(answers: dict, removed: list) -> ReplicaRouter:
    """A router on a Service name whose addresses are answers["now"] (None: DNS fails); the
    addresses of replicas whose channels it closes go to `removed`."""

    async def resolver(host, port):
        if answers["now"] is None:
            raise OSError("temporary failure in name resolution")
        return answers["now"]

    async def on_removed(replica):
        removed.append(replica.address)

    router = ReplicaRouter("steerserve-triton:8001", 4, resolver=resolver, registry=CollectorRegistry())
    router.on_removed = on_removed
    return router


def test_refresh_follows_the_name_and_survives_dns_failures():
    answers = {"now": ["10.0.0.1:8001", "10.0.0.2:8001"]}
    removed = []

    async def scenario():
        router = headless_service(answers, removed)
        assert list(router.replicas) == ["steerserve-triton:8001"]  # before the first resolution
        await router.refresh()
        assert sorted(router.replicas) == ["10.0.0.1:8001", "10.0.0.2:8001"]
        answers["now"] = ["10.0.0.2:8001", "10.0.0.3:8001"]  # scaled: one pod replaced
        await router.refresh()
        assert sorted(router.replicas) == ["10.0.0.2:8001", "10.0.0.3:8001"]
        answers["now"] = None  # DNS down: keep what we know
        await router.refresh()
        assert sorted(router.replicas) == ["10.0.0.2:8001", "10.0.0.3:8001"]
        return router

    router = run(scenario())
    assert removed == ["steerserve-triton:8001", "10.0.0.1:8001"]
    assert router.metrics.replicas.labels("ready")._value.get() == 2


def test_targets_and_real_dns():
    assert parse_targets("a:1, b:2") == [("a", 1), ("b", 2)]
    for bad in ("", "nohost", "a:b", ":80"):
        with pytest.raises(ValueError, match="STEERSERVE_TRITON_URL"):
            parse_targets(bad)
    assert "127.0.0.1:8001" in run(resolve_dns("localhost", 8001))


# -- end to end: TritonBackend over two stand-in Triton servers ---------------------------------------


def _bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


class StandInTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ServerReady, and `generate` streams with a 8x8 image per request; records the
    adapter keys each request carried."""

    def __init__(self):
        self.seen: list[list[str]] = []

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            inputs = {t.name: raw for t, raw in zip(request.inputs, request.raw_input_contents)}
            adapters = json.loads(inputs["ADAPTERS"][4:].decode() or "[]")
            self.seen.append([a[0] for a in adapters])
            out = service_pb2.ModelInferResponse(model_name="generate", id=request.id)
            for name, dtype, shape, raw in (
                ("IMAGES", "UINT8", [1, 8, 8, 3], np.zeros((1, 8, 8, 3), np.uint8).tobytes()),
                ("SEEDS", "INT64", [1], np.array([7], np.int64).tobytes()),
                ("TIMINGS", "BYTES", [1], _bytes_tensor([b'{"total_seconds": 0.01}'])),
                ("STEP_BATCH_SIZES", "INT32", [1], np.array([2], np.int32).tobytes()),
                ("STEP_QUEUE_US", "INT64", [1], np.array([5], np.int64).tobytes()),
            ):
                out.outputs.add(name=name, datatype=dtype, shape=shape)
                out.raw_output_contents.append(raw)
            yield service_pb2.ModelStreamInferResponse(infer_response=out)


def start_stand_in(servicer: "StandInTriton | None" = None):
    servicer, port = servicer or StandInTriton(), free_port()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, servicer, port


@pytest.fixture(scope="module")
def model_dir(model_cache):
    return default_model_dir(model_cache)


def test_backend_routes_by_adapter_across_real_grpc_replicas(model_dir):
    (s1, t1, p1), (s2, t2, p2) = start_stand_in(), start_stand_in()
    metrics = type("Metrics", (), {"registry": CollectorRegistry()})()
    keys = ("aa", "bb", "cc", "dd")

    def spec(*adapters):
        return GenerationSpec(prompt="a photo", steps=2, seed=1, adapters=tuple(AdapterUse(k) for k in adapters))

    async def scenario():
        backend = TritonBackend(f"127.0.0.1:{p1},127.0.0.1:{p2}", model_dir, metrics=metrics)
        try:
            for _ in range(3):
                for key in keys:
                    result = await backend.generate(spec(key), deadline=None)
                    assert len(result.images) == 1 and result.seeds == [7]
            for _ in range(4):
                await backend.generate(spec(), deadline=None)
            before = (list(t1.seen), list(t2.seen))
            # Replica 1 goes away: the request that meets it fails UNAVAILABLE and marks it not
            # ready; the next ones, its adapters' included, go to replica 2.
            s1.stop(0).wait()
            outcomes = []
            for key in keys:
                try:
                    await backend.generate(spec(key), deadline=None)
                    outcomes.append("ok")
                except BackendUnavailable:
                    outcomes.append("unavailable")
            probed = await backend._probe()
            return before, outcomes, probed, backend.router
        finally:
            await backend.close()

    try:
        (seen1, seen2), outcomes, probed, router = run(scenario())
    finally:
        s1.stop(0)
        s2.stop(0)
    homes = {}
    for replica, seen in ((1, seen1), (2, seen2)):
        for used in seen:
            for key in used:
                homes.setdefault(key, []).append(replica)
    # Each adapter's three requests reached one replica; the four adapters spread two and two.
    assert all(len(homes[k]) == 3 and len(set(homes[k])) == 1 for k in keys), homes
    assert sorted(homes[k][0] for k in keys) == [1, 1, 2, 2]
    # Keyless requests alternate.
    assert sum(not used for used in seen1) == 2 and sum(not used for used in seen2) == 2
    # After the outage: one failure (the request that met it), then replica 2 serves everything.
    # (Round robin from replica 1: aa and cc live there, bb and dd on replica 2.)
    assert [homes[k][0] for k in keys] == [1, 2, 1, 2]
    assert outcomes == ["unavailable", "ok", "ok", "ok"]
    assert len(t1.seen) == len(seen1)
    assert probed is True  # replica 2 is ready: the backend is up
    assert router.replicas[f"127.0.0.1:{p1}"].ready is False and router.replicas[f"127.0.0.1:{p2}"].ready
    routed = router.metrics.routed
    assert routed.labels(f"127.0.0.1:{p2}", "hit")._value.get() >= 4


def test_a_replica_leaving_dns_drains_before_its_channel_closes():
    answers = {"now": ["10.0.0.1:8001", "10.0.0.2:8001"]}
    closed = []

    async def scenario():
        router = headless_service(answers, closed)
        await router.refresh()
        leaving = router.replicas["10.0.0.1:8001"]
        with router.using(leaving):  # a long stream (a training job) runs on it
            answers["now"] = ["10.0.0.2:8001"]  # its pod is terminating
            await router.refresh()
            assert all(router.pick([k]).address == "10.0.0.2:8001" for k in ("a", "b", "c"))
            # The stream still runs on its channel: not closed, and nothing scheduled that would
            # close it (no task but this one).
            assert "10.0.0.1:8001" not in closed and asyncio.all_tasks() == {asyncio.current_task()}
        # The close scheduled when the stream ended (a task of its own): polled, 5 s at most.
        await asyncio.wait_for(until(lambda: "10.0.0.1:8001" in closed), 5)
        assert closed == ["steerserve-triton:8001", "10.0.0.1:8001"]

    run(scenario())
