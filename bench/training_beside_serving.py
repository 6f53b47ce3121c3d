"""Training beside serving: Generate latency with 0, 1 and 2 personalization jobs training on the
same replica, and the jobs' speed next to serving, with the rule "serving first, training in the
gaps" (service/engine/priority.py) against the same server without it (both share the machine as the
OS schedules them: what the service did before).

    python -m bench.training_beside_serving [--systems inprocess,triton] [--clients 8] [--requests 96]
        [--steps 20] [--window 20] [--period 4] [--out bench/results]

Per system (a `steerserve serve` process: in-process, or the embedded Triton whose `personalize`
model trains), and per rule (STEERSERVE_SERVING_FIRST=1, then =0), with STEERSERVE_TRAINING_WORKERS=2
(two jobs train at once) and otherwise default settings:
1. serving alone: `--clients` clients send `--requests` Generate requests back to back (no adapter,
   `--steps` steps, 64x64): p50/p99;
2. job A (DreamBooth-LoRA, 5000 steps, no prior preservation: steps of one cost) starts; its speed
   alone over `--window` seconds; then the same load with it training: p50/p99 and its speed;
3. job B too: both jobs' speed alone, then the load with both: p50/p99 and their speed;
4. serving idle half the time: the clients send only in alternate `--period`-second halves, for
   `3 * --window` seconds: the jobs' speed relative to theirs alone (2 jobs, then 1 after B is
   cancelled).
Training speed is optimisation steps a second from the gateway's `steerserve_training_steps_total`
(every step of every job), latency client side. Goals: p99 with 2 jobs <= 1.2x p99 with none;
training keeps >= 70% of its speed alone when serving is idle half the time.

Writes <out>/training_beside_serving.{json,md}. Logs: var/bench-cache/cotrain/logs/.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from bench.common import ROOT, serve_process, write_results
from bench.race import machine, percentile

CACHE = ROOT / "var" / "bench-cache" / "cotrain"
SYSTEMS = ("inprocess", "triton")
P99_GOAL = 1.2  # p99 with 2 jobs / p99 with none, at most
TRAINING_GOAL = 0.7  # training speed with serving idle half the time / alone, at least
JOB_STEPS = 5000


class Server:
    def __init__(self, name: str, serving_first: bool, model_dir: Path):
        self.name, self.serving_first, self.model_dir = name, serving_first, model_dir
        self.label = f"{name}, serving first" if serving_first else f"{name}, no rule"
        self.tokens = ["cotrain-a", "cotrain-b"]

    @contextmanager
    def running(self, ready_timeout_s: float):
        import grpc

        from service._generated.steerserve.v1 import steerserve_pb2 as pb
        from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc

        self.pb, self.grpc = pb, grpc
        logs = CACHE / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{self.name}-{'first' if self.serving_first else 'norule'}.log"
        keys = {t: f"tenant-{i}" for i, t in enumerate(self.tokens)}
        settings = dict(STEERSERVE_TRAINING_WORKERS="2", STEERSERVE_SERVING_FIRST="1" if self.serving_first else "0")
        with serve_process(self.model_dir, log_path, ready_timeout_s, self.label, backend=self.name,
                           data_dir=CACHE / self.name, api_keys=keys, settings=settings) as served:
            self.process, self.address, self.metrics_url = served.process, served.address, served.metrics_url
            self.stub = pb_grpc.SteerServeStub(grpc.insecure_channel(self.address))
            self.stubs = [pb_grpc.SteerServeStub(grpc.insecure_channel(self.address)) for _ in range(64)]
            yield self

    def md(self, tenant: int = 0):
        return [("authorization", f"Bearer {self.tokens[tenant]}")]

    def training_steps(self) -> float:
        text = urllib.request.urlopen(self.metrics_url, timeout=30).read().decode()
        return sum(float(m.group(1)) for m in re.finditer(r"^steerserve_training_steps_total\{[^}]*\} (\S+)$", text, re.M))

    def start_job(self, tenant: int, name: str) -> str:
        from PIL import Image

        from service.research.world.heldout import CONCEPTS

        pb = self.pb
        images = []
        for s in CONCEPTS["purple-dotted-heart"].references(3, seed=0):
            buf = io.BytesIO()
            Image.fromarray(s.image).save(buf, format="PNG")
            images.append(pb.Image(data=buf.getvalue()))
        job = self.stub.Personalize(pb.PersonalizeRequest(
            method=pb.DREAMBOOTH_LORA, name=f"{name}-{time.time_ns()}", images=images, class_word="heart",
            options=pb.TrainingOptions(steps=JOB_STEPS, batch_size=1, prior_loss_weight=0.0)),
            metadata=self.md(tenant), timeout=120)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # until it has trained a few steps
            got = self.stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=self.md(tenant), timeout=60)
            if got.state == pb.RUNNING and got.step >= 5:
                return job.job_id
            if got.state in (pb.FAILED, pb.CANCELLED, pb.SUCCEEDED):
                raise RuntimeError(f"job {job.job_id} ended {got.state}: {got.message}")
            time.sleep(0.5)
        raise RuntimeError(f"job {job.job_id} did not start training")

    def cancel(self, tenant: int, job_id: str) -> None:
        self.stub.CancelJob(self.pb.CancelJobRequest(job_id=job_id), metadata=self.md(tenant), timeout=60)

    def generate(self, i: int, seed: int, steps: int) -> None:
        pb = self.pb
        response = self.stubs[i % len(self.stubs)].Generate(
            pb.GenerateRequest(prompt="a red dotted star on a blue striped background", steps=steps, seed=seed),
            metadata=self.md(i % 2), timeout=600)
        if len(response.images) != 1:
            raise RuntimeError("no image")


def training_rate(server: Server, seconds: float) -> float:
    """Training steps a second (all jobs) over `seconds` of nothing else."""
    before, t0 = server.training_steps(), time.monotonic()
    time.sleep(seconds)
    return (server.training_steps() - before) / (time.monotonic() - t0)


def serving_load(server: Server, clients: int, requests: int, steps: int) -> dict:
    """`clients` clients, `requests` in all back to back; p50/p99 and training steps/s meanwhile."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    for c in range(clients):  # warm-up: one each, uncounted
        server.generate(c, c, steps)

    def run(c: int) -> None:
        for j in range(c, requests, clients):
            t0 = time.perf_counter()
            try:
                server.generate(c, j, steps)
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors.append(repr(exc)[:200])

    before, t0 = server.training_steps(), time.monotonic()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    return dict(requests=requests, ok=len(latencies), errors=len(errors), seconds=seconds,
                images_per_s=len(latencies) / seconds, p50_s=percentile(latencies, 50), p99_s=percentile(latencies, 99),
                training_steps_per_s=(server.training_steps() - before) / seconds)


def half_idle(server: Server, clients: int, steps: int, period: float, seconds: float) -> dict:
    """Clients send back to back during alternate `period`-second halves (serving busy about half
    the time); training steps/s over the whole window."""
    stop = threading.Event()
    start = time.monotonic()
    served = [0]
    lock = threading.Lock()

    def busy_half() -> bool:
        return int((time.monotonic() - start) / period) % 2 == 0

    def run(c: int) -> None:
        j = 0
        while not stop.is_set():
            if not busy_half():
                time.sleep(0.05)
                continue
            server.generate(c, 10_000 + c * 1000 + j, steps)
            j += 1
            with lock:
                served[0] += 1

    before = server.training_steps()
    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    rate = (server.training_steps() - before) / (time.monotonic() - start)
    for t in threads:
        t.join()
    return dict(seconds=seconds, period_s=period, requests=served[0], training_steps_per_s=rate)


def run_system(server: Server, args) -> dict:
    out: dict = {}
    t0 = time.monotonic()
    print(f"[{server.label}] starting", flush=True)
    with server.running(args.ready_timeout):
        out["no_jobs"] = serving_load(server, args.clients, args.requests, args.steps)
        print(f"[{server.label}] 0 jobs: p50 {out['no_jobs']['p50_s']:.3f} p99 {out['no_jobs']['p99_s']:.3f}", flush=True)
        job_a = server.start_job(0, "cotrain-a")
        out["alone_1"] = training_rate(server, args.window)
        out["one_job"] = serving_load(server, args.clients, args.requests, args.steps)
        print(f"[{server.label}] 1 job: alone {out['alone_1']:.2f} steps/s; with serving {out['one_job']['training_steps_per_s']:.2f}; "
              f"p50 {out['one_job']['p50_s']:.3f} p99 {out['one_job']['p99_s']:.3f}", flush=True)
        job_b = server.start_job(1, "cotrain-b")
        out["alone_2"] = training_rate(server, args.window)
        out["two_jobs"] = serving_load(server, args.clients, args.requests, args.steps)
        print(f"[{server.label}] 2 jobs: alone {out['alone_2']:.2f} steps/s; with serving {out['two_jobs']['training_steps_per_s']:.2f}; "
              f"p50 {out['two_jobs']['p50_s']:.3f} p99 {out['two_jobs']['p99_s']:.3f}", flush=True)
        out["half_idle_2"] = half_idle(server, args.clients, args.steps, args.period, 3 * args.window)
        server.cancel(1, job_b)
        time.sleep(3)
        out["half_idle_1"] = half_idle(server, args.clients, args.steps, args.period, 3 * args.window)
        server.cancel(0, job_a)
        print(f"[{server.label}] serving idle half the time: 2 jobs {out['half_idle_2']['training_steps_per_s']:.2f} steps/s, "
              f"1 job {out['half_idle_1']['training_steps_per_s']:.2f}", flush=True)
    none = out["no_jobs"]["p99_s"]
    out["ratios"] = dict(
        p99_one_job=out["one_job"]["p99_s"] / none, p99_two_jobs=out["two_jobs"]["p99_s"] / none,
        p50_one_job=out["one_job"]["p50_s"] / out["no_jobs"]["p50_s"],
        p50_two_jobs=out["two_jobs"]["p50_s"] / out["no_jobs"]["p50_s"],
        training_one_job_busy=out["one_job"]["training_steps_per_s"] / out["alone_1"],
        training_two_jobs_busy=out["two_jobs"]["training_steps_per_s"] / out["alone_2"],
        training_two_jobs_half_idle=out["half_idle_2"]["training_steps_per_s"] / out["alone_2"],
        training_one_job_half_idle=out["half_idle_1"]["training_steps_per_s"] / out["alone_1"],
    )
    out["seconds"] = time.monotonic() - t0
    return out


def render(report: dict) -> str:
    cfg, m = report["config"], report["machine"]
    lines = [
        "## Training beside serving (CPU, embedded model)",
        "",
        f"`{report['command']}`: {cfg['clients']} clients, {cfg['requests']} Generate requests a load ({cfg['steps']} steps, "
        f"64x64, no adapter); jobs: DreamBooth-LoRA, batch 1, no prior preservation, two trained at once "
        f"(`STEERSERVE_TRAINING_WORKERS=2`); speed alone over {cfg['window']} s; serving idle half the time = clients "
        f"sending in alternate {cfg['period']} s halves for {3 * cfg['window']} s. {m['cores']} cores ({m['cpu']}); run took "
        f"{report['seconds'] / 60:.1f} min.",
        "",
        "| server | jobs | Generate p50 s | p99 s | p99 / none | training steps/s (all jobs) | / alone |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {label} | **failed**: {' '.join(r['error'][-300:].split())} | | | | | |")
            continue
        q = r["ratios"]
        lines.append(f"| {label} | 0 | {r['no_jobs']['p50_s']:.3f} | {r['no_jobs']['p99_s']:.3f} | 1.00x | - | - |")
        lines.append(f"| {label} | 1 | {r['one_job']['p50_s']:.3f} | {r['one_job']['p99_s']:.3f} | {q['p99_one_job']:.2f}x | "
                     f"{r['one_job']['training_steps_per_s']:.2f} (alone {r['alone_1']:.2f}) | {q['training_one_job_busy']:.0%} |")
        lines.append(f"| {label} | 2 | {r['two_jobs']['p50_s']:.3f} | {r['two_jobs']['p99_s']:.3f} | **{q['p99_two_jobs']:.2f}x** | "
                     f"{r['two_jobs']['training_steps_per_s']:.2f} (alone {r['alone_2']:.2f}) | {q['training_two_jobs_busy']:.0%} |")
    lines += ["", "Serving idle half the time: training speed relative to the same jobs alone (goal >= "
              f"{TRAINING_GOAL:.0%}); and the goals:", "",
              "| server | 1 job | 2 jobs | p99 with 2 jobs / none (goal <= 1.2x) | training, serving half idle (goal >= 70%) |",
              "|---|---:|---:|---|---|"]
    for label, r in report["results"].items():
        if "error" in r:
            continue
        q = r["ratios"]
        p99_met = q["p99_two_jobs"] <= P99_GOAL
        train_met = min(q["training_one_job_half_idle"], q["training_two_jobs_half_idle"]) >= TRAINING_GOAL
        lines.append(f"| {label} | {q['training_one_job_half_idle']:.0%} | {q['training_two_jobs_half_idle']:.0%} | "
                     f"{q['p99_two_jobs']:.2f}x {'met' if p99_met else 'not met'} | {'met' if train_met else 'not met'} |")
    lines += ["", "`serving first` is the default (`STEERSERVE_SERVING_FIRST=1`); `no rule` is the same server with it "
              "off: serving's model thread and the training threads share the cores as the OS schedules them. On a CPU "
              "the rule gives serving its model thread's cores while requests are in flight and lets training "
              "steps use the rest (one core of two here: with two jobs one trains at a time while serving is busy); "
              "on a GPU it gives serving the whole device (docs/training_beside_serving.md). No GPU was available "
              "for these figures."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--rules", default="first,none", help="serving first, no rule, or both (comma-separated)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--window", type=float, default=20.0, help="seconds a training speed is measured over")
    ap.add_argument("--period", type=float, default=4.0, help="seconds of each busy or idle half")
    ap.add_argument("--ready-timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    from service.research.basemodel import DEFAULT_MODEL_DIR

    started = time.monotonic()
    report = dict(command="python -m bench.training_beside_serving " + " ".join(sys.argv[1:] if argv is None else argv),
                  config=dict(clients=args.clients, requests=args.requests, steps=args.steps, window=args.window,
                              period=args.period), machine=machine(), results={})
    for name in [s for s in args.systems.split(",") if s]:
        for rule in [r for r in args.rules.split(",") if r]:
            server = Server(name, rule == "first", Path(DEFAULT_MODEL_DIR))
            try:
                report["results"][server.label] = run_system(server, args)
            except Exception as exc:  # noqa: BLE001 - reported; the others still run
                report["results"][server.label] = dict(error=repr(exc)[-2000:])
                print(f"[{server.label}] failed: {exc!r}"[:3000], flush=True)
    report["seconds"] = time.monotonic() - started
    write_results(args.out, "training_beside_serving", report, render(report))
    return 0 if all("error" not in r for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
