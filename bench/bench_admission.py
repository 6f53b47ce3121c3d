"""A flood from one tenant against another tenant's single request: admission vs a plain FIFO queue;
with --width, how many requests admission runs at once (the batch width) against the fixed 8.

    python -m bench.bench_admission           # writes bench/results/admission.{json,md}
    python -m bench.bench_admission --width   # writes bench/results/batch_width.{json,md}

One process, the embedded model on the in-process backend (one engine worker). Tenant A sends
--flood Generate requests at once, each with a --deadline; 0.3 s later tenant B sends one. Two
policies, alternating round by round:
- fifo: what the gateway did before admission (and what a plain queue in front of a model does):
  every request queued in arrival order, expired ones dropped when their turn comes;
- admission: service/admission (fair order by tenant, refusal at once when the estimated wait
  misses the deadline).
Reported per policy (medians over rounds): B's latency against its unloaded latency, how A's
requests ended (completed / refused / deadline exceeded), how long refusals and expiries took.

--width (issue 34): the in-process backend with its step batcher, admission with 8 slots, tenant A
sending --width-flood requests at once (no deadline), B one 0.3 s later. Two devices:
- this CPU (the embedded model; the model thread on --threads threads), where a UNet call costs
  about the sum of its rows;
- a GPU-like stand-in: the same engine with `predict_noise` replaced by a sleep of
  --fixed-ms + --row-ms per row (returning zeros), a call's cost that barely grows with its rows.
On each, admission runs "fixed 8" (what it did before: 8 at once, the slots) against "measured"
(the batch width the backend measured: service/engine/width.py), and on the stand-in also
"1 at once" (what a CPU-like width would do there). Reported: the width, B's latency against B
alone, the flood's throughput and A's median latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import add_run_arguments, start_run, write_results
from service.admission import Admission, AdmissionLimits, BatchWidth, generate_cost
from service.backends.base import BackendBusy
from service.backends.inprocess import InProcessBackend
from service.engine.default_model import default_model_dir
from service.engine.pipeline import Engine, GenerationCancelled, GenerationSpec


async def one(policy, backend, admission, tenant, spec, timeout):
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    try:
        if policy == "admission":
            await admission.run(tenant, "generate", generate_cost(spec), deadline,
                                lambda: backend.generate(spec, deadline))
        else:
            await backend.generate(spec, deadline)
        outcome = "completed"
    except BackendBusy:
        outcome = "refused"
    except GenerationCancelled:
        outcome = "deadline exceeded"
    return outcome, time.monotonic() - t0


async def scenario(policy, backend, admission, spec, flood: int, deadline: float):
    flood_tasks = [asyncio.ensure_future(one(policy, backend, admission, "A", spec, deadline)) for _ in range(flood)]
    await asyncio.sleep(0.3)
    b = await one(policy, backend, admission, "B", spec, 120.0)
    a = await asyncio.gather(*flood_tasks)
    return b, a


async def main_async(args) -> dict:
    model_dir = default_model_dir(Path(tempfile.gettempdir()) / "steerserve-models")
    engine = Engine.from_pretrained(model_dir)
    backend = InProcessBackend(engine, model_dir, workers=1)
    spec = GenerationSpec(prompt="a red circle on a blue background", steps=args.steps, seed=1)
    admission = Admission(AdmissionLimits(slots=1, max_queue=10_000, tenant_max_queued=10_000))
    for _ in range(3):  # warm up; admission measures seconds per unit here
        await one("admission", backend, admission, "warmup", spec, 120.0)
    solo = statistics.median([(await one("fifo", backend, admission, "B", spec, 120.0))[1] for _ in range(3)])
    rounds = {"fifo": [], "admission": []}
    for _ in range(args.rounds):
        for policy in rounds:
            rounds[policy].append(await scenario(policy, backend, admission, spec, args.flood, args.deadline))
    await backend.close()
    report = {"solo_seconds": solo, "steps": args.steps, "flood": args.flood, "deadline": args.deadline,
              "rounds": args.rounds, "policies": {}}
    for policy, results in rounds.items():
        b = statistics.median(r[0][1] for r in results)
        outcomes = {}
        for kind in ("completed", "refused", "deadline exceeded"):
            times = [t for r in results for o, t in r[1] if o == kind]
            outcomes[kind] = dict(count=len(times) / len(results), max_seconds=max(times) if times else None)
        report["policies"][policy] = dict(b_seconds=b, b_vs_solo=b / solo, b_outcomes=[r[0][0] for r in results],
                                          flood=outcomes)
    return report


# -- --width: the batch width admission runs at once, on this CPU and on a GPU-like stand-in ------


def gpu_like(engine, fixed_ms: float, row_ms: float) -> None:
    """The engine's UNet calls become a sleep of fixed + per-row milliseconds (zeros out): what a
    GPU's call costs, without one. (Bench only.)"""

    def predict_noise(latents, timesteps, embeds, rows):
        time.sleep((fixed_ms + row_ms * latents.shape[0]) / 1000)
        return torch.zeros_like(latents)

    engine.predict_noise = predict_noise


async def width_round(backend, admission, spec, flood: int) -> dict:
    """A sends `flood` at once, B one 0.3 s later; B's latency, the flood's throughput."""
    async def one(tenant):
        t0 = time.monotonic()
        await admission.run(tenant, "generate", generate_cost(spec), None, lambda: backend.generate(spec, None))
        return time.monotonic() - t0

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one("A")) for _ in range(flood)]
    await asyncio.sleep(0.3)
    width = admission.running("A")
    b = await one("B")
    a = await asyncio.gather(*tasks)
    return dict(b_seconds=b, a_median=statistics.median(a), seconds=time.monotonic() - t0, width=width)


async def width_case(backend, spec, policies: dict, flood: int, rounds: int) -> dict:
    """Each policy (an Admission factory) `rounds` times, alternating; B alone measured between."""
    for _ in range(3):  # warm up
        await backend.generate(spec, None)
    solo, results = [], {name: [] for name in policies}
    for _ in range(rounds):
        for name, make in policies.items():
            t0 = time.monotonic()
            await backend.generate(spec, None)
            solo.append(time.monotonic() - t0)
            results[name].append(await width_round(backend, make(), spec, flood))
    alone = statistics.median(solo)
    out = {"b_alone_seconds": alone, "b_alone_spread": [min(solo), max(solo)], "policies": {}}
    for name, rs in results.items():
        b = statistics.median(r["b_seconds"] for r in rs)
        out["policies"][name] = dict(
            width=statistics.median(r["width"] for r in rs), b_seconds=b, b_vs_alone=b / alone,
            b_vs_alone_rounds=[r["b_seconds"] / alone for r in rs],
            throughput=statistics.median((flood + 1) / r["seconds"] for r in rs),
            a_median_seconds=statistics.median(r["a_median"] for r in rs))
    return out


async def width_main(args) -> dict:
    from service.backends.inprocess import InProcessBackend

    model_dir = default_model_dir(Path(tempfile.gettempdir()) / "steerserve-models")
    spec = GenerationSpec(prompt="a red circle on a blue background", steps=args.steps, seed=1)
    report = {"steps": args.steps, "flood": args.width_flood, "rounds": args.rounds, "threads": args.threads,
              "stand_in": {"fixed_ms": args.fixed_ms, "row_ms": args.row_ms}, "cases": {}}
    for case in ("cpu", "gpu-like"):
        engine = Engine.from_pretrained(model_dir)
        if case == "gpu-like":
            gpu_like(engine, args.fixed_ms, args.row_ms)
        backend = InProcessBackend(engine, model_dir, workers=1, torch_threads=args.threads)
        await asyncio.wrap_future(backend.batcher.measure_width())  # (the constructor's is queued before it)
        width = backend.batch_width
        limits = dict(slots=8, max_queue=10_000, tenant_max_queued=10_000)
        policies = {"fixed 8": lambda: Admission(AdmissionLimits(**limits)),
                    "measured": lambda: Admission(AdmissionLimits(**limits), width=width)}
        if case == "gpu-like":
            policies["1 at once"] = lambda: Admission(AdmissionLimits(**{**limits, "slots": 1}))
        result = await width_case(backend, spec, policies, args.width_flood, args.rounds)
        fit = width.fit()
        result.update(fixed_ms=1000 * fit[0], row_ms=1000 * fit[1], measured_width=width.requests(8),
                      slowdown_8=width.slowdown(8), described=width.describe())
        report["cases"][case] = result
        await backend.close()
    return report


def width_markdown(report: dict, args) -> str:
    cpu, gpu = report["cases"]["cpu"], report["cases"]["gpu-like"]
    lines = [
        f"# Batch width: how many requests admission runs at once ({report['date']}, 2-core CPU, no GPU)",
        "",
        f"`python -m bench.bench_admission --width`: the in-process backend (step batcher), admission with 8 slots; "
        f"tenant A sends {report['flood']} Generate calls ({report['steps']} steps, no deadline) at once, 0.3 s later "
        f"tenant B sends one. Medians of {report['rounds']} rounds per policy, policies alternating, B alone measured "
        "between rounds. 'fixed 8': 8 at once (before issue 34); 'measured': the width the backend measured "
        "(service/engine/width.py: the widest whose calls cost each request at most 1.4x its time alone).",
        "",
        "| device | policy | at once | B alone | B under the flood | B vs alone (rounds) | requests/s | A's median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, r in (("this CPU (embedded model)", cpu),
                    (f"GPU-like stand-in ({report['stand_in']['fixed_ms']:g} ms + "
                     f"{report['stand_in']['row_ms']:g} ms a row)", gpu)):
        for name, p in r["policies"].items():
            rounds = ", ".join(f"{x:.1f}" for x in p["b_vs_alone_rounds"])
            lines.append(f"| {case} | {name} | {p['width']:.0f} | {r['b_alone_seconds']:.2f} s | "
                         f"{p['b_seconds']:.2f} s | **{p['b_vs_alone']:.1f}x** ({rounds}) | {p['throughput']:.2f} | "
                         f"{p['a_median_seconds']:.2f} s |")
    lines += [
        "",
        f"Measured cost of a step (the UNet call and the requests' own steps) at the end: this CPU "
        f"{cpu['fixed_ms']:.1f} ms + {cpu['row_ms']:.2f} ms a row (8 requests at once: {cpu['slowdown_8']:.2f}x slower "
        f"each), width {cpu['measured_width']}; the stand-in {gpu['fixed_ms']:.1f} ms + {gpu['row_ms']:.2f} ms a row "
        f"({gpu['slowdown_8']:.2f}x), width {gpu['measured_width']} of 8. 'at once' is A's requests running when B "
        f"arrived (median). B alone varied {cpu['b_alone_spread'][0]:.2f}-{cpu['b_alone_spread'][1]:.2f} s on the "
        "CPU across rounds: a shared 2-core machine, loaded by other work; take differences under ~20% as noise.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--flood", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=8.0, help="the flood's deadline, seconds")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", action="store_true", help="the batch-width comparison (batch_width.md)")
    parser.add_argument("--width-flood", type=int, default=16)
    parser.add_argument("--fixed-ms", type=float, default=30.0, help="the GPU-like stand-in's cost of a call")
    parser.add_argument("--row-ms", type=float, default=0.5, help="... and of each row")
    args = parser.parse_args(argv)
    started = start_run(args)
    if args.width:
        report = asyncio.run(width_main(args))
        report["date"], report["seconds"] = time.strftime("%Y-%m-%d"), time.time() - started
        write_results(args.out_dir, "batch_width", report, width_markdown(report, args))
        return
    report = asyncio.run(main_async(args))
    report["date"], report["seconds"] = time.strftime("%Y-%m-%d"), time.time() - started
    lines = [
        f"# Admission under a flood ({report['date']}, CPU, {args.threads} threads, one engine worker)",
        "",
        f"`python -m bench.bench_admission`: tenant A sends {args.flood} Generate calls ({args.steps} steps) at once, "
        f"each with a {args.deadline:g} s deadline; 0.3 s later tenant B sends one. Unloaded, one takes "
        f"{report['solo_seconds']:.2f} s. Medians of {args.rounds} rounds per policy, policies alternating.",
        "",
        "| policy | B's latency | B vs unloaded | A completed | A refused (slowest answer) | A deadline exceeded (slowest answer) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for policy, p in report["policies"].items():
        f = p["flood"]

        def cell(kind):
            c = f[kind]
            return f"{c['count']:.0f}" + (f" ({c['max_seconds']:.2f} s)" if c["max_seconds"] is not None else "")

        lines.append(f"| {policy} | {p['b_seconds']:.2f} s | {p['b_vs_solo']:.1f}x | {f['completed']['count']:.0f} | "
                     f"{cell('refused')} | {cell('deadline exceeded')} |")
    lines.append("")
    write_results(args.out_dir, "admission", report, "\n".join(lines))


if __name__ == "__main__":
    main()
