"""Personalization speed: our trainers against the same training written the usual way.

    python -m bench.bench_personalize            # figures in bench/results/personalize_speed.{json,md}

Side by side in one run, on the embedded model and the same 4 photos of a held-out concept:

1. Per training step, each method: ours (service/personalize: VAE posteriors and frozen text
   embeddings computed once, LoRA layers of our own) against the diffusers example script's step
   (bench/baselines.py: VAE and text encoder run every step; peft LoRA for DreamBooth, the whole
   embedding table for Textual Inversion, diffusers' Custom Diffusion attention processors).
   Rounds alternate ours and theirs so machine noise hits both; the ratio is of medians.
2. Seconds to a usable adapter: a whole default job per method (`train()` with the method's
   defaults), and the DreamBooth-LoRA default job through the public API (Personalize -> WatchJob
   -> SUCCEEDED with previews), the number a user waits for.

CPU timings on a shared machine: absolute seconds are indicative only; ratios are the figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from PIL import Image

from bench import baselines
from bench.common import add_run_arguments, png_bytes, served_gateway, start_run
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.personalize import SUBJECT_METHODS, FrozenBase, NoProgress, TrainingSpec, defaults, learns_token, train
from service.research.world.heldout import CONCEPTS

ROOT = Path(__file__).resolve().parent.parent
CONCEPT, CLASS_WORD = "yellow-crescent", "circle"


class StepTimer(NoProgress):
    def __init__(self):
        self.times = [time.perf_counter()]

    def step(self, step, total, loss):
        self.times.append(time.perf_counter())

    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def spec_for(method: str, images, steps: int | None = None, whole_default: bool = False) -> TrainingSpec:
    """The method's defaults. Per-step timing compares the same training as the diffusers script
    (no text-encoder LoRA, no prior: the scripts' plain step); `whole_default` is the job a
    default request trains (with them, where the profile turns them on)."""
    d = defaults(method)
    extra = dict(train_text_encoder=d.train_text_encoder, prior_loss_weight=d.prior_loss_weight,
                 num_class_images=d.num_class_images) if whole_default else {}
    return TrainingSpec(method=method, images=images, token="<sks>" if learns_token(method) else "sks", class_word=CLASS_WORD,
                        steps=steps or d.steps, learning_rate=d.learning_rate, rank=d.rank, batch_size=d.batch_size, **extra)


def ours(base: FrozenBase, method: str, images, steps: int) -> list[float]:
    timer = StepTimer()
    train(base, spec_for(method, images, steps), timer)
    return timer.seconds()[2:]  # the first steps warm allocator caches


def theirs(method: str, images, steps: int) -> list[float]:
    spec = spec_for(method, images, steps)
    common = dict(model_dir=DEFAULT_MODEL_DIR, images=images, steps=steps, learning_rate=spec.learning_rate,
                  batch_size=spec.batch_size, seed=0)
    if method == "DREAMBOOTH_LORA":
        times = baselines.dreambooth_lora(prompt=spec.prompt, rank=spec.rank, **common)
    elif method == "TEXTUAL_INVERSION":
        times = baselines.textual_inversion(placeholder_token=spec.token, initializer_word=CLASS_WORD,
                                            prompt=spec.prompt, **common)
    else:
        times = baselines.custom_diffusion(modifier_token=spec.token, initializer_word="ktn", prompt=spec.prompt,
                                           **common)
    return times[2:]


def job_through_api(images) -> dict:
    """The DreamBooth-LoRA default job as a client sees it: a `steerserve serve` process (in-process
    backend, default settings), Personalize, then WatchJob until SUCCEEDED."""
    with served_gateway() as (stub, md, pb):
        photos = [pb.Image(data=png_bytes(image)) for image in images]
        started = time.perf_counter()
        job = stub.Personalize(pb.PersonalizeRequest(method=pb.DREAMBOOTH_LORA, name="bench", class_word=CLASS_WORD,
                                                     images=photos), metadata=md)
        first_step = None
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=md, timeout=1800):
            if first_step is None and event.step > 0:
                first_step = time.perf_counter() - started
            last = event
        total = time.perf_counter() - started
        assert last.state == pb.SUCCEEDED, last
        return {"seconds_to_succeeded": round(total, 1), "seconds_to_first_step": round(first_step or 0, 1),
                "steps": last.total_steps, "previews": len(last.job.previews)}


def markdown(report: dict) -> str:
    lines = [
        f"Embedded model (steerserve-world-v1, 64x64), 4 photos of `{CONCEPT}`, {report['threads']} CPU threads, "
        f"{report['rounds']} alternating rounds of {report['steps_per_round']} steps; medians.",
        "",
        "| method | ours ms/step | diffusers script ms/step | speed-up | default job: steps | default job: seconds to adapter |",
        "|---|---|---|---|---|---|",
    ]
    for method, r in report["methods"].items():
        lines.append(f"| {method} | {r['ours_ms']:.0f} | {r['theirs_ms']:.0f} | **{r['speedup']:.2f}x** | "
                     f"{r['default_steps']} | {r['default_job_seconds']:.1f} |")
    api = report["api_job"]
    lines += [
        "",
        f"DreamBooth-LoRA default job through the public API (Personalize -> WatchJob -> SUCCEEDED, in-process "
        f"backend, {api['steps']} steps, {api['previews']} previews): **{api['seconds_to_succeeded']} s** "
        f"(first step after {api['seconds_to_first_step']} s, most of it loading the training copy of the model). "
        "Goal: at most 90 s on 2 cores.",
        "",
        f"Reproduce: `python -m bench.bench_personalize` ({report['seconds']:.0f} s on {report['machine']}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(SUBJECT_METHODS))
    p.add_argument("--steps", type=int, default=30, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-api", action="store_true", help="skip the job through the public API")
    add_run_arguments(p)
    args = p.parse_args(argv)

    t0 = start_run(args)
    images = [Image.fromarray(s.image) for s in CONCEPTS[CONCEPT].references(4, seed=0)]
    base = FrozenBase.from_pretrained(DEFAULT_MODEL_DIR)
    methods = {}
    for method in args.methods:
        mine, other = [], []
        for _ in range(args.rounds):
            mine += ours(base, method, images, args.steps)
            other += theirs(method, images, args.steps)
        started = time.perf_counter()
        train(base, spec_for(method, images, whole_default=True))
        job_seconds = time.perf_counter() - started
        ours_ms, theirs_ms = 1000 * statistics.median(mine), 1000 * statistics.median(other)
        methods[method] = {"ours_ms": round(ours_ms, 1), "theirs_ms": round(theirs_ms, 1),
                           "speedup": round(theirs_ms / ours_ms, 2), "default_steps": defaults(method).steps,
                           "default_job_seconds": round(job_seconds, 1)}
        print(method, methods[method], flush=True)
    report = {
        "methods": methods,
        "api_job": {} if args.no_api else job_through_api(images),
        "steps_per_round": args.steps, "rounds": args.rounds, "threads": args.threads,
        "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()}, {args.threads} CPU threads",
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "personalize_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["api_job"]:
        (out_dir / "personalize_speed.md").write_text(markdown(report))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
