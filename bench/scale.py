"""Thousands of users' adapters on one replica: 2,000 adapters of 20 tenants, Zipf traffic, 32 clients.

    python -m bench.scale [--adapters 2000] [--tenants 20] [--clients 32] [--requests 256] [--steps 20]
                          [--zipf 1.1] [--systems inprocess,triton] [--set STEERSERVE_X=V ...] [--out bench/results]

Adapters (made once, kept in var/bench-cache/scale/adapters): real files from the trainers
(DreamBooth-LoRA ranks 4 and 8, Custom Diffusion, Textual Inversion: service.personalize.train, a few
steps on the embedded model) and from diffusers + peft (`save_lora_weights`, ranks 4, 8 and 16:
bench/reference_adapters.py), each template turned into `--adapters / templates` distinct files by
scaling every tensor by a seeded random factor near 1 (same format, same keys and metadata, different
bytes: the store and the bank see `--adapters` distinct adapters). Adapter i belongs to tenant
i mod `--tenants` and is imported through ImportAdapter (kept between runs in the data folder).

Per system (a `steerserve serve` process, in-process or embedded Triton, default settings but for
`--set`), two timed loads of `--requests` requests from `--clients` concurrent clients, each
client sending back to back:
- one adapter: every request uses the most popular adapter (the best case: one bank slot);
- zipf: request adapters drawn from a Zipf law (P(rank k) ~ 1/k^s, s = `--zipf`) over all adapters,
  ranks shuffled with a fixed seed (popular adapters of every tenant, method and rank), each request
  sent as the adapter's owner tenant. The working set (distinct adapters a run uses) is far larger
  than the bank. A warm-up of `--warmup` Zipf requests (uncounted) comes first: the figures are the
  steady state, not the cold start.
images/s = timed requests / (last answer - barrier). Bank hit rate, host-cache hit rate (of the
bank's misses, those served by the parsed copy in host memory), loads/s and evictions come from the
server's own counters (in-process: the gateway's /metrics; Triton: the generate instance's series on
Triton's /metrics) read before and after the Zipf load; memory is the resident set of the server's
whole process group (gateway, Triton, its model stubs) after the load.

Also measured (`--registry 100000`): the adapter registry's lookup the gateway does for every
adapter a request names (AdapterStore.get by tenant and id, SQLite) with 1,000, 10,000 and 100,000
adapters registered.

Writes <out>/scale.{json,md}. Server logs: var/bench-cache/scale/logs/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from itertools import accumulate
from pathlib import Path

from bench.common import ROOT, serve_process, write_results
from bench.race import machine, percentile

CACHE = ROOT / "var" / "bench-cache" / "scale"
SYSTEMS = ("inprocess", "triton")
PROMPTS = ("a photo of a dog", "a red car on a street", "a bowl of fruit", "a house by a lake")
GOAL_RATIO = 0.8  # Zipf images/s over one-adapter images/s


# -- adapters ---------------------------------------------------------------------------------------


def _templates(model_dir: Path) -> list[dict]:
    """Real adapter files: the trainers' output and diffusers + peft's, as bytes with a label."""
    from PIL import Image

    from bench.reference_adapters import write_reference_lora
    from service.adapters import serialize_adapter
    from service.engine.pipeline import Engine
    from service.personalize import (CUSTOM_DIFFUSION, DREAMBOOTH_LORA, TEXTUAL_INVERSION, FrozenBase, TrainingSpec,
                                     defaults, learns_token, train)
    from service.research.world.heldout import CONCEPTS

    out = []
    folder = CACHE / "templates"
    unet = Engine.from_pretrained(model_dir).unet
    for rank in (4, 8, 16):
        path = write_reference_lora(folder / f"peft-r{rank}", unet, rank=rank, alpha=float(rank), seed=rank, std=0.05)
        out.append(dict(template=f"diffusers+peft LoRA r{rank}", method="lora", rank=rank, data=path.read_bytes()))
    base = FrozenBase.from_pretrained(model_dir)
    photos = [Image.fromarray(s.image) for s in CONCEPTS["purple-dotted-heart"].references(3, seed=0)]
    for method, rank in ((DREAMBOOTH_LORA, 4), (DREAMBOOTH_LORA, 8), (CUSTOM_DIFFUSION, 4), (TEXTUAL_INVERSION, 0)):
        d = defaults(method)
        spec = TrainingSpec(method=method, images=photos, token="<sks>" if learns_token(method) else "sks",
                            class_word="heart", steps=4, learning_rate=d.learning_rate, rank=rank or d.rank,
                            batch_size=1, seed=rank)
        data = serialize_adapter(train(base, spec))
        out.append(dict(template=f"trainer {method}" + (f" r{rank}" if rank else ""), method=method, rank=rank, data=data))
    return out


def _variant(data: bytes, seed: int) -> bytes:
    """`data` (a safetensors file) with every float tensor scaled by a seeded factor in [0.9, 1.1]:
    same keys, shapes, dtypes and metadata, different bytes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        with safe_open(f.name, "pt") as st:
            metadata = st.metadata()
            tensors = {k: st.get_tensor(k) for k in st.keys()}
    g = torch.Generator().manual_seed(seed)
    for k, t in tensors.items():
        if t.is_floating_point():
            tensors[k] = (t.float() * (0.9 + 0.2 * torch.rand((), generator=g))).to(t.dtype).contiguous()
    return save(tensors, metadata=metadata)


def make_adapters(model_dir: Path, count: int, tenants: int) -> list[dict]:
    """`count` adapter files (cached by count), adapter i of tenant i mod `tenants`."""
    folder = CACHE / "adapters"
    manifest_path = folder / f"manifest-{count}.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if all(Path(a["path"]).exists() for a in manifest):
            for a in manifest:
                a["tenant"] = a["index"] % tenants
            return manifest
    folder.mkdir(parents=True, exist_ok=True)
    print(f"making {count} adapter files in {folder} (once)", flush=True)
    templates = _templates(model_dir)
    manifest = []
    for i in range(count):
        t = templates[i % len(templates)]
        data = _variant(t["data"], seed=i)
        sha = hashlib.sha256(data).hexdigest()
        path = folder / f"{i:05d}.safetensors"
        path.write_bytes(data)
        manifest.append(dict(index=i, name=f"s{i:05d}-{sha[:8]}", path=str(path), bytes=len(data),
                             template=t["template"], method=t["method"], rank=t["rank"]))
    manifest_path.write_text(json.dumps(manifest))
    for a in manifest:
        a["tenant"] = a["index"] % tenants
    return manifest


# -- traffic ----------------------------------------------------------------------------------------


def popularity(adapters: int, seed: int) -> list[int]:
    """Adapter indices by popularity rank: a seeded shuffle (the popular ones are of every tenant,
    method and rank)."""
    order = list(range(adapters))
    random.Random(seed).shuffle(order)
    return order


def zipf_plan(order: list[int], s: float, n: int, seed: int) -> list[int]:
    """`n` adapter indices, the one of rank k drawn with probability ~ 1/k^s."""
    cumulative = list(accumulate(1.0 / (k ** s) for k in range(1, len(order) + 1)))
    return [order[k] for k in random.Random(seed + 1).choices(range(len(order)), cum_weights=cumulative, k=n)]


# -- the server -------------------------------------------------------------------------------------


class Server:
    """A `steerserve serve` process (in-process or Triton backend), its tenants and their adapters."""

    def __init__(self, name: str, model_dir: Path, tenants: int, overrides: dict[str, str]):
        self.name, self.model_dir, self.overrides = name, model_dir, overrides
        self.tokens = [f"scale-token-{i}" for i in range(tenants)]
        self.data = CACHE / name
        self.info: dict = {}

    @contextmanager
    def running(self, adapters: list[dict], log_path: Path, ready_timeout_s: float):
        import grpc

        from service._generated.steerserve.v1 import steerserve_pb2 as pb
        from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc

        self.pb, self.pb_grpc, self.grpc = pb, pb_grpc, grpc
        keys = {t: f"scale-tenant-{i}" for i, t in enumerate(self.tokens)}
        with serve_process(self.model_dir, log_path, ready_timeout_s, self.name, backend=self.name,
                           data_dir=self.data, api_keys=keys, settings=self.overrides) as served:
            self.process, self.address = served.process, served.address
            self.info["start_seconds"] = served.start_seconds
            if self.name == "triton":  # the bank's counters are Triton's (its own metrics endpoint)
                found = re.search(r"metrics (http://\S+/metrics)", log_path.read_text())
                if found is None:
                    raise RuntimeError("triton: no metrics address in the serve log")
                self.metrics_url = found.group(1).rstrip(")")
            else:
                self.metrics_url = served.metrics_url
            stub = pb_grpc.SteerServeStub(grpc.insecure_channel(self.address))
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.metadata(0), timeout=60)
            self.info.update(backend=info.backend, unet_runtime=info.unet_runtime,
                             unet_runtime_choice=info.unet_runtime_choice)
            t0 = time.monotonic()
            self.ids = self._import(stub, adapters)
            self.info["import_seconds"] = time.monotonic() - t0
            yield self

    def _import(self, stub, adapters: list[dict]) -> dict:
        """Each tenant's adapters, imported unless an earlier run's data folder has them (by name,
        which carries the content hash); others of earlier runs deleted. {adapter index: id}."""
        pb = self.pb
        ids: dict[int, str] = {}
        by_tenant: dict[int, list[dict]] = {}
        for a in adapters:
            by_tenant.setdefault(a["tenant"], []).append(a)
        lock = threading.Lock()

        def tenant_work(tenant: int) -> None:
            md = self.metadata(tenant)
            wanted = {a["name"]: a for a in by_tenant.get(tenant, [])}
            have = {}
            for old in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md, timeout=120).adapters:
                if old.name in wanted:
                    have[old.name] = old.adapter_id
                else:
                    stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=old.adapter_id), metadata=md, timeout=60)
            for name, a in wanted.items():
                adapter_id = have.get(name) or stub.ImportAdapter(
                    pb.ImportAdapterRequest(name=name, safetensors=Path(a["path"]).read_bytes()),
                    metadata=md, timeout=120).adapter_id
                with lock:
                    ids[a["index"]] = adapter_id

        threads = [threading.Thread(target=tenant_work, args=(t,)) for t in range(len(self.tokens))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len(ids) != len(adapters):
            raise RuntimeError(f"{self.name}: {len(ids)} of {len(adapters)} adapters imported")
        return ids

    def metadata(self, tenant: int):
        return [("authorization", f"Bearer {self.tokens[tenant]}")]

    def counters(self) -> dict[str, float]:
        """The adapter bank's counters, summed over instances (in-process and Triton names alike)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=30).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r"^(steerserve_(?:triton_)?adapter_[a-z_]+?)(?:\{([^}]*)\})? ([0-9.eE+-]+)$", line)
            if m is None:
                continue
            name = m.group(1).replace("steerserve_triton_adapter_", "steerserve_adapter_")
            labels = m.group(2) or ""
            source = re.search(r'source="(\w+)"', labels)
            if source:
                name += ":" + source.group(1)
            out[name] = out.get(name, 0.0) + float(m.group(3))
        return out

    def rss_mb(self) -> float:
        """Resident memory of the server and every process under it (gateway, Triton, its model
        stubs: Triton runs in its own session), MB."""
        parent: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        tree, grew = {self.process.pid}, True
        while grew:
            below = {pid for pid, ppid in parent.items() if ppid in tree} - tree
            tree |= below
            grew = bool(below)
        total = 0
        for pid in tree:
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        return total / 2**20

    def client(self):
        stub = self.pb_grpc.SteerServeStub(self.grpc.insecure_channel(self.address))
        pb = self.pb

        grpc = self.grpc

        def send(adapter_id: str, tenant: int, prompt: str, seed: int, steps: int) -> tuple[int, float]:
            """One request; a refusal with the server's retry pushback (a tenant's queue is full) is
            retried after it, as the client library does. Returns the retries and the server's own
            time for the request (its sampling loop, admission's wait excluded)."""
            for retries in range(100):
                try:
                    response = stub.Generate(pb.GenerateRequest(prompt=prompt, steps=steps, seed=seed,
                                                                adapters=[pb.AdapterRef(adapter_id=adapter_id)]),
                                             metadata=self.metadata(tenant), timeout=1800)
                except grpc.RpcError as exc:
                    pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or pushback is None:
                        raise
                    time.sleep(int(pushback) / 1000)
                    continue
                if len(response.images) != 1 or not response.images[0].data:
                    raise RuntimeError("no image in the answer")
                return retries, response.timings.total_seconds
            raise RuntimeError("refused 100 times")

        return send


# -- the load ---------------------------------------------------------------------------------------


def load(server: Server, adapters: dict, picks: list, clients: int, steps: int) -> dict:
    """`picks` (adapter indices) dealt to `clients` clients, each sending its share back to back
    after a barrier. Latency per request, client side (retries after a refusal included)."""
    senders = [server.client() for _ in range(clients)]
    shares = [picks[c::clients] for c in range(clients)]
    barrier = threading.Barrier(clients + 1)
    latencies: list[float] = []
    served: list[float] = []  # the server's own time per request (admission's wait excluded)
    errors: list[str] = []
    retried = [0]
    ends = [0.0] * clients
    lock = threading.Lock()

    def run(c: int) -> None:
        barrier.wait()
        for j, index in enumerate(shares[c]):
            a = adapters[index]
            t0 = time.perf_counter()
            try:
                retries, seconds = senders[c](server.ids[index], a["tenant"], PROMPTS[(c + j) % len(PROMPTS)],
                                              c * 100_000 + j, steps)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    served.append(seconds)
                    retried[0] += retries
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                with lock:
                    errors.append(repr(exc)[:300])
        ends[c] = time.perf_counter()

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = max(ends) - started
    return dict(requests=len(picks), ok=len(latencies), errors=len(errors), error_samples=sorted(set(errors))[:3],
                refused_then_retried=retried[0],
                seconds=elapsed, images_per_s=len(latencies) / elapsed if elapsed > 0 else 0.0,
                distinct_adapters=len({adapters[p]["path"] for p in picks}),
                p50_s=percentile(latencies, 50) if latencies else None,
                p99_s=percentile(latencies, 99) if latencies else None,
                service_p50_s=percentile(served, 50) if served else None,
                service_p99_s=percentile(served, 99) if served else None)


def bank_figures(before: dict, after: dict, seconds: float) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}
    hits = d.get("steerserve_adapter_cache_hits_total", 0.0)
    from_host = d.get("steerserve_adapter_cache_misses_total:host", 0.0)
    from_store = d.get("steerserve_adapter_cache_misses_total:store", 0.0)
    misses = from_host + from_store
    acquisitions = hits + misses
    return dict(
        acquisitions=acquisitions, bank_hits=hits, loads_from_host=from_host, loads_from_store=from_store,
        bank_hit_rate=hits / acquisitions if acquisitions else None,
        host_cache_hit_rate=from_host / misses if misses else None,
        loads_per_s=misses / seconds if seconds else None,
        store_loads_per_s=from_store / seconds if seconds else None,
        evictions=d.get("steerserve_adapter_evictions_total", 0.0),
        prefetched=d.get("steerserve_adapter_prefetched_total", 0.0),
        resident=after.get("steerserve_adapter_resident"),
        host_cached=after.get("steerserve_adapter_host_cached"),
        host_cache_bytes=after.get("steerserve_adapter_host_cache_bytes"),
    )


def run_system(server: Server, stored: list[dict], args) -> dict:
    """Both loads on one server. `stored`: the adapters (index i = tenant i mod tenants); each tenant
    also imports the most popular one's file as its "one adapter" (same bytes: one key)."""
    top = stored[popularity(len(stored), args.seed)[0]]
    adapters = {a["index"]: a for a in stored}
    for t in range(args.tenants):
        adapters[f"one-{t}"] = dict(top, index=f"one-{t}", name="one-" + top["name"], tenant=t)
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"[{server.name}] starting", flush=True)
    with server.running(list(adapters.values()), logs / f"{server.name}.log", args.ready_timeout):
        print(f"[{server.name}] up in {server.info['start_seconds']:.0f} s (UNet runtime {server.info['unet_runtime']!r}); "
              f"{len(adapters)} adapters imported or found in {server.info['import_seconds']:.0f} s", flush=True)
        order = popularity(len(stored), args.seed)
        plan = zipf_plan(order, args.zipf, args.warmup + args.requests, args.seed)
        # one adapter: the same file in every tenant (stored once: one bank slot), client c calling as
        # tenant c mod tenants; a warm-up round (one request per client), then the timed load
        one = [f"one-{c % args.tenants}" for c in range(args.clients)]
        load(server, adapters, one, args.clients, args.steps)
        rows = {"one_adapter": load(server, adapters, (one * (args.requests // len(one) + 1))[: args.requests],
                                    args.clients, args.steps)}
        print(f"[{server.name}] one adapter: {rows['one_adapter']['images_per_s']:.3f} img/s, "
              f"p99 {rows['one_adapter']['p99_s']:.2f} s", flush=True)
        # zipf: warm-up (uncounted), then the timed load with the bank's counters around it
        load(server, adapters, plan[: args.warmup], args.clients, args.steps)
        before = server.counters()
        row = load(server, adapters, plan[args.warmup:], args.clients, args.steps)
        after = server.counters()
        row["bank"] = bank_figures(before, after, row["seconds"])
        row["rss_mb"] = server.rss_mb()
        rows["zipf"] = row
        print(f"[{server.name}] zipf: {row['images_per_s']:.3f} img/s, p99 {row['p99_s']:.2f} s, "
              f"{row['distinct_adapters']} distinct adapters, bank hit rate {row['bank']['bank_hit_rate']}, "
              f"host-cache hit rate {row['bank']['host_cache_hit_rate']}, {row['errors']} errors "
              + (row["error_samples"][0] if row["errors"] else ""), flush=True)
    one, zipf = rows["one_adapter"], rows["zipf"]
    ratio = dict(images_per_s=zipf["images_per_s"] / one["images_per_s"] if one["images_per_s"] else None,
                 p50=zipf["p50_s"] / one["p50_s"] if one["p50_s"] and zipf["p50_s"] else None,
                 p99=zipf["p99_s"] / one["p99_s"] if one["p99_s"] and zipf["p99_s"] else None,
                 service_p99=zipf["service_p99_s"] / one["service_p99_s"] if one["service_p99_s"] and zipf["service_p99_s"] else None)
    return dict(info=server.info, rows=rows, ratio=ratio, seconds=time.monotonic() - t0)


# -- the registry -----------------------------------------------------------------------------------


def registry_lookups(sizes: list[int], lookups: int, seed: int) -> list[dict]:
    """AdapterStore.get (what the gateway runs for each adapter a request names) with `size`
    adapters registered (rows inserted directly: the lookup does not read blobs)."""
    from service.stores.adapters import AdapterStore
    from service.stores.db import open_database

    rng = random.Random(seed)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        db = open_database(Path(tmp) / "registry.sqlite3")
        store = AdapterStore(db, Path(tmp) / "blobs")
        have = 0
        for size in sizes:
            rows = []
            for i in range(have, size):
                sha = hashlib.sha256(str(i).encode()).hexdigest()
                rows.append((f"ad{i:08d}", f"tenant-{i % 1000}", f"adapter-{i}", "dreambooth-lora", "", "", 4, 1000, 0,
                             sha, f"sha256/{sha[:2]}/{sha}.safetensors", "import", time.time()))
            with db.transaction() as conn:
                conn.executemany(
                    "INSERT INTO adapters (adapter_id, tenant, name, method, token, class_word, rank, size_bytes, "
                    "num_parameters, sha256, blob, source, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            have = size
            picks = [rng.randrange(size) for _ in range(lookups)]
            store.get(f"tenant-{picks[0] % 1000}", f"ad{picks[0]:08d}")  # warm
            t0 = time.perf_counter()
            for i in picks:
                store.get(f"tenant-{i % 1000}", f"ad{i:08d}")
            per = (time.perf_counter() - t0) / lookups
            out.append(dict(adapters=size, lookups=lookups, us_per_lookup=per * 1e6))
            print(f"registry: {size} adapters, {per * 1e6:.1f} us a lookup", flush=True)
    return out


# -- the report -------------------------------------------------------------------------------------


def _f(x, fmt="{:.3f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def render(report: dict) -> str:
    cfg, m, res = report["config"], report["machine"], report["results"]
    methods = sorted({a["template"] for a in cfg["adapter_templates"]})
    lines = [
        "## Thousands of adapters on one replica (CPU, embedded model)",
        "",
        f"`{report['command']}`: {cfg['adapters']} adapters ({', '.join(methods)}; {cfg['adapter_mb']:.0f} MB of files) "
        f"over {cfg['tenants']} tenants, {cfg['clients']} concurrent clients, {cfg['requests']} timed requests per load "
        f"({cfg['warmup']} Zipf warm-up requests before the Zipf load), {cfg['steps']} steps, 64x64, Zipf s = {cfg['zipf']}; "
        f"{m['cores']} cores ({m['cpu']}); run took {report['seconds'] / 60:.1f} min. Server settings: defaults"
        + (f" but {', '.join(f'`{k}={v}`' for k, v in cfg['overrides'].items())}" if cfg["overrides"] else "") + ".",
        "",
        "| system | UNet runtime | load | requests | distinct adapters | images/s | p50 s | p99 s | server p50 / p99 s | refused, retried | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | **failed**: {' '.join(r['error'][-300:].split())} | | | | | | | | | |")
            continue
        for load_name in ("one_adapter", "zipf"):
            row = r["rows"][load_name]
            lines.append(f"| {name} | {r['info'].get('unet_runtime', '')} | {load_name.replace('_', ' ')} | {row['ok']}/{row['requests']} | "
                         f"{row['distinct_adapters']} | {row['images_per_s']:.3f} | {_f(row['p50_s'])} | {_f(row['p99_s'])} | "
                         f"{_f(row.get('service_p50_s'))} / {_f(row.get('service_p99_s'))} | "
                         f"{row.get('refused_then_retried', 0)} | {row['errors']} |")
    lines += ["", "Zipf over one adapter (images/s: higher is better, goal >= "
              f"{GOAL_RATIO:g}x; latency: lower is better), and the adapter bank under the Zipf load:", "",
              "| system | images/s ratio | p50 ratio | p99 ratio | server p99 ratio | bank hit rate | host-cache hit rate | slot loads/s | read ahead | evictions | resident / host-cached (MB) | server RSS MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        if "error" in r:
            continue
        b, ratio, z = r["rows"]["zipf"]["bank"], r["ratio"], r["rows"]["zipf"]
        met = ratio["images_per_s"] is not None and ratio["images_per_s"] >= GOAL_RATIO
        host_mb = b["host_cache_bytes"] / 2**20 if b.get("host_cache_bytes") is not None else None
        lines.append(
            f"| {name} | **{_f(ratio['images_per_s'], '{:.2f}x')}** ({'met' if met else 'not met'}) | {_f(ratio['p50'], '{:.2f}x')} | "
            f"{_f(ratio['p99'], '{:.2f}x')} | {_f(ratio.get('service_p99'), '{:.2f}x')} | {_f(b['bank_hit_rate'], '{:.1%}')} | {_f(b['host_cache_hit_rate'], '{:.1%}')} | "
            f"{_f(b['loads_per_s'], '{:.1f}')} | {b['prefetched']:.0f} | {b['evictions']:.0f} | "
            f"{_f(b['resident'], '{:.0f}')} / {_f(b['host_cached'], '{:.0f}')} ({_f(host_mb, '{:.0f}')}) | {z['rss_mb']:.0f} |")
    if report.get("registry"):
        lines += ["", "Registry lookups (AdapterStore.get by tenant and id, SQLite, the lookup a request's every adapter "
                  "costs at the gateway):", "", "| adapters registered | lookups | us a lookup |", "|---:|---:|---:|"]
        for r in report["registry"]:
            lines.append(f"| {r['adapters']:,} | {r['lookups']:,} | {r['us_per_lookup']:.1f} |")
        first, last = report["registry"][0], report["registry"][-1]
        lines.append("")
        lines.append(f"{last['adapters']:,} adapters: {last['us_per_lookup'] / first['us_per_lookup']:.2f}x the lookup time "
                     f"at {first['adapters']:,} (a primary-key index: flat in the registry's size).")
    lines += [
        "",
        "Clients retry a refusal that carries the server's retry pushback (a tenant with 16 requests waiting, "
        "the default `STEERSERVE_TENANT_MAX_QUEUED`) after the pushback, as the client library does; latency "
        "includes it. Admission is fair between tenants: under Zipf traffic the tenants of the popular adapters "
        "queue behind the others' turns, which is what lengthens the Zipf p99 beyond the bank's own cost; "
        "`server` latency is the server's own time for a request (its sampling loop: waiting for places in "
        "shared UNet calls and for its adapters included, admission's wait excluded), the bank's share of it. "
        "Bank hit rate: adapter acquisitions served by a resident slot (each UNet call acquires its rows' adapters); "
        "host-cache hit rate: of the bank's misses, those copied from the parsed copy in host memory rather than read "
        "from the store on the request path; slot loads/s: misses a second; read ahead: adapters the loader thread read "
        "from the store into host memory as their request arrived, off the request path. Latency is per request, client side. "
        "Both loads run on the same warm server one after the other; the one-adapter load is the best case the "
        "bank can have (every row in one slot). On a CPU a batched UNet call costs about the sum of its rows; "
        "no GPU was available for these figures.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=2000)
    ap.add_argument("--tenants", type=int, default=20)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256, help="timed requests per load")
    ap.add_argument("--warmup", type=int, default=128, help="uncounted Zipf requests before the Zipf load")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--set", action="append", default=[], metavar="STEERSERVE_X=V",
                    help="a server setting (environment variable) for every system; repeatable")
    ap.add_argument("--registry", type=int, default=100_000, help="largest registry size to time lookups at (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    from service.research.basemodel import DEFAULT_MODEL_DIR

    started = time.monotonic()
    overrides = dict(item.split("=", 1) for item in args.set)
    model_dir = Path(DEFAULT_MODEL_DIR)
    adapters = make_adapters(model_dir, args.adapters, args.tenants)
    templates = {a["template"]: dict(template=a["template"], method=a["method"], rank=a["rank"]) for a in adapters}
    report = dict(
        command="python -m bench.scale " + " ".join(sys.argv[1:] if argv is None else argv),
        config=dict(adapters=args.adapters, tenants=args.tenants, clients=args.clients, requests=args.requests,
                    warmup=args.warmup, steps=args.steps, zipf=args.zipf, overrides=overrides, model=model_dir.name,
                    adapter_templates=list(templates.values()), adapter_mb=sum(a["bytes"] for a in adapters) / 2**20),
        machine=machine(), results={},
    )
    for name in [s for s in args.systems.split(",") if s]:
        try:
            report["results"][name] = run_system(Server(name, model_dir, args.tenants, overrides), adapters, args)
        except Exception as exc:  # noqa: BLE001 - reported, the other system still runs
            report["results"][name] = dict(error=repr(exc)[-2000:])
            print(f"[{name}] failed: {exc!r}"[:3000], flush=True)
    if args.registry:
        sizes = [s for s in (1_000, 10_000, 100_000) if s <= args.registry] or [args.registry]
        report["registry"] = registry_lookups(sizes, lookups=20_000, seed=args.seed)
    report["seconds"] = time.monotonic() - started
    write_results(args.out, "scale", report, render(report))
    return 0 if all("error" not in r for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
