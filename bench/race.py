"""The race: this service (in-process and gateway + Triton, default settings) against a diffusers
pipeline with peft adapters behind a minimal HTTP server, at 1, 8 and 32 concurrent clients, 8
distinct adapters, 20 steps; images/s and p50/p99 latency as ratios, in one run.

    python -m bench.race [--clients 1,8,32] [--requests N[,N...]] [--steps 20] [--adapters 8]
                         [--systems inprocess,triton,diffusers,diffusers-batched] [--out bench/results]

Systems, each a real server in its own process, started and stopped in turn:
- inprocess: `python -m service serve` (in-process backend), default settings but for the data
  folder (var/bench-cache/race/inprocess: kept, so the UNet runtime `auto` measured at the first
  start is read back from its cache afterwards; delete its compiled/ to measure again), ports and
  API keys: `--tenants` of them, client i calling as tenant i mod TENANTS (by default one tenant may
  have 16 requests waiting; 32 clients as one tenant would be refused).
- triton: `python -m service serve --backend triton` (the embedded Triton), the same, in
  var/bench-cache/race/triton; STEERSERVE_TRITON_START_TIMEOUT_S raised (a first start compiles).
- diffusers / diffusers-batched: bench/race_baseline_server.py, a StableDiffusionPipeline with the
  8 adapters loaded through `load_lora_weights`, `set_adapters` per request, one request at a time
  (a lock) or batched by adapter (a short window, one pipeline call per adapter group). Same torch
  thread count as the service's in-process engine uses by default (torch's default on this machine),
  denormals flushed like the engine.

Adapters: `--adapters` diffusers-format LoRA files (bench/reference_adapters.py, peft + diffusers'
save_lora_weights), ranks alternating 4 and 8, imported into each of our servers through
ImportAdapter. Every request: one of the adapters and one of a few prompts, drawn with a fixed
seed (the same plan for every system), its own seed, `--steps` steps, guidance 7.5, 64x64 (the
model's default size, the service's default guidance; the baseline is sent the same).

Per system: each adapter once, one by one (uncounted: first use of each adapter); then for each
client count, every client sends one uncounted request, all wait at a barrier, and the timed part
starts: each client sends its share of the requests back to back. images/s = timed requests / the
time from the barrier to the last answer; latency is per request, client side.

Writes <out>/race.{json,md}. Server logs: var/bench-cache/race/logs/.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from bench.common import ROOT, clean_env, free_port, serve_process, stop_group, write_results
from service.config import Settings

CACHE = ROOT / "var" / "bench-cache" / "race"
SYSTEMS = ("inprocess", "triton", "diffusers", "diffusers-batched")
OURS = ("inprocess", "triton")
THEIRS = ("diffusers", "diffusers-batched")
DEFAULT_REQUESTS = {1: 24, 8: 64, 32: 128}  # the whole race: ~12 min on 2 idle cores
PROMPTS = [
    "a red dotted star on a blue striped background",
    "a green striped square",
    "a yellow circle on a purple background",
    "a blue dotted heart",
    "an orange striped crescent on a green background",
    "a purple cross",
]
GUIDANCE = 7.5  # the service's default guidance_scale (service/gateway/validation.py)
GOAL_CLIENTS, GOAL_RATIO = 8, 2.0


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- adapters ---------------------------------------------------------------------------------------


def write_adapters(model_dir: Path, count: int) -> list[dict]:
    """`count` diffusers-format LoRA files on the served model, ranks alternating 4 and 8."""
    from bench.reference_adapters import write_reference_lora
    from service.engine.pipeline import Engine

    unet = Engine.from_pretrained(model_dir).unet
    adapters = []
    for i in range(count):
        rank = 4 if i % 2 == 0 else 8
        name = f"race-{i}"
        path = write_reference_lora(CACHE / "adapters" / name, unet, rank=rank, alpha=2.0 * rank, seed=100 + i, std=0.05)
        adapters.append(dict(name=name, rank=rank, path=str(path)))
    return adapters


# -- the request plan -------------------------------------------------------------------------------


def plan(clients: int, requests: int, adapters: int, seed: int) -> list[list[dict]]:
    """Per client: a warm-up request, then its share of `requests` (prompt, adapter index, seed)."""
    rng = random.Random(seed * 1000 + clients)
    per_client = -(-requests // clients)
    out = []
    for c in range(clients):
        out.append([dict(prompt=rng.choice(PROMPTS), adapter=rng.randrange(adapters), seed=rng.randrange(2**31))
                    for _ in range(per_client + 1)])
    return out


# -- the systems: how to start each and send it one request ---------------------------------------


class Ours:
    """A `steerserve serve` process (in-process or Triton backend) called through gRPC."""

    def __init__(self, name: str, model_dir: Path, tenants: int):
        self.name = name
        self.model_dir = model_dir
        self.tokens = [f"race-token-{i}" for i in range(tenants)]
        self.data = CACHE / name
        self.info: dict = {}

    @contextmanager
    def running(self, adapters: list[dict], log_path: Path, ready_timeout_s: float):
        import grpc

        from service._generated.steerserve.v1 import steerserve_pb2 as pb
        from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc

        self.pb, self.pb_grpc, self.grpc = pb, pb_grpc, grpc
        keys = {t: f"race-tenant-{i}" for i, t in enumerate(self.tokens)}
        with serve_process(self.model_dir, log_path, ready_timeout_s, self.name, backend=self.name,
                           data_dir=self.data, api_keys=keys) as served:
            self.info["start_seconds"] = served.start_seconds
            self.address = served.address
            stub = pb_grpc.SteerServeStub(grpc.insecure_channel(self.address))
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=self.metadata(0), timeout=60)
            self.info.update(backend=info.backend, unet_runtime=info.unet_runtime,
                             unet_runtime_choice=info.unet_runtime_choice, base_model=info.base_model)
            # Adapters belong to a tenant: every tenant imports the same files (stored once, content-
            # addressed: the server's adapter bank sees `len(adapters)` distinct adapters).
            for tenant in range(len(self.tokens)):  # an earlier run's imports (the data folder is kept)
                md = self.metadata(tenant)
                for old in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md, timeout=60).adapters:
                    if old.name.startswith("race-"):
                        stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=old.adapter_id), metadata=md, timeout=60)
            self.ids = [
                [stub.ImportAdapter(pb.ImportAdapterRequest(name=a["name"], safetensors=Path(a["path"]).read_bytes()),
                                    metadata=self.metadata(tenant), timeout=120).adapter_id for a in adapters]
                for tenant in range(len(self.tokens))]
            yield self

    def stats(self) -> dict:
        return {}

    def metadata(self, client: int):
        return [("authorization", f"Bearer {self.tokens[client % len(self.tokens)]}")]

    def client(self, index: int):
        stub = self.pb_grpc.SteerServeStub(self.grpc.insecure_channel(self.address))
        md = self.metadata(index)
        ids = self.ids[index % len(self.tokens)]
        pb = self.pb

        def send(req: dict, steps: int) -> None:
            response = stub.Generate(pb.GenerateRequest(prompt=req["prompt"], steps=steps, seed=req["seed"],
                                                        adapters=[pb.AdapterRef(adapter_id=ids[req["adapter"]])]),
                                     metadata=md, timeout=1800)
            if len(response.images) != 1 or not response.images[0].data:
                raise RuntimeError("no image in the answer")

        return send


class Diffusers:
    """bench/race_baseline_server.py in its own process, called over HTTP (keep-alive)."""

    def __init__(self, name: str, model_dir: Path, threads: int, window_ms: float, max_batch: int):
        self.name = name
        self.model_dir = model_dir
        self.threads = threads
        self.window_ms = window_ms
        self.max_batch = max_batch
        self.info: dict = {}

    @contextmanager
    def running(self, adapters: list[dict], log_path: Path, ready_timeout_s: float):
        port = free_port()
        mode = "batched" if self.name.endswith("batched") else "single"
        cmd = [sys.executable, "-m", "bench.race_baseline_server", "--model-dir", str(self.model_dir), "--port", str(port),
               "--mode", mode, "--threads", str(self.threads), "--window-ms", str(self.window_ms),
               "--max-batch", str(self.max_batch)]
        for a in adapters:
            cmd += ["--adapter", f"{a['name']}={a['path']}"]
        with open(log_path, "w") as log:
            server = subprocess.Popen(cmd, env=clean_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        started = time.monotonic()
        try:
            while "listening on" not in log_path.read_text():
                if server.poll() is not None or time.monotonic() - started > ready_timeout_s:
                    raise RuntimeError(f"{self.name}: baseline did not come up:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            self.info["start_seconds"] = time.monotonic() - started
            self.info["server"] = re.search(r"^baseline .*$", log_path.read_text(), re.M).group(0)
            self.port = port
            self.names = [a["name"] for a in adapters]
            yield self
        finally:
            stop_group(server, grace_s=60)

    def stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", "/stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def client(self, index: int):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1800)

        def send(req: dict, steps: int) -> None:
            body = json.dumps(dict(prompt=req["prompt"], adapter=self.names[req["adapter"]], seed=req["seed"],
                                   steps=steps, guidance_scale=GUIDANCE))
            conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")

        return send


# -- the load ---------------------------------------------------------------------------------------


def load(system, clients: int, work: list[list[dict]], steps: int) -> dict:
    """Every client: one uncounted request, the barrier, then its share back to back."""
    senders = [system.client(c) for c in range(clients)]
    barrier = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    ends = [0.0] * clients

    def run(c: int) -> None:
        try:
            senders[c](work[c][0], steps)
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            errors.append(f"warm-up: {exc!r}"[:300])
        barrier.wait()
        for req in work[c][1:]:
            t0 = time.perf_counter()
            try:
                senders[c](req, steps)
                latencies[c].append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
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
    done = [x for per in latencies for x in per]
    return dict(
        clients=clients, requests=sum(len(w) - 1 for w in work), ok=len(done), errors=len(errors),
        error_samples=sorted(set(errors))[:3], seconds=elapsed,
        images_per_s=len(done) / elapsed if elapsed > 0 else 0.0,
        p50_s=percentile(done, 50) if done else None, p99_s=percentile(done, 99) if done else None,
        mean_s=sum(done) / len(done) if done else None,
    )


def race_system(system, adapters, client_counts, requests, steps, seed, ready_timeout_s) -> dict:
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"[{system.name}] starting" + (" (a first start measures the UNet runtimes: minutes)" if system.name in OURS else ""),
          flush=True)
    rows = []
    with system.running(adapters, logs / f"{system.name}.log", ready_timeout_s):
        print(f"[{system.name}] up in {system.info['start_seconds']:.0f} s; "
              + (f"UNet runtime {system.info['unet_runtime']!r}" if "unet_runtime" in system.info else system.info.get("server", "")),
              flush=True)
        send = system.client(0)
        w0 = time.perf_counter()
        for i in range(len(adapters)):  # first use of each adapter, uncounted
            send(dict(prompt=PROMPTS[i % len(PROMPTS)], adapter=i, seed=i), steps)
        system.info["warmup_seconds"] = time.perf_counter() - w0
        for clients in client_counts:
            before = system.stats()
            row = load(system, clients, plan(clients, requests[clients], len(adapters), seed), steps)
            after = system.stats()
            if before and after:  # the batched baseline: images per pipeline call (warm-up round included)
                row["images_per_pipeline_call"] = (after["images"] - before["images"]) / max(1, after["pipeline_calls"] - before["pipeline_calls"])
            rows.append(row)
            p50 = f"{row['p50_s']:.3f}" if row["p50_s"] is not None else "-"
            p99 = f"{row['p99_s']:.3f}" if row["p99_s"] is not None else "-"
            print(f"[{system.name}] {clients:>3} clients: {row['ok']}/{row['requests']} ok, {row['images_per_s']:.3f} img/s, "
                  f"p50 {p50} s, p99 {p99} s ({row['seconds']:.1f} s)"
                  + (f", {row['errors']} errors e.g. {row['error_samples'][0]}" if row["errors"] else ""), flush=True)
    return dict(info=system.info, rows=rows, seconds=time.monotonic() - t0)


# -- ratios and the report --------------------------------------------------------------------------


def ratios(results: dict, client_counts) -> list[dict]:
    """Ours against each diffusers variant and the better of them (by images/s), per client count.
    images/s: ours / theirs (higher is better); p50, p99: ours / theirs (lower is better)."""
    out = []
    for i, clients in enumerate(client_counts):
        row_of = {name: r["rows"][i] for name, r in results.items() if "rows" in r and len(r["rows"]) > i}
        theirs = {n: row_of[n] for n in THEIRS if n in row_of and row_of[n]["ok"]}
        if not theirs:
            continue
        best = max(theirs, key=lambda n: theirs[n]["images_per_s"])
        for ours in OURS:
            if ours not in row_of or not row_of[ours]["ok"]:
                continue
            o = row_of[ours]
            entry = dict(clients=clients, ours=ours, best_diffusers=best)
            for label, name in [("best", best)] + [(n, n) for n in theirs]:
                t = theirs[name]
                entry[label] = dict(images_per_s=o["images_per_s"] / t["images_per_s"],
                                    p50=o["p50_s"] / t["p50_s"], p99=o["p99_s"] / t["p99_s"])
            out.append(entry)
    return out


def default_slots() -> dict:
    """Requests each backend runs at once under the default settings (what the servers here use)."""
    from service.config import Settings

    defaults = Settings.model_construct()  # the declared defaults, no environment
    try:
        return {name: defaults.admission_limits(name).slots for name in OURS}
    except Exception:  # noqa: BLE001 - only a label in the table
        return {}


def machine() -> dict:
    import diffusers
    import peft
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, diffusers=diffusers.__version__,
                peft=peft.__version__, python=platform.python_version())


def render(report: dict) -> str:
    cfg, m, res = report["config"], report["machine"], report["results"]
    lines = [
        "## The race: this service against diffusers + peft behind a minimal server (CPU, embedded model)",
        "",
        f"`{report['command']}` on model `{cfg['model']}`: {cfg['adapters']} distinct LoRA adapters (ranks "
        f"{', '.join(str(a['rank']) for a in cfg['adapter_files'])}), {cfg['steps']} DDIM steps, guidance {GUIDANCE}, "
        f"64x64, one adapter per request drawn with a fixed seed (same plan for every system); every server in its "
        f"own process on the same {m['cores']}-core machine ({m['cpu']}), the clients in a third; run took "
        f"{report['seconds'] / 60:.1f} min, load average {report['load_average_start'][0]:.1f} at the start, "
        f"{report['load_average_end'][0]:.1f} at the end.",
        "",
        "| system | what | torch threads | UNet runtime |",
        "|---|---|---|---|",
    ]
    slots = cfg.get("admission_slots", {})
    what = {
        "inprocess": f"`steerserve serve`, in-process backend, default settings ({slots.get('inprocess', '?')} admission slots)",
        "triton": f"`steerserve serve --backend triton`, embedded Triton, default settings ({slots.get('triton', '?')} admission slots)",
        "diffusers": "StableDiffusionPipeline + peft, `set_adapters` per request, one at a time (lock)",
        "diffusers-batched": f"same, batched by adapter ({cfg['window_ms']:g} ms window, up to {cfg['max_batch']} images a call)",
    }
    for name in SYSTEMS:
        if name not in res:
            continue
        info = res[name].get("info", {})
        threads = report["threads"][name]
        runtime = info.get("unet_runtime", "eager (diffusers)" if name in THEIRS else "")
        choice = info.get("unet_runtime_choice", "")
        runtime_cell = f"{runtime or '(not reported)'}" + (f": {choice}" if choice else "")
        if "error" in res[name]:
            runtime_cell = "**failed**: " + " ".join(res[name]["error"][-300:].split()).replace("|", "/")
        lines.append(f"| {name} | {what[name]} | {threads} | {runtime_cell} |")
    lines += ["", "| clients | system | requests | images/s | p50 s | p99 s | errors | images a pipeline call |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, clients in enumerate(cfg["clients"]):
        for name in SYSTEMS:
            rows = res.get(name, {}).get("rows", [])
            if len(rows) > i:
                r = rows[i]
                p50 = f"{r['p50_s']:.3f}" if r["p50_s"] is not None else "-"
                p99 = f"{r['p99_s']:.3f}" if r["p99_s"] is not None else "-"
                per_call = f"{r['images_per_pipeline_call']:.2f}" if "images_per_pipeline_call" in r else ""
                lines.append(f"| {clients} | {name} | {r['requests']} | {r['images_per_s']:.3f} | {p50} | {p99} | "
                             f"{r['errors']} | {per_call} |")
    lines += ["", "Ratios ours / diffusers: images/s (higher is better for us), p50 and p99 latency (lower is better "
              "for us); `best` is the diffusers variant with more images/s at that client count.", "",
              "| clients | ours | vs | images/s | p50 | p99 |", "|---:|---|---|---:|---:|---:|"]
    for r in report["ratios"]:
        for label in ["best"] + [n for n in THEIRS if n in r]:
            vs = f"best ({r['best_diffusers']})" if label == "best" else label
            x = r[label]
            ips = f"**{x['images_per_s']:.2f}x**" if label == "best" else f"{x['images_per_s']:.2f}x"
            lines.append(f"| {r['clients']} | {r['ours']} | {vs} | {ips} | {x['p50']:.2f} | {x['p99']:.2f} |")
    lines += [""]
    for g in report["goal"]:
        lines.append(f"Goal: >= {GOAL_RATIO:g}x the better diffusers variant's images/s at {GOAL_CLIENTS} clients: "
                     f"{g['ours']} {g['ratio']:.2f}x, **{'met' if g['met'] else 'not met'}**.")
    lines += [
        "",
        "Warm-up, uncounted: each adapter once per system, then one request per client before each client count's "
        "timed part. images/s = timed requests / (last answer - barrier); latency client side, per request; p99 over "
        f"so few requests ({', '.join(str(cfg['requests'][str(c)]) for c in cfg['clients'])}) is close to the maximum. "
        f"Our servers' clients are {cfg['tenants']} tenants (client i is tenant i mod {cfg['tenants']}; each imported the same "
        "adapter files, stored once): by default one tenant may have 16 requests waiting, more are refused. "
        "The diffusers servers flush denormals and set torch's thread count on the threads that run the pipeline, "
        "as the service's engine does. The systems run one after another (each server alone on the machine), so "
        "load from other processes on this shared machine can hit one more than another. On a CPU a batched UNet "
        "call costs about the sum of its rows; GPU figures would differ, none was available.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    ap.add_argument("--requests", default="",
                    help="timed requests per client count: one number for all, or one per client count "
                         "(default 24, 64, 128 for 1, 8, 32 clients; 4 per client otherwise, at least 16)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--threads", type=int, default=0,
                    help="the diffusers servers' torch threads (0: torch's default here)")
    ap.add_argument("--window-ms", type=float, default=10.0, help="diffusers-batched: the batching window")
    ap.add_argument("--max-batch", type=int, default=16, help="diffusers-batched: most images in one pipeline call")
    ap.add_argument("--tenants", type=int, default=4,
                    help="our servers: client i calls as tenant i %% TENANTS (one tenant may have 16 requests waiting)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds a server may take to come up")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for race.json and race.md")
    args = ap.parse_args(argv)

    import torch

    from service.engine.default_model import default_model_dir

    client_counts = [int(c) for c in args.clients.split(",") if c]
    given = [int(n) for n in args.requests.split(",") if n]
    if given and len(given) not in (1, len(client_counts)):
        ap.error("--requests: one number, or one per client count")
    requests = {}
    for i, c in enumerate(client_counts):
        n = given[0 if len(given) == 1 else i] if given else DEFAULT_REQUESTS.get(c, max(16, 4 * c))
        requests[c] = -(-max(n, c) // c) * c  # a whole number of requests per client
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"--systems: unknown {', '.join(sorted(unknown))} (known: {', '.join(SYSTEMS)})")
    default_threads = torch.get_num_threads()  # nothing in this process has set it: torch's default here
    threads = args.threads or default_threads
    command = " ".join(["python -m bench.race", *(sys.argv[1:] if argv is None else argv)])

    started = time.time()
    load_start = os.getloadavg()
    model_dir = default_model_dir(CACHE / "models")
    adapters = write_adapters(model_dir, args.adapters)
    print(f"model {model_dir.name}; {len(adapters)} adapters; clients {client_counts}; timed requests "
          f"{[requests[c] for c in client_counts]}; {args.steps} steps; systems {systems}", flush=True)

    results: dict = {}
    for name in systems:
        system = (Ours(name, model_dir, args.tenants) if name in OURS
                  else Diffusers(name, model_dir, threads, args.window_ms, args.max_batch))
        try:
            results[name] = race_system(system, adapters, client_counts, requests, args.steps, args.seed, args.ready_timeout)
        except Exception as exc:  # noqa: BLE001 - the others still race; the table says which failed
            print(f"[{name}] FAILED: {exc}", flush=True)
            results[name] = dict(info=system.info, error=str(exc)[-2000:])

    table = ratios(results, client_counts)
    goal = [dict(ours=r["ours"], ratio=r["best"]["images_per_s"], met=r["best"]["images_per_s"] >= GOAL_RATIO)
            for r in table if r["clients"] == GOAL_CLIENTS]
    report = dict(
        command=command,
        machine=machine(),
        load_average_start=load_start,
        load_average_end=os.getloadavg(),
        seconds=time.time() - started,
        config=dict(model=model_dir.name, steps=args.steps, adapters=args.adapters, guidance_scale=GUIDANCE,
                    size=64, clients=client_counts, requests={str(c): requests[c] for c in client_counts},
                    systems=systems, admission_slots=default_slots(), seed=args.seed, tenants=args.tenants, window_ms=args.window_ms, max_batch=args.max_batch,
                    prompts=PROMPTS,
                    adapter_files=[dict(name=a["name"], rank=a["rank"], alpha=2.0 * a["rank"]) for a in adapters]),
        threads={
            "inprocess": f"{Settings.model_construct().torch_threads} on the model thread (STEERSERVE_TORCH_THREADS default; two 2-thread OpenMP teams in one process fight for 2 cores)",
            "triton": "1 per Triton model instance, each its own process (STEERSERVE_TORCH_THREADS default)",
            "diffusers": str(threads), "diffusers-batched": str(threads),
        },
        results=results,
        ratios=table,
        goal=goal,
    )
    write_results(Path(args.out), "race", report, render(report))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
