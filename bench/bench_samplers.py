"""Samplers and few-step generation on the embedded model, side by side in one run: what each costs
(images/s through the serving engine) and what it keeps (the world classifier's prompt alignment).

    python -m bench.bench_samplers                       # the table in docs/samplers.md
    python -m bench.bench_samplers --prompts 24 --only few --no-adapters   # a quick look at LCM

Every setting generates the same held-in prompts (bench.quality_report's stream: prompt i, seed i)
through the serving engine with the adapter bank (service/serving.py, eager UNet), the requests of a
chunk side by side (sampling.run_together: their steps share UNet calls, as the step batcher runs
them). Images/s is wall time of generation alone, same process, same threads, one setting after
another. Accuracy: the share of images right on every attribute the prompt states ("all" of
bench.quality_report), with a 95% bootstrap interval over prompts; a Δ is the PAIRED difference to
the reference setting on the same prompts and seeds.

Tables:
- few: the LCM-LoRA (service/research/lcm, `sampler: "lcm"`, guidance 1) at 2, 4 and 8 steps and
  DDIM at 4 steps, against DDIM at 25 steps (guidance 4, the profile's sampling): issue 38's goal is
  >= 90% of DDIM 25's accuracy at >= 5x its images/s with 4 LCM steps.
- samplers: each sampler at 10, 20 and 30 steps against DDIM at the same step count.
- adapters: a user's DreamBooth-LoRA (each test concept's, trained as bench.quality_edit trains it,
  from the same cache) alone at DDIM 25 and combined per row with the LCM-LoRA at 4 LCM steps:
  concept fidelity (bench.quality_personalize's prompts and reading), intervals over concepts.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import serving_engine
from bench.evaluation import Estimate, estimate, paired_difference, write_outputs
from bench.quality_report import PROMPT_STREAM, held_in_scenes
from service.adapters import parse_adapter
from service.engine.sampling import AdapterUse, GenerationSpec, generation, run_together
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.lcm.distill import WEIGHTS as LCM_WEIGHTS
from service.research.measures import Judge

ROOT = Path(__file__).resolve().parent.parent
LCM = "lcm-lora"
# The test prompts are bench.quality_report's; the dev prompts (where the LCM-LoRA's recipe is
# tuned) come from another world stream.
STREAMS = {"test": PROMPT_STREAM, "dev": PROMPT_STREAM + 1}


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    guidance: float = 4.0
    karras: bool = False
    lcm_lora: bool = False

    @property
    def label(self) -> str:
        name = {"ddim": "DDIM", "euler": "Euler", "euler_ancestral": "Euler a", "dpmpp_2m": "DPM++ 2M",
                "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC", "lcm": "LCM"}[self.sampler]
        extras = (" Karras" if self.karras else "") + (" + LCM-LoRA" if self.lcm_lora else "")
        return f"{name}{extras}, {self.steps} steps, guidance {self.guidance:g}"


REFERENCE = Setting("ddim", 25)
FEW = [Setting("lcm", n, 1.0, lcm_lora=True) for n in (2, 4, 8)] + [Setting("ddim", 4)]
SAMPLERS = [Setting(name, n, karras=karras) for name, karras in
            (("ddim", False), ("euler", False), ("euler_ancestral", False), ("dpmpp_2m", True),
             ("dpmpp_2m_sde", True), ("unipc", False)) for n in (10, 20, 30)]


def generate(engine, setting: Setting, prompts: list[str], chunk: int, adapters=(), style_scale: float = 0.0,
             seeds: list[int] | None = None) -> tuple[list[np.ndarray], float]:
    """One image per prompt (prompt i: seed i, or seeds[i]), `chunk` requests side by side, each with
    `adapters` (and the LCM-LoRA where the setting says); (images, wall seconds)."""
    uses = tuple(adapters) + ((AdapterUse(LCM),) if setting.lcm_lora else ())
    seeds = seeds if seeds is not None else list(range(len(prompts)))
    specs = [GenerationSpec(prompt=p, steps=setting.steps, guidance_scale=setting.guidance, seed=seed, adapters=uses,
                            sampler=setting.sampler, karras_sigmas=setting.karras, style_guidance_scale=style_scale)
             for p, seed in zip(prompts, seeds)]
    images, t0 = [], time.perf_counter()
    for start in range(0, len(specs), chunk):
        loops = [generation(s, engine.facts, device=engine.device, dtype=engine.dtype) for s in specs[start:start + chunk]]
        images += [np.asarray(out.images[0]) for out in run_together(loops, engine.execute)]
    return images, time.perf_counter() - t0


def alignment_records(judge: Judge, images, prompts) -> list[dict]:
    """Per prompt: 1 if the image is right on every attribute its prompt states (unit: the prompt)."""
    return [{"item": i, "seed": 0, "accuracy": judge.prompt_alignment([im], [p])["all"]}
            for i, (im, p) in enumerate(zip(images, prompts))]


def run_settings(engine, judge, settings, prompts, chunk, log) -> dict[Setting, dict]:
    out = {}
    for setting in settings:
        if setting in out:
            continue
        images, seconds = generate(engine, setting, prompts, chunk)
        out[setting] = {"records": alignment_records(judge, images, prompts), "seconds": seconds,
                        "images_per_s": len(prompts) / seconds}
        log(f"{setting.label}: {estimate(out[setting]['records'], 'accuracy').pct()}, "
            f"{out[setting]['images_per_s']:.2f} images/s")
    return out


def row(setting: Setting, result: dict, against: dict | None) -> dict:
    acc = estimate(result["records"], "accuracy")
    r = {"setting": asdict(setting), "label": setting.label, "accuracy": acc.as_dict(),
         "images_per_s": round(result["images_per_s"], 3)}
    if against is not None:
        r["delta_accuracy"] = paired_difference(result["records"], against["records"], "accuracy").as_dict()
        r["accuracy_ratio"] = round(acc.mean / estimate(against["records"], "accuracy").mean, 3)
        r["speed_ratio"] = round(result["images_per_s"] / against["images_per_s"], 2)
    return r


LCM4 = Setting("lcm", 4, 1.0, lcm_lora=True)
STYLE_SCALE = 2.0  # FineStyle's style guidance as the CLI suggests it


def adapter_rows(engine, judge, adapters: dict, chunk: int, log) -> list[dict]:
    """Users' adapters alone at DDIM 25 and combined per row with the LCM-LoRA at 4 LCM steps: each
    test concept's DreamBooth-LoRA (trained as bench.quality_edit trains it, from the same cache:
    concept fidelity on bench.quality_personalize's prompts) and each test style's FineStyle adapter
    (trained here as bench.quality_finestyle trains it: style, prompt and leakage on its prompts, 4
    seeds each, at style guidance 2)."""
    from bench.quality_edit import Setup
    from bench.quality_finestyle import Run, image_records, prompts_for as style_prompts
    from bench.quality_personalize import prompts_for
    from bench.evaluation import ResultCache
    from service.personalize import train
    from service.research.world.heldout import CONCEPTS, STYLES, TEST, split

    settings = (REFERENCE, LCM4)
    out = []
    setup = Setup(str(DEFAULT_MODEL_DIR), cache=True, edits_per_cell=1)
    records = {k: [] for k in settings}
    seconds = {k: 0.0 for k in settings}
    for concept in (CONCEPTS[name] for name in split(CONCEPTS, TEST)):
        key, token = setup.adapter("DREAMBOOTH_LORA", concept, 4)
        adapters[key] = setup.adapters[key]
        prompts = [p for p, _ in prompts_for(token, concept)]
        for setting in settings:
            images, s = generate(engine, setting, prompts, chunk, adapters=(AdapterUse(key),))
            seconds[setting] += s
            records[setting] += [{"item": concept.name, "seed": i, "fidelity": judge.concept_fidelity([im], concept)["agreement"]}
                                 for i, im in enumerate(images)]
        engine.adapters.manager.invalidate(key)
        log(f"DreamBooth-LoRA {concept.name}: done")
    for setting in settings:
        r = {"label": "DreamBooth-LoRA, " + setting.label, "fidelity": estimate(records[setting], "fidelity").as_dict(),
             "images_per_s": round(len(records[setting]) / seconds[setting], 3)}
        if setting is not REFERENCE:
            r["delta_fidelity"] = paired_difference(records[setting], records[REFERENCE], "fidelity").as_dict()
        out.append(r)

    # FineStyle: at DDIM 25 with its two-scale guidance (style scale 2); with the LCM-LoRA both with
    # it and with the style adapter on the one conditional row (style scale 0: no extrapolation).
    cases = [(REFERENCE, STYLE_SCALE), (LCM4, STYLE_SCALE), (LCM4, 0.0)]
    run = Run(str(DEFAULT_MODEL_DIR), seeds=4, prompts=6, steps=25, guidance=4.0, cache=ResultCache("unused", enabled=False))
    records = {k: [] for k in cases}
    seconds = {k: 0.0 for k in cases}
    for style in (STYLES[name] for name in split(STYLES, TEST)):
        key = f"finestyle:{style.name}"
        adapters[key] = train(run.base, run.spec(style, "finestyle", {}))
        prompts = [p for p in style_prompts(style, 6) for _ in range(4)]
        units = [(i, seed) for i in range(6) for seed in range(4)]
        for setting, scale in cases:
            images, s = generate(engine, setting, prompts, chunk, adapters=(AdapterUse(key, style=True),),
                                 style_scale=scale, seeds=[seed for _, seed in units])
            seconds[setting, scale] += s
            records[setting, scale] += image_records(judge, style, images, prompts, units)
        engine.adapters.manager.invalidate(key)
        del adapters[key]
        log(f"FineStyle {style.name}: done")
    for case in cases:
        setting, scale = case
        r = {"label": f"FineStyle (style scale {scale:g}), " + setting.label,
             **{m: estimate(records[case], m).as_dict() for m in ("style", "prompt", "leakage")},
             "images_per_s": round(len(records[case]) / seconds[case], 3)}
        if case != cases[0]:
            r["delta_style"] = paired_difference(records[case], records[cases[0]], "style").as_dict()
        out.append(r)
    return out


def pct(d: dict) -> str:
    return Estimate(d["mean"], d["lo"], d["hi"], d["n"]).pct()


def signed(d: dict) -> str:
    return f"{d['mean'] * 100:+.0f} [{d['lo'] * 100:+.0f}, {d['hi'] * 100:+.0f}]"


def markdown(report: dict) -> str:
    s = report["settings"]
    prompts = "held-in test prompts (bench.quality_report's" if s["split"] == "test" else "held-in DEV prompts (another stream"
    lines = [f"Samplers on the embedded model: {s['prompts']} {prompts}, prompt i with seed i), {s['chunk']} requests side by side through the serving engine, {report['machine']}. "
             "Accuracy: share of images right on every attribute the prompt states [95% bootstrap interval over "
             "prompts]; Δ: paired difference to the reference on the same prompts and seeds, in points.", ""]
    for table, title in (("few", "Few steps, against DDIM at 25 steps"),
                         ("samplers", "Each sampler against DDIM at the same steps")):
        if table not in report:
            continue
        lines += [f"### {title}", "",
                  "| setting | accuracy | Δ accuracy | accuracy / reference | images/s | speed / reference |",
                  "|---|---|---|---|---|---|"]
        for r in report[table]:
            delta = signed(r["delta_accuracy"]) if "delta_accuracy" in r else "(reference)"
            lines.append(f"| {r['label']} | {pct(r['accuracy'])} | {delta} | {r.get('accuracy_ratio', 1.0):.2f} | "
                         f"{r['images_per_s']:.2f} | {r.get('speed_ratio', 1.0):.2f}x |")
        lines.append("")
    if "adapters" in report:
        lines += ["### Users' adapters with the LCM-LoRA", "",
                  "DreamBooth-LoRA fidelity: the classifier reads the concept's shape, colour and texture "
                  "(bench.quality_personalize's prompts: 6 contexts per test concept, 6 concepts). FineStyle: style = "
                  "background, its colour and treatment all the style's; prompt = the asked object's shape and colour; "
                  "leakage = a shape of the style image shows up unasked (bench.quality_finestyle's reading; 3 test styles, "
                  "6 prompts x 4 seeds). [95% interval over concepts or styles, then prompts.]", "",
                  "| setting | fidelity / style | Δ vs DDIM 25 | prompt | leakage | images/s |", "|---|---|---|---|---|---|"]
        for r in report["adapters"]:
            main = r.get("fidelity") or r["style"]
            delta = r.get("delta_fidelity") or r.get("delta_style")
            lines.append(f"| {r['label']} | {pct(main)} | {signed(delta) if delta else ''} | "
                         f"{pct(r['prompt']) if 'prompt' in r else ''} | {pct(r['leakage']) if 'leakage' in r else ''} | "
                         f"{r['images_per_s']:.2f} |")
        lines.append("")
    lines.append(f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--lcm-lora", default=str(LCM_WEIGHTS))
    p.add_argument("--prompts", type=int, default=70)
    p.add_argument("--split", choices=tuple(STREAMS), default="test", help="dev: other prompts, to tune on")
    p.add_argument("--chunk", type=int, default=8, help="requests side by side")
    p.add_argument("--only", nargs="*", choices=("few", "samplers", "adapters"), default=None)
    p.add_argument("--no-adapters", action="store_true", help="skip the adapters table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tables = set(args.only or ("few", "samplers", "adapters")) - ({"adapters"} if args.no_adapters else set())

    t0 = time.time()
    adapters = {LCM: parse_adapter(Path(args.lcm_lora).read_bytes())}
    engine = serving_engine(args.model, adapters, max_rows=3 * args.chunk, num_slots=4)
    judge = Judge()
    prompts = [s.caption for s in held_in_scenes(args.prompts, STREAMS[args.split])]
    log = lambda line: print(line, flush=True)  # noqa: E731
    report: dict = {}
    wanted = [REFERENCE] + (FEW if "few" in tables else []) + (SAMPLERS if "samplers" in tables else [])
    results = run_settings(engine, judge, wanted, prompts, args.chunk, log)
    if "few" in tables:
        report["few"] = [row(REFERENCE, results[REFERENCE], None)] + [row(s, results[s], results[REFERENCE]) for s in FEW]
    if "samplers" in tables:
        report["samplers"] = [row(s, results[s], None if s.sampler == "ddim" else results[Setting("ddim", s.steps)])
                              for s in SAMPLERS]
    if "adapters" in tables:
        report["adapters"] = adapter_rows(engine, judge, adapters, args.chunk, log)
    report["settings"] = {"prompts": args.prompts, "split": args.split, "chunk": args.chunk, "lcm_lora": Path(args.lcm_lora).name,
                          "command": " ".join(["python -m bench.bench_samplers", *(sys.argv[1:] if argv is None else argv)])}
    report["machine"] = f"{platform.machine()}, {args.threads} CPU threads"
    report["seconds"] = round(time.time() - t0, 1)
    text = markdown(report)
    write_outputs(args.out_dir, "samplers" + ("_dev" if args.split == "dev" else ""), report, text)
    return report


if __name__ == "__main__":
    main()
