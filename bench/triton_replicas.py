"""Adapter-affinity routing against round robin across two real Triton servers, side by side in one run.

    python -m bench.triton_replicas [--requests 300] [--clients 8] [--adapters 8] [--slots 4] [--steps 4]
                                    [--order rr,affinity,rr,affinity,rr,affinity,rr,affinity] [--out-dir bench/results]

Two `tritonserver` processes (TritonServer, each on its own loopback ports, started in parallel)
serve the same model_repo/ models from one adapter blob folder (the shared volume of a real
deployment), each with a small adapter bank (`--slots` 4: slot 0 is the base model, so 3 adapters
resident per model instance). One TritonBackend in this process sends to both through its
ReplicaRouter, exactly as the gateway does (adapter_slots = the bank size the gateway passes); the
baseline is the same router with `affinity = False` (least loaded, round robin among equals).

Workload: `--requests` Generate calls per pass from `--clients` concurrent asyncio clients, each
with one of `--adapters` imported LoRA files drawn from a Zipf(`--skew`) distribution (a few hot
adapters, a long tail), `--steps` steps at 64x64; every pass sends the same sequence (same adapters,
prompts and seeds), so the modes differ only in routing. Passes follow `--order` (default ABAB four
times, round robin first) after one uncounted warm-up pass; nothing is reset between passes: each mode's
figures are deltas (Triton's steerserve_triton_adapter_* bank counters and nv_inference_* of each
server, the router's steerserve_triton_routed_requests) over its own passes.

Reports per mode: images/s, p50/p95 latency, unet bank hit ratio (per UNet-call acquisition: every
step acquires its rows' adapters) and evictions summed over both servers, requests and UNet
calls per replica; then affinity / round robin. Throughput and latency are taken per pass; the
headline ratios are of the medians over passes, beside each round's own ratio (an rr pass and the
affinity pass after it), so one pass slowed by other work on the shared machine does not decide
the result. Writes bench/results/triton_replicas.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import random
import re
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from bench.common import ROOT, write_results

MODES = {"rr": "round robin", "affinity": "adapter affinity"}
PROMPTS = ["a red circle", "a blue dotted star", "a green striped square on a yellow background", "a tree",
           "a yellow triangle on a purple background"]
# The models a Generate touches (edit and personalize are left out: two fewer torch stubs per server).
MODELS = ("text_encoder", "unet", "vae_decode", "generate")
BANK_COUNTERS = {"hits": "steerserve_triton_adapter_cache_hits_total",
                 "misses": "steerserve_triton_adapter_cache_misses_total",
                 "evictions": "steerserve_triton_adapter_evictions_total"}


def scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def model_sum(text: str, name: str, model: str) -> float:
    pattern = rf'^{re.escape(name)}{{[^}}]*model="{model}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def server_counters(url: str) -> dict[str, float]:
    """This server's bank counters (unet and text_encoder banks) and unet call counts, now."""
    text = scrape(url)
    out = {f"{model}_{key}": model_sum(text, name, model)
           for model in ("unet", "text_encoder") for key, name in BANK_COUNTERS.items()}
    out["unet_rows"] = model_sum(text, "nv_inference_count", "unet")
    out["unet_calls"] = model_sum(text, "nv_inference_exec_count", "unet")
    out["generate_requests"] = model_sum(text, "nv_inference_request_success", "generate")
    return out


def routed(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """The router's steerserve_triton_routed_requests, by (replica, affinity)."""
    return {(s.labels["replica"], s.labels["affinity"]): s.value
            for m in registry.collect() for s in m.samples if s.name == "steerserve_triton_routed_requests_total"}


def zipf_weights(n: int, skew: float) -> list[float]:
    w = [1.0 / (k + 1) ** skew for k in range(n)]
    return [x / sum(w) for x in w]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="Generate calls per pass")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the adapters' popularity")
    ap.add_argument("--slots", type=int, default=4, help="STEERSERVE_ADAPTER_SLOTS of each server (slot 0 = base)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=48, help="requests of the uncounted warm-up pass (round robin)")
    ap.add_argument("--order", default=",".join(["rr,affinity"] * 4), help="passes, comma-separated: rr, affinity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    order = [m.strip() for m in args.order.split(",") if m.strip()]
    if not order or any(m not in MODES for m in order):
        ap.error(f"--order: a comma-separated list of {', '.join(MODES)}")
    started = time.time()

    from service.adapters import parse_adapter, serialize_adapter
    from service.backends.triton import TritonBackend
    from service.config import Settings
    from service.engine.default_model import default_model_dir
    from service.engine.pipeline import AdapterUse, GenerationSpec
    from service.gateway.server import MODEL_REPOSITORY, triton_model_environment
    from service.triton.launcher import TritonServer
    from tests.adapter_files import lora_file

    work = Path(tempfile.mkdtemp(prefix="steerserve-replicas-"))
    model_dir = default_model_dir(work / "models")
    args.model = model_dir.name
    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0, data_dir=work, model_dir=model_dir,
                        backend="triton", adapter_slots=args.slots)
    env = triton_model_environment(settings, model_dir)

    # Adapters as ImportAdapter stores them (parsed, serialized), by content key in the shared blob folder.
    keys = []
    for k in range(args.adapters):
        blob = serialize_adapter(parse_adapter(lora_file(model_dir, rank=4, seed=k)))
        key = hashlib.sha256(blob).hexdigest()
        path = Path(env["STEERSERVE_ADAPTER_DIR"]) / "sha256" / key[:2] / f"{key}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        keys.append(key)

    # One sequence of requests, sent identically in every pass.
    rng = random.Random(args.seed)
    weights = zipf_weights(args.adapters, args.skew)
    workload = [(rng.choices(range(args.adapters), weights)[0], rng.choice(PROMPTS), i) for i in range(args.requests)]
    popularity = [sum(1 for a, _, _ in workload if a == k) / len(workload) for k in range(args.adapters)]

    servers = [TritonServer(MODEL_REPOSITORY, models=MODELS, env=env, start_timeout_s=900) for _ in range(2)]
    errors: list[BaseException] = []

    def start(server):
        try:
            server.start()
        except BaseException as exc:  # noqa: BLE001 - reported below, after both threads end
            errors.append(exc)

    report: dict = {}
    try:
        threads = [threading.Thread(target=start, args=(s,)) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        startup_s = time.time() - started
        print(f"both Tritons ready after {startup_s:.0f} s: {[s.grpc_url for s in servers]}", flush=True)
        registry = CollectorRegistry()
        backend = TritonBackend(",".join(s.grpc_url for s in servers), model_dir,
                                metrics=SimpleNamespace(registry=registry), adapter_slots=args.slots)
        router = backend.router
        replica_of = {s.grpc_url: f"replica {i}" for i, s in enumerate(servers)}

        async def run_pass(requests, seed_offset: int) -> tuple[float, list[float], list[str], list[int]]:
            queue: asyncio.Queue = asyncio.Queue()
            for item in requests:
                queue.put_nowait(item)
            latencies: list[float] = []
            failures: list[str] = []

            async def client():
                while not queue.empty():
                    adapter, prompt, seed = queue.get_nowait()
                    spec = GenerationSpec(prompt=prompt, steps=args.steps, width=64, height=64,
                                          seed=seed_offset + seed, adapters=(AdapterUse(keys[adapter]),))
                    t0 = time.perf_counter()
                    try:
                        await backend.generate(spec, deadline=time.monotonic() + 600)
                    except Exception as exc:  # noqa: BLE001 - counted and reported, the pass goes on
                        failures.append(f"{type(exc).__name__}: {exc}")
                        continue
                    latencies.append(time.perf_counter() - t0)

            gaps: list[int] = []  # |in flight on replica 0 - on replica 1|, sampled every 20 ms

            async def watch():
                while True:
                    a, b = (r.in_flight for r in router.replicas.values())
                    gaps.append(abs(a - b))
                    await asyncio.sleep(0.02)

            watcher = asyncio.get_running_loop().create_task(watch())
            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(args.clients)))
            seconds = time.perf_counter() - t0
            watcher.cancel()
            return seconds, latencies, failures, gaps

        async def run_all():
            try:
                router.affinity = False
                warm_s, _, warm_fail, _ = await run_pass(workload[: args.warmup], 1_000_000)
                print(f"warm-up: {args.warmup} requests in {warm_s:.1f} s ({len(warm_fail)} failed)", flush=True)
                passes = []
                for n, mode in enumerate(order):
                    router.affinity = mode == "affinity"
                    load_before = os.getloadavg()[0]
                    before = [await asyncio.to_thread(server_counters, s.metrics_url) for s in servers]
                    routed_before = routed(registry)
                    seconds, latencies, failures, gaps = await run_pass(workload, 0)
                    await asyncio.sleep(0.5)
                    after = [await asyncio.to_thread(server_counters, s.metrics_url) for s in servers]
                    routed_after = routed(registry)
                    per_server = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)]
                    by_replica: dict = defaultdict(lambda: defaultdict(float))
                    for (address, affinity), value in routed_after.items():
                        delta = value - routed_before.get((address, affinity), 0.0)
                        if delta:
                            by_replica[replica_of[address]][affinity] += delta
                    p = dict(mode=mode, seconds=seconds, ok=len(latencies), failed=len(failures),
                             images_per_s=len(latencies) / seconds, p50_s=statistics.median(latencies),
                             p95_s=percentile(latencies, 0.95), load_average=(load_before, os.getloadavg()[0]),
                             in_flight_gap_mean=statistics.fmean(gaps) if gaps else 0.0,
                             in_flight_gap_share_over_2=sum(g > 2 for g in gaps) / max(1, len(gaps)),
                             failures=failures[:5], latencies=latencies, servers=per_server,
                             routed={r: dict(v) for r, v in sorted(by_replica.items())})
                    print(f"pass {n + 1}/{len(order)} {mode}: {len(latencies)} ok in {seconds:.1f} s "
                          f"({len(latencies) / seconds:.2f} img/s), p50 {statistics.median(latencies):.2f} s; "
                          f"unet bank {[(int(s['unet_hits']), int(s['unet_misses']), int(s['unet_evictions'])) for s in per_server]} "
                          f"(hits, misses, evictions per server); routed {p['routed']}", flush=True)
                    passes.append(p)
                return passes
            finally:
                await backend.close()

        passes = asyncio.run(run_all())
        report = summarize(args, order, passes, popularity, startup_s, warm=args.warmup)
    finally:
        stops = [threading.Thread(target=s.close) for s in servers]
        for t in stops:
            t.start()
        for t in stops:
            t.join()
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.time() - started
    report["interpretation"] = interpretation(report)
    write_results(args.out_dir, "triton_replicas", report, markdown(report))
    return 0 if all(report["modes"][m]["failed"] == 0 for m in report["modes"]) else 1


def summarize(args, order, passes, popularity, startup_s, warm) -> dict:
    import torch

    med = statistics.median
    modes = {}
    for mode in MODES:
        mine = [p for p in passes if p["mode"] == mode]
        if not mine:
            continue
        latencies = [x for p in mine for x in p["latencies"]]
        seconds = sum(p["seconds"] for p in mine)
        total = lambda key: sum(s[key] for p in mine for s in p["servers"])  # noqa: E731
        per_replica = lambda key: [sum(p["servers"][i][key] for p in mine) for i in range(2)]  # noqa: E731
        routed_counts = defaultdict(lambda: defaultdict(float))
        for p in mine:
            for replica, kinds in p["routed"].items():
                for kind, v in kinds.items():
                    routed_counts[replica][kind] += v
        acquisitions = total("unet_hits") + total("unet_misses")
        te_acquisitions = total("text_encoder_hits") + total("text_encoder_misses")
        modes[mode] = dict(
            passes=len(mine), ok=len(latencies), failed=sum(p["failed"] for p in mine),
            failures=[f for p in mine for f in p["failures"]][:5], seconds=seconds,
            images_per_s=med(p["images_per_s"] for p in mine),  # median over passes
            images_per_s_pooled=len(latencies) / seconds,
            images_per_s_by_pass=[p["images_per_s"] for p in mine],
            p50_s=med(p["p50_s"] for p in mine), p95_s=med(p["p95_s"] for p in mine),  # medians over passes
            p50_s_pooled=statistics.median(latencies), p95_s_pooled=percentile(latencies, 0.95),
            mean_s=statistics.fmean(latencies),
            unet_bank=dict(hits=total("unet_hits"), misses=total("unet_misses"), evictions=total("unet_evictions"),
                           hit_ratio=total("unet_hits") / acquisitions if acquisitions else float("nan"),
                           hit_ratio_by_pass=[sum(s["unet_hits"] for s in p["servers"])
                                              / max(1.0, sum(s["unet_hits"] + s["unet_misses"] for s in p["servers"]))
                                              for p in mine]),
            text_encoder_bank=dict(hits=total("text_encoder_hits"), misses=total("text_encoder_misses"),
                                   evictions=total("text_encoder_evictions"),
                                   hit_ratio=total("text_encoder_hits") / te_acquisitions if te_acquisitions else float("nan")),
            requests_per_replica=[sum(routed_counts[f"replica {i}"].values()) for i in range(2)],
            generate_successes_per_replica=per_replica("generate_requests"),
            unet_calls_per_replica=per_replica("unet_calls"),
            unet_rows_per_replica=per_replica("unet_rows"),
            evictions_per_replica=per_replica("unet_evictions"),
            in_flight_gap_mean=statistics.fmean(p["in_flight_gap_mean"] for p in mine),
            in_flight_gap_share_over_2=statistics.fmean(p["in_flight_gap_share_over_2"] for p in mine),
            router_affinity=[dict(routed_counts[f"replica {i}"]) for i in range(2)],
        )
    ratios = {}
    if "rr" in modes and "affinity" in modes:
        a, b = modes["affinity"], modes["rr"]
        rounds = [(x, y) for x, y in zip(passes, passes[1:]) if x["mode"] == "rr" and y["mode"] == "affinity"]
        ratios = dict(
            images_per_s=a["images_per_s"] / b["images_per_s"],
            images_per_s_pooled=a["images_per_s_pooled"] / b["images_per_s_pooled"],
            images_per_s_by_round=[y["images_per_s"] / x["images_per_s"] for x, y in rounds],
            p50=a["p50_s"] / b["p50_s"], p95=a["p95_s"] / b["p95_s"],
            unet_hit_ratio=a["unet_bank"]["hit_ratio"] / b["unet_bank"]["hit_ratio"],
            unet_evictions=a["unet_bank"]["evictions"] / b["unet_bank"]["evictions"] if b["unet_bank"]["evictions"] else float("nan"),
        )
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    return dict(
        config=dict(requests_per_pass=args.requests, clients=args.clients, adapters=args.adapters, skew=args.skew,
                    adapter_popularity=popularity, slots=args.slots, adapter_slots_per_server=args.slots - 1,
                    steps=args.steps, size="64x64", warmup_requests=warm, order=order, seed=args.seed,
                    adapter="tests.adapter_files.lora_file rank 4 (one UNet attention projection)",
                    models=list(MODELS), router_affinity_slack=4, router_remembered_keys=args.slots,
                    model=getattr(args, "model", "")),
        machine=dict(cpu=cpu, cores=os.cpu_count(), gpu=None, torch=torch.__version__,
                     torch_threads_per_stub=1, load_average_end=os.getloadavg()),
        startup_s=startup_s, modes=modes, ratios=ratios, passes=[{k: v for k, v in p.items() if k != "latencies"}
                                                                  for p in passes],
    )


def markdown(r: dict) -> str:
    c, m, modes, ratios = r["config"], r["machine"], r["modes"], r["ratios"]
    pop = ", ".join(f"{p:.0%}" for p in c["adapter_popularity"])
    order = c["order"]
    rounds = len(order) // 2 if order == ["rr", "affinity"] * (len(order) // 2) else None
    lines = [
        "## Adapter-affinity routing vs round robin across two Triton replicas (CPU, embedded model)",
        "",
        f"`python -m bench.triton_replicas --requests {c['requests_per_pass']} --clients {c['clients']} "
        f"--adapters {c['adapters']} --slots {c['slots']} --steps {c['steps']} --order {','.join(order)}` "
        f"on the embedded model `{c.get('model', '')}`: "
        f"two `tritonserver` processes on loopback ports (models {', '.join(c['models'])}; one torch thread per "
        f"stub), one blob folder; each bank {c['slots']} slots = {c['adapter_slots_per_server']} adapters. "
        f"One TritonBackend + ReplicaRouter in the benchmark process, as the gateway uses it. "
        f"{c['requests_per_pass']} Generate per pass ({c['steps']} steps, {c['size']}, one adapter each, "
        f"{c['adapters']} adapters drawn Zipf s={c['skew']}: {pop}), {c['clients']} concurrent clients; the same "
        f"sequence every pass; passes "
        + (f"round robin, affinity, {rounds} times" if rounds else " ".join(order))
        + f", after {c['warmup_requests']} uncounted warm-up requests; nothing reset between passes, bank and call "
        f"figures are deltas summed over a mode's passes. Machine: {m['cpu']}, {m['cores']} cores "
        f"(shared with other work), no GPU; torch {m['torch']}; {r['seconds']:.0f} s in all "
        f"({r['startup_s']:.0f} s to start both servers).",
        "",
        "| mode | images/s: median of passes (each pass) | p50 | p95 | unet bank hit ratio | hits / misses "
        "| evictions (both servers) | requests per replica | unet calls per replica | in-flight gap | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, x in modes.items():
        b = x["unet_bank"]
        lines.append(
            f"| {MODES[mode]} | {x['images_per_s']:.2f} ({', '.join(f'{v:.2f}' for v in x['images_per_s_by_pass'])}) "
            f"| {x['p50_s']:.2f} s | {x['p95_s']:.2f} s | {b['hit_ratio']:.3f} | {b['hits']:.0f} / {b['misses']:.0f} "
            f"| {b['evictions']:.0f} | {' / '.join(f'{v:.0f}' for v in x['requests_per_replica'])} "
            f"| {' / '.join(f'{v:.0f}' for v in x['unet_calls_per_replica'])} | {x['in_flight_gap_mean']:.2f} "
            f"| {x['failed']} |")
    if ratios:
        lines += [
            f"| **affinity / round robin** | **{ratios['images_per_s']:.2f}** | {ratios['p50']:.2f} | {ratios['p95']:.2f} "
            f"| **{ratios['unet_hit_ratio']:.2f}** | | **{ratios['unet_evictions']:.2f}** | | | | |",
            "",
            f"Throughput ratio per round (an affinity pass over the round-robin pass before it): "
            f"{', '.join(f'{v:.2f}' for v in ratios['images_per_s_by_round'])}; pooled over all passes "
            f"{ratios['images_per_s_pooled']:.2f}. p50/p95 are medians of the passes' own percentiles. In-flight "
            "gap: the mean of |requests in flight on replica 0 - on replica 1|, sampled every 20 ms.",
        ]
    lines += ["", "| pass | mode | images/s | p50 | p95 | unet hit ratio | load average (start, end) |",
              "|---:|---|---:|---:|---:|---:|---|"]
    for n, p in enumerate(r["passes"]):
        hits = sum(s["unet_hits"] for s in p["servers"])
        acq = hits + sum(s["unet_misses"] for s in p["servers"])
        lines.append(f"| {n + 1} | {MODES[p['mode']]} | {p['images_per_s']:.2f} | {p['p50_s']:.2f} s | {p['p95_s']:.2f} s "
                     f"| {hits / max(1.0, acq):.3f} | {p['load_average'][0]:.1f}, {p['load_average'][1]:.1f} |")
    lines += ["", "Router's view (steerserve_triton_routed_requests: did the chosen replica serve the adapter lately?):", ""]
    for mode, x in modes.items():
        parts = "; ".join(f"replica {i}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(d.items()))
                          for i, d in enumerate(x["router_affinity"]))
        te = x["text_encoder_bank"]
        lines.append(f"- {MODES[mode]}: {parts}. text_encoder bank: hit ratio {te['hit_ratio']:.3f}, "
                     f"{te['evictions']:.0f} evictions.")
    lines += ["", "### Interpretation", "", r.get("interpretation", INTERPRETATION), ""]
    return "\n".join(lines) + "\n"


INTERPRETATION = "(no interpretation: both modes are needed)"


def interpretation(r: dict) -> str:
    """What the figures say, and what they cannot say on this machine."""
    modes, ratios, c = r["modes"], r["ratios"], r["config"]
    if not ratios:
        return INTERPRETATION
    rr, af = modes["rr"], modes["affinity"]
    by_round = ratios["images_per_s_by_round"] or [ratios["images_per_s"]]
    gain = ratios["images_per_s"]
    if all(v > 1.1 for v in by_round):
        verdict = "higher in every round"
    elif all(v < 0.9 for v in by_round):
        verdict = "lower in every round"
    elif all(v < 1 for v in by_round) or all(v > 1 for v in by_round):
        verdict = (f"{'lower' if gain < 1 else 'higher'} in every round but by no more than "
                   f"{max(abs(v - 1) for v in by_round):.0%}: small beside the ~20% this shared machine's figures "
                   "are read with, yet consistent")
    else:
        verdict = "a difference within this machine's noise"
    ps = r["passes"]
    p95_up = [y["p95_s"] > x["p95_s"] for x, y in zip(ps, ps[1:]) if x["mode"] == "rr" and y["mode"] == "affinity"]
    imbalance = lambda x: max(x["requests_per_replica"]) / max(1.0, min(x["requests_per_replica"]))  # noqa: E731
    return (
        f"Affinity does what it is for at the bank: the unet banks' hit ratio goes from {rr['unet_bank']['hit_ratio']:.2f} "
        f"to {af['unet_bank']['hit_ratio']:.2f} ({ratios['unet_hit_ratio']:.2f}x) and evictions summed over both servers "
        f"fall to {ratios['unet_evictions']:.2f}x of round robin's ({af['unet_bank']['evictions']:.0f} against "
        f"{rr['unet_bank']['evictions']:.0f}), with {c['adapters']} adapters over 2 x {c['adapter_slots_per_server']} slots. "
        f"Misses remain: {c['adapters']} adapters do not fit in the {2 * c['adapter_slots_per_server']} slots, and the "
        f"load bound (a replica more than {c['router_affinity_slack']} requests in flight above the least loaded is passed "
        f"over) can send an adapter to the replica without it; requests per replica split {imbalance(af):.2f}:1 "
        f"(round robin {imbalance(rr):.2f}:1). "
        f"Throughput: affinity/round robin = {gain:.2f} in the median pass (p50 latency {ratios['p50']:.2f}x, "
        f"p95 {ratios['p95']:.2f}x), {verdict} (rounds: {', '.join(f'{v:.2f}' for v in by_round)}). "
        "What affinity costs is balance: it lets one replica run up to "
        f"{c['router_affinity_slack']} more requests than the other; the in-flight gap between the replicas averaged "
        f"{af['in_flight_gap_mean']:.2f} under affinity against {rr['in_flight_gap_mean']:.2f} under round robin "
        f"(more than 2 apart {af['in_flight_gap_share_over_2']:.0%} of the time against "
        f"{rr['in_flight_gap_share_over_2']:.0%})"
        + (f", and p95 latency was higher under affinity in {sum(p95_up)} of {len(p95_up)} rounds, which fits that. "
           if p95_up and sum(p95_up) > len(p95_up) / 2 else ". ")
        + "The throughput figure says little about a GPU deployment: (1) a miss is cheap here -- every adapter stays "
        "parsed in each instance's host cache after its first load, and the test LoRA is one rank-4 projection, so a "
        "miss is a copy of two small tensors into a slot, a small fraction of a UNet call; real SD 1.5 LoRAs (hundreds "
        "of layers, tens of MB, read from a shared volume when not host-cached) cost far more per miss, which is what "
        "the hit ratio buys back; (2) the two servers are not independent devices: they share "
        f"{r['machine']['cores']} CPU cores with each other's other stubs and this client, so the run is CPU-bound as a "
        "whole and neither a saved miss nor an uneven split weighs as it would on two GPUs. Read the hit-ratio and "
        "eviction figures as the result, and the throughput ratio as what routing costs or saves on a CPU-bound pair, "
        "not as a GPU prediction. The text_encoder banks churn too (the test LoRAs have no text-encoder layers, yet "
        f"each takes a text_encoder slot): {af['text_encoder_bank']['evictions']:.0f} evictions under affinity against "
        f"{rr['text_encoder_bank']['evictions']:.0f}. The router remembers the last "
        f"{c['router_remembered_keys']} adapters per replica: as many as a bank holds."
    )


if __name__ == "__main__":
    raise SystemExit(main())
