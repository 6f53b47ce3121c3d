"""The recorded sweep that chose each subject method's defaults, on the DEV split only.

    python -m bench.sweep_personalize                         # every method's grid (cells cached)
    python -m bench.sweep_personalize --methods DREAMBOOTH_LORA

Each grid row is one training configuration, trained once per dev concept to its largest step
count; the smaller counts are that run's snapshots (the k-step job exactly: a step's randomness is
a function of (seed, step)). Every (configuration, steps) is scored like the report
(bench/quality_personalize.py, same cells and cache) and the rule below picks the default:

    highest mean fidelity among settings whose context kept (background kind + colour) is >= 85%;
    between settings within 2 points of it, the cheapest (fewest steps x batch). When no setting
    keeps the context that well, the highest fidelity + context (a setting that learns nothing, or
    that draws the concept on the references' backgrounds, is not a default).

The chosen values go into the embedded model's profile (service/profiles.py) by hand, with this
table as their source; the test split is then reported by `python -m bench.quality_personalize`.
Writes bench/results/sweep_personalize.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from bench.common import add_run_arguments, start_run
from bench.evaluation import ResultCache, estimate, progress, write_outputs
from bench.quality_personalize import METHOD_SHORT, Sampling, Setup, after_cells, resolved_settings, settings_text
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.personalize import SUBJECT_METHODS
from service.research.world.heldout import CONCEPTS, DEV, split

CONTEXT_FLOOR = 0.85
TIE_POINTS = 0.02

# (overrides, step counts): the last count is trained, the others are its snapshots. Every row is
# resolved over SWEEP_BASE, not over the current profile: writing the sweep's choice into the
# profile must not change the sweep.
SWEEP_BASE = {"prior_loss_weight": 0.0, "num_class_images": 16, "train_text_encoder": False}
GRID: dict[str, list[tuple[dict, tuple[int, ...]]]] = {
    "DREAMBOOTH_LORA": [
        ({"learning_rate": 1e-3, "batch_size": 2, "rank": 8}, (300, 600, 900)),
        ({"learning_rate": 3e-3, "batch_size": 2, "rank": 8}, (300, 600, 900)),
        ({"learning_rate": 1e-3, "batch_size": 2, "rank": 8, "prior_loss_weight": 1.0}, (300, 600, 900)),
        ({"learning_rate": 1e-3, "batch_size": 2, "rank": 8, "train_text_encoder": True}, (300, 600, 900)),
    ],
    "TEXTUAL_INVERSION": [
        ({"learning_rate": 5e-2, "batch_size": 4}, (300, 600, 900)),
        ({"learning_rate": 1.5e-2, "batch_size": 4}, (300, 600, 900)),
    ],
    "CUSTOM_DIFFUSION": [
        ({"learning_rate": 5e-3, "batch_size": 4, "rank": 8}, (300, 600, 900)),
        ({"learning_rate": 1.5e-3, "batch_size": 4, "rank": 8}, (300, 600, 900)),
        ({"learning_rate": 5e-3, "batch_size": 4, "rank": 8, "prior_loss_weight": 1.0}, (300, 600)),
    ],
}


def choose(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["context"]["mean"] >= CONTEXT_FLOOR]
    if not ok:
        return max(rows, key=lambda r: r["agreement"]["mean"] + r["context"]["mean"], default=None)
    best = max(r["agreement"]["mean"] for r in ok)
    near = [r for r in ok if r["agreement"]["mean"] >= best - TIE_POINTS]
    return min(near, key=lambda r: (r["settings"]["steps"] * r["settings"]["batch_size"], -r["agreement"]["mean"]))


def markdown(report: dict) -> str:
    pct = lambda e: f"{e['mean']:.0%} [{e['lo'] * 100:.0f}, {e['hi'] * 100:.0f}]"  # noqa: E731
    s = report["settings"]
    lines = [f"Sweep on the **dev split** ({', '.join(s['concepts'])}); {s['sampling']['seeds']} seeds x 6 contexts "
             f"per concept. Mean over units (concept x seed) [95% interval, concepts resampled, then seeds], n = units. Rule: highest "
             f"fidelity with context kept >= {CONTEXT_FLOOR:.0%}; within {TIE_POINTS * 100:.0f} points, the cheapest; "
             "if no setting keeps the context that well, the highest fidelity + context.", ""]
    for method, m in report["methods"].items():
        lines += [f"### {METHOD_SHORT[method]}", "", "| settings | fidelity | shape | colour | context kept | n | chosen |",
                  "|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            chosen = "**yes**" if m["chosen"] and r["settings"] == m["chosen"]["settings"] else ""
            lines.append(f"| {r['text']} | {pct(r['agreement'])} | {pct(r['shape'])} | {pct(r['color'])} | "
                         f"{pct(r['context'])} | {r['agreement']['n']} | {chosen} |")
        lines.append("")
    lines.append(f"Reproduce: `python -m bench.sweep_personalize` ({report['seconds']:.0f} s on {report['machine']}, "
                 f"{report['cache']['misses']} cells computed, {report['cache']['hits']} from the cache).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--methods", nargs="+", default=list(SUBJECT_METHODS))
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="compute only every N-th training (from the I-th): run N processes with --threads 1 "
                        "side by side (tiny models use 2 single-thread processes better than one 2-thread one); "
                        "a last run without --shard reads every cell from the cache and writes the table")
    add_run_arguments(p)
    args = p.parse_args(argv)
    t0 = start_run(args)
    concepts = split(CONCEPTS, DEV)
    setup = Setup(args.model, Sampling(seeds=args.seeds), ResultCache("quality_personalize", enabled=not args.no_cache))
    # Configuration index first: stopped early, the sweep still has every method's first rows.
    depth = max(len(GRID[m]) for m in args.methods)
    work = [(m, i, c) for i in range(depth) for m in args.methods if i < len(GRID[m]) for c in concepts]
    shard, shards = (int(v) for v in args.shard.split("/"))
    mine = work[shard::shards]
    records: dict[tuple, list] = {}
    for method, i, name in progress(mine, desc="sweep cells"):
        overrides, counts = GRID[method][i]
        settings = resolved_settings(method, {**SWEEP_BASE, **overrides, "steps": counts[-1]})
        for n, cell in after_cells(setup, method, settings, CONCEPTS[name], counts[:-1]).items():
            records.setdefault((method, i, n), []).extend(cell["records"])
    if shards > 1:
        return {}
    methods = {}
    for method in args.methods:
        rows = []
        for i, (overrides, counts) in enumerate(GRID[method]):
            for n in counts:
                settings = resolved_settings(method, {**SWEEP_BASE, **overrides, "steps": n})
                recs = records[(method, i, n)]
                rows.append({"settings": settings, "text": settings_text(method, settings),
                             **{k: estimate(recs, k).as_dict() for k in ("agreement", "shape", "color", "context")}})
        methods[method] = {"rows": rows, "chosen": choose(rows)}
    report = {"settings": {"concepts": concepts, "sampling": vars(setup.sampling), "context_floor": CONTEXT_FLOOR},
              "methods": methods, "seconds": round(time.time() - t0, 1),
              "machine": f"{platform.machine()}, {args.threads} CPU threads",
              "cache": {"hits": setup.cache.hits, "misses": setup.cache.misses}}
    write_outputs(Path(args.out_dir), "sweep_personalize", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
