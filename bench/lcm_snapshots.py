"""Choose an LCM-LoRA among distillation snapshots, on the DEV prompts only.

    python -m bench.lcm_snapshots service/research/lcm/weights/steerserve-world-v1-lcm-lora.safetensors \
        var/lcm-cosine/lcm-cosine-step*.safetensors --prompts 210

For each file: the share of images right on every attribute (bench.bench_samplers' reading) at
4 LCM steps, guidance 1, against DDIM at 25 steps on the same prompts and seeds (computed once), and
the PAIRED difference to the first file (the one shipped): a snapshot replaces it only where that
difference's interval excludes 0 on dev, and the test split then says what it is
(`python -m bench.bench_samplers --lcm-lora FILE`). Writes bench/results/lcm_snapshots_dev.{md,json}.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bench.bench_samplers import REFERENCE, STREAMS, Setting, alignment_records, generate as generate_setting
from bench.common import serving_engine
from bench.evaluation import estimate, paired_difference, write_outputs
from bench.quality_report import held_in_scenes
from service.adapters import parse_adapter
from service.engine.sampling import AdapterUse
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.measures import Judge

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
LCM4 = Setting("lcm", STEPS, 1.0)  # the LoRA comes as the row's adapter (not bench_samplers' fixed one)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="LCM-LoRA files; the first is the one to beat")
    p.add_argument("--prompts", type=int, default=210)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    adapters = {f"lcm-{i}": parse_adapter(Path(f).read_bytes()) for i, f in enumerate(args.files)}
    engine = serving_engine(str(DEFAULT_MODEL_DIR), adapters, max_rows=3 * args.chunk, num_slots=len(adapters) + 1)
    judge = Judge()
    prompts = [s.caption for s in held_in_scenes(args.prompts, STREAMS["dev"])]
    ref_images, _ = generate_setting(engine, REFERENCE, prompts, args.chunk)
    reference = alignment_records(judge, ref_images, prompts)
    ref = estimate(reference, "accuracy")  # once: a bootstrap, the same for every file
    rows, first = [], None
    for i, f in enumerate(args.files):
        images, _ = generate_setting(engine, LCM4, prompts, args.chunk, adapters=(AdapterUse(f"lcm-{i}"),))
        records = alignment_records(judge, images, prompts)
        first = first or records
        acc = estimate(records, "accuracy")
        rows.append({"file": str(f), "accuracy": acc.as_dict(), "ratio_to_ddim25": round(acc.mean / ref.mean, 3),
                     "delta_vs_first": paired_difference(records, first, "accuracy").as_dict() if i else None})
        print(f"{f}: {acc.pct()} ({rows[-1]['ratio_to_ddim25']:.2f} of DDIM 25)", flush=True)
    report = {"reference": ref.as_dict(), "rows": rows, "prompts": args.prompts,
              "machine": f"{platform.machine()}, {args.threads} CPU threads", "seconds": round(time.time() - t0, 1)}
    lines = [f"LCM-LoRA snapshots at {STEPS} LCM steps, guidance 1, on {args.prompts} DEV prompts (prompt i, seed i); "
             f"DDIM 25 steps, guidance 4: {ref.pct()}. Δ: paired, against the first file.", "",
             "| file | accuracy | / DDIM 25 | Δ vs first |", "|---|---|---|---|"]
    for r in rows:
        acc, d = r["accuracy"], r["delta_vs_first"]
        lines.append(f"| {Path(r['file']).name} | {acc['mean'] * 100:.0f}% [{acc['lo'] * 100:.0f}, {acc['hi'] * 100:.0f}] | "
                     f"{r['ratio_to_ddim25']:.2f} | "
                     + (f"{d['mean'] * 100:+.0f} [{d['lo'] * 100:+.0f}, {d['hi'] * 100:+.0f}]" if d else "(first)") + " |")
    lines.append("")
    lines.append(f"Reproduce: `python -m bench.lcm_snapshots {' '.join(args.files)} --prompts {args.prompts}` "
                 f"({report['seconds']:.0f} s, {report['machine']}).")
    write_outputs(args.out_dir, "lcm_snapshots_dev", report, "\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
