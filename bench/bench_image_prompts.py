"""Image prompts' speed on the serving path, side by side in one run (embedded model, CPU).

    python -m bench.bench_image_prompts

1. Time to the first personalized image: from 4 photos to one image through the serving engine
   (encode the photos, then one Generate at the served defaults), against what a user would
   otherwise do: a DreamBooth-LoRA job at the profile's defaults (service/personalize, the job's
   code), then the same Generate with its adapter.
2. Images/s of 8 concurrent one-image requests whose UNet steps share calls (the StepBatcher every
   backend runs): without an IP-Adapter installed (the server before image prompts), with one
   installed but no request using it (what every request pays for the packed tokens), all sharing
   one image prompt, each with its own (per-row), and each with its own run one after another (what
   a pipeline that takes one image prompt per call does).
Writes bench/results/image_prompts.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

from bench.common import add_run_arguments, start_run, write_results
from bench.quality_image_prompt import photos as concept_photos
from service.engine.batching import StepBatcher
from service.engine.pipeline import Engine, GenerationSpec
from service.engine.sampling import generation
from service.image_prompt.served import ServedImagePrompts
from service.personalize import FrozenBase, TrainingSpec, defaults, train
from service.profiles import choose
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.image_prompt import shipped_for
from service.research.world.heldout import CONCEPTS, TEST, split

REQUESTS = 8


async def concurrent(engine: Engine, specs: list[GenerationSpec], threads: int) -> float:
    """Seconds for the specs run at once, their steps batched."""
    batcher = StepBatcher(engine, max_rows=4 * len(specs), threads=threads)
    try:
        started = time.perf_counter()
        await asyncio.gather(*(batcher.run(generation(s, engine.facts, device=engine.device, dtype=engine.dtype))
                               for s in specs))
        return time.perf_counter() - started
    finally:
        batcher.close()


def best_of(fn, repeats: int) -> float:
    fn()  # warm
    return min(fn() for _ in range(repeats))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-training", action="store_true", help="leave out the DreamBooth-LoRA job (72 s)")
    add_run_arguments(p)
    args = p.parse_args(argv)
    t0 = start_run(args)
    model = DEFAULT_MODEL_DIR
    profile = choose(None, None).profile
    steps, sampler = 20, profile.sampler  # the gateway's default_steps and the profile's sampler
    concepts = split(CONCEPTS, TEST)
    photos = {name: concept_photos(CONCEPTS[name]) for name in concepts}

    plain_engine = Engine.from_pretrained(model)
    engine = Engine.from_pretrained(model)
    served = ServedImagePrompts.from_files(engine, *shipped_for(model))
    prompt = concepts[0]
    text = f"a {CONCEPTS[prompt].class_word} on a green background"

    # 1. Time to the first personalized image.
    def first_image() -> float:
        started = time.perf_counter()
        image_prompt = served.prompt(photos[prompt])
        engine.generate(GenerationSpec(prompt=text, steps=steps, sampler=sampler, guidance_scale=4.0, seed=0,
                                       image_prompt=image_prompt))
        return time.perf_counter() - started

    def encode_only() -> float:
        started = time.perf_counter()
        served.prompt(photos[prompt])
        return time.perf_counter() - started

    first = [first_image() for _ in range(args.repeats + 1)][1:]
    encode = statistics.median([encode_only() for _ in range(args.repeats + 2)][1:])
    timing = {"image_prompt_first_image_s": statistics.median(first), "encode_s": encode}
    if not args.skip_training:
        d = defaults("DREAMBOOTH_LORA")
        spec = TrainingSpec(method="DREAMBOOTH_LORA", images=photos[prompt], token="sks", class_word=CONCEPTS[prompt].class_word,
                            steps=d.steps, learning_rate=d.learning_rate, rank=d.rank, batch_size=d.batch_size,
                            prior_loss_weight=d.prior_loss_weight, num_class_images=d.num_class_images,
                            train_text_encoder=d.train_text_encoder)
        started = time.perf_counter()
        train(FrozenBase.from_pretrained(model), spec)
        timing["dreambooth_lora_job_s"] = time.perf_counter() - started
        timing["generate_s"] = statistics.median(first) - encode  # the same Generate, with its adapter instead
        timing["dreambooth_lora_first_image_s"] = timing["dreambooth_lora_job_s"] + timing["generate_s"]
        timing["ratio"] = timing["dreambooth_lora_first_image_s"] / timing["image_prompt_first_image_s"]

    # 2. Images/s, 8 concurrent one-image requests.
    prompts = [served.prompt(photos[concepts[i % len(concepts)]][: 1 + i % 4]) for i in range(REQUESTS)]

    def specs(image_prompts) -> list[GenerationSpec]:
        return [GenerationSpec(prompt=text, steps=steps, sampler=sampler, guidance_scale=4.0, seed=i,
                               image_prompt=image_prompts[i]) for i in range(REQUESTS)]

    def run(eng, image_prompts) -> float:
        return asyncio.run(concurrent(eng, specs(image_prompts), args.threads))

    def one_after_another() -> float:
        started = time.perf_counter()
        for s in specs(prompts):
            engine.generate(s)
        return time.perf_counter() - started

    cases = {
        "no IP-Adapter installed, plain requests": lambda: run(plain_engine, [None] * REQUESTS),
        "IP-Adapter installed, plain requests": lambda: run(engine, [None] * REQUESTS),
        "one image prompt shared by all 8": lambda: run(engine, [prompts[0]] * REQUESTS),
        "8 different image prompts, one per row (batched)": lambda: run(engine, prompts),
        "8 different image prompts, one request at a time": one_after_another,
    }
    throughput = {name: REQUESTS / best_of(fn, args.repeats) for name, fn in cases.items()}
    report = {"timing": timing, "images_per_s": throughput, "steps": steps, "sampler": sampler,
              "requests": REQUESTS, "seconds": time.time() - t0,
              "machine": f"{platform.machine()}, {args.threads} threads", "command": "python -m bench.bench_image_prompts"}
    write_results(args.out_dir, "image_prompts", report, markdown(report))
    return report


def markdown(r: dict) -> str:
    t = r["timing"]
    lines = [f"Embedded model, {r['sampler']} {r['steps']} steps, guidance 4, {r['machine']}.", "",
             "**Time to the first personalized image** (4 photos; median of runs after a warm one):", "",
             "| path | seconds | |", "|---|---|---|",
             f"| image prompt: encode the photos + one Generate | **{t['image_prompt_first_image_s']:.2f}** | "
             f"encode {t['encode_s'] * 1000:.0f} ms |"]
    if "dreambooth_lora_job_s" in t:
        lines.append(f"| DreamBooth-LoRA job (profile defaults) + the same Generate | {t['dreambooth_lora_first_image_s']:.1f} "
                     f"| job {t['dreambooth_lora_job_s']:.1f} s; **{t['ratio']:.0f}x** the image prompt's wait |")
    base = r["images_per_s"]["no IP-Adapter installed, plain requests"]
    lines += ["", f"**Images/s**, {r['requests']} concurrent one-image requests (best of runs):", "",
              "| requests | images/s | vs. no IP-Adapter |", "|---|---|---|"]
    lines += [f"| {name} | {v:.2f} | {v / base:.2f}x |" for name, v in r["images_per_s"].items()]
    lines += ["", f"Reproduce: `{r['command']}` ({r['seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
