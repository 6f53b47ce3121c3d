"""FineStyle speed: seconds to a style adapter, and what the third prediction of a step costs.

    python -m bench.bench_finestyle            # figures in bench/results/finestyle_speed.{json,md}

Side by side in one run, on the embedded model and one held-out style's reference image:

1. Seconds to a style adapter: a whole default FINESTYLE training (`train()`: the pair builder with
   its cross-attention maps, then the loop), against the plain style LoRA a user would otherwise
   train (same steps, rank, layers; the whole image only), and the FINESTYLE default job through
   the public API (Personalize -> WatchJob -> SUCCEEDED with previews).
2. Per denoising step through the serving engine (adapter bank): ordinary CFG with the adapter (2
   UNet rows an image), our two-scale guidance (3 rows in ONE call), and the same three
   predictions the way a pipeline without a per-row adapter bank must run them (a CFG call without
   the adapter, then a second call with it). Rounds alternate; ratios are of medians.

CPU timings on a shared machine: absolute seconds are indicative only; ratios are the figure.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from bench.common import add_run_arguments, png_bytes, served_gateway, serving_engine, start_run, write_results
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.engine.pipeline import AdapterUse, Engine
from service.personalize import FINESTYLE, Concept, FrozenBase, TrainingSpec, defaults, finestyle, train
from service.personalize.finestyle import build_pairs
from service.research.world.heldout import STYLES

ROOT = Path(__file__).resolve().parent.parent
STYLE, PHRASE = "neon-outline", "in zwx style"


def spec_for(**extra) -> TrainingSpec:
    d = defaults(FINESTYLE)
    style = STYLES[STYLE]
    return TrainingSpec(method=FINESTYLE, images=[Image.fromarray(style.reference().image)], token=PHRASE,
                        class_word="", steps=d.steps, learning_rate=d.learning_rate, rank=d.rank,
                        batch_size=d.batch_size, concepts=[Concept(f"a {o.phrase}") for o in style.content],
                        style_phrase=PHRASE, extra=extra)


def step_times(engine: Engine, n: int, rounds: int) -> dict[str, float]:
    """Median seconds of one step's UNet work for n images, three ways, alternating."""
    size = engine.limits.default_size
    latents = engine.initial_latents(list(range(n)), size, size)
    prompts = [""] * n + [f"a blue square {PHRASE}"] * n
    style = (AdapterUse("style", style=True),)
    t = torch.full((n,), 500)
    rows_cfg = [style] * (2 * n)
    rows_three = [()] * (2 * n) + [style] * n
    embeds = engine.encode_prompts(prompts + prompts[n:], rows_three)
    times = {"cfg": [], "style_one_call": [], "style_two_calls": []}
    for _ in range(rounds):
        started = time.perf_counter()
        engine.predict_noise(latents.repeat(2, 1, 1, 1), t.repeat(2), embeds[: 2 * n], rows_cfg)
        times["cfg"].append(time.perf_counter() - started)
        started = time.perf_counter()
        engine.predict_noise(latents.repeat(3, 1, 1, 1), t.repeat(3), embeds, rows_three)
        times["style_one_call"].append(time.perf_counter() - started)
        started = time.perf_counter()
        engine.predict_noise(latents.repeat(2, 1, 1, 1), t.repeat(2), embeds[: 2 * n], [()] * (2 * n))
        engine.predict_noise(latents, t, embeds[2 * n :], [style] * n)
        times["style_two_calls"].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


def job_through_api() -> dict:
    """The FINESTYLE default job as a client sees it, through a `steerserve serve` process."""
    spec = spec_for()
    with served_gateway() as (stub, md, pb):
        started = time.perf_counter()
        job = stub.Personalize(pb.PersonalizeRequest(
            method=pb.FINESTYLE, name="bench-style", images=[pb.Image(data=png_bytes(spec.images[0]))],
            concepts=[pb.Concept(phrase=c.phrase) for c in spec.concepts], style_phrase=PHRASE), metadata=md)
        last = None
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=md, timeout=900):
            last = event
        return {"state": pb.JobState.Name(last.state), "seconds": round(time.perf_counter() - started, 1),
                "steps": last.total_steps, "previews": len(last.job.previews)}


def markdown(report: dict) -> str:
    tr, st = report["training"], report["step"]
    api = report["api_job"]
    lines = [
        f"Embedded world model, one reference image ({STYLE}), defaults: {tr['steps']} steps, batch {tr['batch_size']}, "
        f"rank {tr['rank']}; {report['machine']}.",
        "",
        "| seconds to a style adapter | seconds |",
        "|---|---|",
        f"| FineStyle `train()` (pairs: {tr['pairs']}, built in {tr['pairs_seconds']:.1f} s incl. cross-attention maps) "
        f"| **{tr['finestyle_seconds']:.1f}** |",
        f"| plain style LoRA, same steps/rank/layers, whole image only | {tr['plain_seconds']:.1f} |",
        f"| ratio FineStyle / plain | {tr['ratio']:.2f} |",
    ]
    if api:
        lines.append(f"| FINESTYLE default job through the API (Personalize -> WatchJob {api['state']}, "
                     f"{api['previews']} previews) | **{api['seconds']:.1f}** |")
    lines += [
        "",
        f"| one denoising step, {st['images']} images, median of {st['rounds']} | ms | vs CFG |",
        "|---|---|---|",
        f"| CFG with the adapter (2 rows an image) | {1000 * st['cfg']:.1f} | 1.00 |",
        f"| two-scale guidance, 3 rows in one UNet call (ours) | {1000 * st['style_one_call']:.1f} | "
        f"{st['style_one_call'] / st['cfg']:.2f} |",
        f"| the same three predictions in two calls (CFG call + adapter call) | {1000 * st['style_two_calls']:.1f} | "
        f"{st['style_two_calls'] / st['cfg']:.2f} |",
        "",
        f"The third prediction costs {st['style_one_call'] / st['cfg'] - 1:.0%} of a CFG step in one call; "
        f"one call is {st['style_two_calls'] / st['style_one_call']:.2f}x faster than two.",
        "",
        f"Reproduce: `python -m bench.bench_finestyle` ({report['seconds']:.0f} s on {report['machine']}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4, help="images per request in the step timing")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--no-api", action="store_true", help="skip the job through the public API")
    add_run_arguments(p)
    args = p.parse_args(argv)

    t0 = start_run(args)
    base = FrozenBase.from_pretrained(DEFAULT_MODEL_DIR)
    d = defaults(FINESTYLE)

    spec = spec_for()
    started = time.perf_counter()
    pairs = build_pairs(base, spec.images[0], spec.concepts, PHRASE, seed=spec.seed)
    pairs_seconds = time.perf_counter() - started
    started = time.perf_counter()
    plain = train(base, spec_for(data_scaling=False))
    plain_seconds = time.perf_counter() - started
    started = time.perf_counter()
    adapter = train(base, spec)
    finestyle_seconds = time.perf_counter() - started

    engine = serving_engine(DEFAULT_MODEL_DIR, {"style": adapter, "plain": plain}, max_rows=3 * args.images)
    step = step_times(engine, args.images, args.rounds)
    report = {
        "training": {"steps": d.steps, "batch_size": d.batch_size, "rank": d.rank, "pairs": len(pairs.kinds),
                     "pairs_seconds": round(pairs_seconds, 2), "finestyle_seconds": round(finestyle_seconds, 1),
                     "plain_seconds": round(plain_seconds, 1), "ratio": round(finestyle_seconds / plain_seconds, 2)},
        "step": {"images": args.images, "rounds": args.rounds, **{k: round(v, 5) for k, v in step.items()}},
        "api_job": {} if args.no_api else job_through_api(),
        "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()}, {args.threads} CPU threads",
        "style_guidance_scale": finestyle.STYLE_GUIDANCE_SCALE,
    }
    write_results(args.out_dir, "finestyle_speed", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
