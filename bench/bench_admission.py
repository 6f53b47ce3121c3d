"""A flood from one tenant against another tenant's single request: admission vs a plain FIFO queue.

    python -m bench.bench_admission           # writes bench/results/admission.{json,md}

One process, the embedded model on the in-process backend (one engine worker). Tenant A sends
--flood Generate requests at once, each with a --deadline; 0.3 s later tenant B sends one. Two
policies, alternating round by round:
- fifo: what the gateway did before admission (and what a plain queue in front of a model does):
  every request queued in arrival order, expired ones dropped when their turn comes;
- admission: service/admission (fair order by tenant, refusal at once when the estimated wait
  misses the deadline).
Reported per policy (medians over rounds): B's latency against its unloaded latency, how A's
requests ended (completed / refused / deadline exceeded), how long refusals and expiries took.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import add_run_arguments, start_run, write_results
from service.admission import Admission, AdmissionLimits, generate_cost
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--flood", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=8.0, help="the flood's deadline, seconds")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    started = start_run(args)
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
