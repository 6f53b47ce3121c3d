"""The Triton replicas behind one STEERSERVE_TRITON_URL, and which one a request goes to.

    STEERSERVE_TRITON_URL=steerserve-triton:8001          # a headless Service: one A record per pod
    STEERSERVE_TRITON_URL=10.0.0.5:8001,10.0.0.6:8001     # or a list

Every name is resolved again every `resolve_every_s` (pods come and go as the autoscaler scales
Triton); each address gets its own channel, so the gateway balances requests itself instead of
pinning them all to the one pod a ClusterIP connection lands on (gRPC keeps one long-lived HTTP/2
connection). A replica that fails its readiness probe or a call gets no new requests until it
answers ready again.

Adapter affinity: a request goes preferably to the replica that served its adapters most recently,
since that replica's adapter bank most likely still holds them (loading an adapter costs a disk read
and a bank write; a hit costs nothing). The router remembers, per replica, the last `slots` adapter
keys it routed there: the same LRU bound the replica's bank has. Affinity gives way to load: a
replica with more than `affinity_slack` requests in flight beyond the least loaded one is passed
over, so one popular adapter cannot pile every request onto one GPU.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections import OrderedDict
from contextlib import contextmanager
from typing import Awaitable, Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("steerserve.triton")

Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> ["ip:port", ...]


def address_of(host: str, port: int) -> str:
    """A gRPC target; IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_dns(host: str, port: int) -> list[str]:
    """Every address the name has now (a headless Service: one per ready pod)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = []
    for _, _, _, _, sockaddr in infos:
        address = address_of(sockaddr[0], sockaddr[1])
        if address not in addresses:
            addresses.append(address)
    return sorted(addresses)


def parse_targets(url: str) -> list[tuple[str, int]]:
    targets = []
    for part in filter(None, (p.strip() for p in url.split(","))):
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"STEERSERVE_TRITON_URL: {part!r} is not host:port")
        targets.append((host.strip("[]"), int(port)))
    if not targets:
        raise ValueError("STEERSERVE_TRITON_URL is empty")
    return targets


class Replica:
    def __init__(self, address: str, slots: int):
        self.address = address
        self.ready = True  # until a probe or a call says otherwise
        self.in_flight = 0
        self.slots = slots
        self.recent: OrderedDict[str, None] = OrderedDict()  # adapter keys routed here, oldest first
        self.gone = False  # left the Service: no new requests; its channel closes once idle
        self.client = None  # the channel, created on first use by the backend (on its event loop)
        self.probe = None  # the readiness probe's own channel (short reconnect backoff)

    def remember(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.recent[key] = None
            self.recent.move_to_end(key)
        while len(self.recent) > self.slots:
            self.recent.popitem(last=False)

    def hits(self, keys: Sequence[str]) -> int:
        return sum(key in self.recent for key in keys)

    def __repr__(self) -> str:
        return f"Replica({self.address}, ready={self.ready}, in_flight={self.in_flight})"


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.routed = Counter(
            "steerserve_triton_routed_requests",
            "Requests sent to each Triton replica; affinity: hit (the replica served all of the request's "
            "adapters lately), partial, miss, or none (no adapters).",
            ["replica", "affinity"], registry=registry,
        )
        self.replicas = Gauge("steerserve_triton_replicas", "Triton replicas the gateway sends to, by readiness.",
                              ["state"], registry=registry)


class ReplicaRouter:
    def __init__(self, url: str, slots: int, *, affinity_slack: int = 4, resolve_every_s: float = 10.0,
                 resolver: Resolver = resolve_dns, registry: CollectorRegistry | None = None, affinity: bool = True):
        """`affinity` False: least loaded, round robin among equals (the baseline bench/ compares)."""
        self.targets = parse_targets(url)
        self.affinity = affinity
        self.slots, self.affinity_slack, self.resolve_every_s = max(1, slots), affinity_slack, resolve_every_s
        self.resolver = resolver
        self.metrics = RouterMetrics(registry) if registry is not None else None
        # Before the first resolution: the targets as given (grpc resolves a name itself).
        self.replicas = {address_of(h, p): Replica(address_of(h, p), self.slots) for h, p in self.targets}
        self._turn = itertools.count()  # round robin among equals
        self._refresher: asyncio.Task | None = None
        self.on_removed: Callable[[Replica], Awaitable[None]] | None = None  # closes a gone replica's channel
        self._gauges()

    # -- membership ------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Resolves every target again; adds new addresses, drops vanished ones (a name that fails
        to resolve keeps its replicas: DNS hiccups must not empty the pool)."""
        found: list[str] = []
        for host, port in self.targets:
            try:
                found += await self.resolver(host, port)
            except OSError as exc:
                log.warning("cannot resolve Triton replicas at %s:%d: %s", host, port, exc)
                return
        if not found:
            return
        for address in found:
            if address not in self.replicas:
                log.info("Triton replica %s joined", address)
                self.replicas[address] = Replica(address, self.slots)
        for address in [a for a in self.replicas if a not in found]:
            gone = self.replicas.pop(address)
            gone.gone = True
            if self.metrics is not None:
                for affinity in ("hit", "partial", "miss", "none"):
                    try:
                        self.metrics.routed.remove(address, affinity)
                    except KeyError:
                        pass
            # A pod leaving DNS is terminating and drains what it runs (streams, training): its
            # channel stays open until the requests on it end, it just gets no new ones.
            log.info("Triton replica %s left (%d requests in flight finish on it)", address, gone.in_flight)
            if gone.in_flight == 0:
                await self._removed(gone)
        self._gauges()

    async def _removed(self, replica: Replica) -> None:
        if self.on_removed is not None:
            await self.on_removed(replica)

    def start(self) -> None:
        async def loop() -> None:
            while True:
                try:
                    await self.refresh()
                except Exception:  # noqa: BLE001 - keep the replicas we know
                    log.exception("refreshing Triton replicas failed")
                await asyncio.sleep(self.resolve_every_s)

        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(loop(), name="triton-replicas")

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None

    def set_ready(self, replica: Replica, ready: bool) -> None:
        if replica.ready != ready:
            log.info("Triton replica %s is %s", replica.address, "ready" if ready else "not ready")
        replica.ready = ready
        self._gauges()

    # -- routing ---------------------------------------------------------------------------------

    def pick(self, keys: Sequence[str] = ()) -> Replica:
        """The replica for a request using adapters `keys` (see the module doc)."""
        pool = [r for r in self.replicas.values() if r.ready] or list(self.replicas.values())
        least = min(r.in_flight for r in pool)
        turn = next(self._turn)
        n = len(pool)

        def rank(indexed: tuple[int, Replica]):
            i, r = indexed
            hits = r.hits(keys) if self.affinity and r.in_flight <= least + self.affinity_slack else 0
            return (-hits, r.in_flight, (i - turn) % n)

        _, chosen = min(enumerate(pool), key=rank)
        if self.metrics is not None:
            hits = chosen.hits(keys)
            affinity = "none" if not keys else "hit" if hits == len(keys) else "partial" if hits else "miss"
            self.metrics.routed.labels(chosen.address, affinity).inc()
        chosen.remember(keys)
        return chosen

    @contextmanager
    def using(self, replica: Replica):
        replica.in_flight += 1
        try:
            yield replica
        finally:
            replica.in_flight -= 1
            if replica.gone and replica.in_flight == 0:  # its last request ended: close its channel
                asyncio.get_running_loop().create_task(self._removed(replica))

    def _gauges(self) -> None:
        if self.metrics is not None:
            ready = sum(r.ready for r in self.replicas.values())
            self.metrics.replicas.labels("ready").set(ready)
            self.metrics.replicas.labels("not_ready").set(len(self.replicas) - ready)
