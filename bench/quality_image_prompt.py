"""Instant personalization (an image prompt) against trained adapters, on the world's held-out
concepts, with 95% intervals.

    python -m bench.quality_image_prompt                       # the README table: the TEST split
    python -m bench.quality_image_prompt --split dev --scales 0.6 0.8 1.0   # choosing the scale (dev)

The same photos, prompts, sampling and judge as bench/quality_personalize.py (its cells' code):
for every held-out concept, its 4 reference photos and 6 backgrounds the photos never showed.

- Image prompt: the photos' image prompt (the embedded model's IP-Adapter, service/image_prompt),
  the prompt "a <class word> on <background>" (no token: nothing was learned). "Before" is the same
  prompt without the image prompt.
- DreamBooth-LoRA and Custom Diffusion at their profile defaults (trained here, the jobs' code):
  "a <token> <class word> on <background>".
- Each trained adapter + the image prompt (the two combined per request, as Generate combines them).

Fidelity: the object has the concept's shape, colour and texture (all three), read by the attribute
classifier (independent of the image encoder, which was trained separately). Context kept: the
background has the asked kind and colour. A unit is one (concept, seed); intervals resample
concepts, then seeds. Cells are cached (var/bench-cache/).
Writes bench/results/quality_image_prompt[_dev].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import add_run_arguments, start_run
from bench.evaluation import ResultCache, paired_difference, progress, write_outputs
from bench.quality_personalize import (
    REFERENCES, Sampling, Setup, cells_description, contexts_for, pct, resolved_settings, sample_and_score,
    settings_text, summarize, training_spec,
)
from service.image_prompt.served import ServedImagePrompts
from service.personalize import train
from service.profiles import WORLD
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.image_prompt import shipped_for
from service.research.world.heldout import CONCEPTS, DEV, TEST, split

TRAINED = ("DREAMBOOTH_LORA", "CUSTOM_DIFFUSION")
SHORT = {"DREAMBOOTH_LORA": "DreamBooth-LoRA", "CUSTOM_DIFFUSION": "Custom Diffusion"}
DEFAULT_SCALE = WORLD.image_prompt_scale  # the profile's, chosen on the dev split (quality_image_prompt_dev*.md)


def photos(concept) -> list[Image.Image]:
    """The 4 photos the trained methods learn from, the image prompt's too."""
    return [Image.fromarray(r.image) for r in concept.references(REFERENCES, seed=0)]


class ImagePromptSetup(Setup):
    """quality_personalize's Setup whose serving engine also serves the embedded IP-Adapter."""

    @property
    def engine(self):
        engine = super().engine
        if engine.image_prompts is None:
            files = shipped_for(self.model)
            if files is None:
                raise SystemExit(f"no shipped IP-Adapter for {self.model}")
            ServedImagePrompts.from_files(engine, *files)
        return engine

    def key(self, **parts) -> dict:
        files = shipped_for(self.model)
        return {**super().key(**parts), "bench": "image_prompt", "ip_adapter": self.engine.image_prompts.identity
                if files else None}


def image_prompt_cell(setup: ImagePromptSetup, concept, scale: float) -> dict:
    key = setup.key(what="image_prompt", scale=scale, concept=concept.name, contexts=contexts_for(concept))

    def compute():
        prompt = setup.engine.image_prompts.prompt(photos(concept), scale)
        return sample_and_score(setup, concept, "", None, image_prompt=prompt)

    return setup.cache.cell(key, compute)


def before_cell(setup: ImagePromptSetup, concept) -> dict:
    key = setup.key(what="before", concept=concept.name, contexts=contexts_for(concept))
    return setup.cache.cell(key, lambda: sample_and_score(setup, concept, "", None))


def trained_cells(setup: ImagePromptSetup, method: str, concept, scale: float) -> tuple[dict, dict]:
    """(the adapter alone, the adapter + the image prompt): one training for both."""
    settings = resolved_settings(method, {})
    keys = [setup.key(what=what, method=method, settings=settings, scale=scale if what == "combined" else None,
                      concept=concept.name, contexts=contexts_for(concept), references=REFERENCES)
            for what in ("alone", "combined")]
    cached = [setup.cache.get(k) for k in keys]
    if all(c is not None for c in cached):
        setup.cache.hits += 2
        return cached[0], cached[1]
    setup.cache.misses += 2
    spec = training_spec(method, concept, settings)
    started = time.perf_counter()
    adapter = train(setup.base, spec)
    seconds = round(time.perf_counter() - started, 1)
    key = f"{method}:{concept.name}"
    setup.adapters[key] = adapter
    prompt = setup.engine.image_prompts.prompt(photos(concept), scale)
    out = []
    for k, image_prompt in zip(keys, (None, prompt)):
        value = sample_and_score(setup, concept, spec.token, key, image_prompt=image_prompt)
        value["train_seconds"] = seconds
        setup.cache.put(k, value)
        out.append(value)
    setup.engine.adapters.manager.invalidate(key)
    del setup.adapters[key]
    return out[0], out[1]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        cells_description(s),
        "",
        "| what | settings | fidelity | shape | colour | texture | context kept | similarity | n | personalize s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        a = row["summary"]
        lines.append(f"| {row['name']} | {row['settings']} | **{pct(a['agreement'])}** | {pct(a['shape'])} | {pct(a['color'])} "
                     f"| {pct(a['texture'])} | {pct(a['context'])} | {a['similarity']['mean']:.3f} | {a['agreement']['n']} "
                     f"| {row['seconds']} |")
    if report.get("differences"):
        lines += ["", "Paired differences (same units), fidelity points [95% interval]:", ""]
        lines += [f"- {d['what']}: {d['mean'] * 100:+.0f} [{d['lo'] * 100:+.0f}, {d['hi'] * 100:+.0f}] (n = {d['n']})"
                  for d in report["differences"]]
    lines += ["", "Per concept (fidelity / context kept):", "",
              "| what | " + " | ".join(f"{c} ({CONCEPTS[c].kind})" for c in s["concepts"]) + " |",
              "|---|" + "---|" * len(s["concepts"])]
    for row in report["rows"]:
        lines.append(f"| {row['name']} | " + " | ".join(
            f"{pc['agreement']['mean']:.0%} / {pc['context']['mean']:.0%}" for pc in row["per_concept"].values()) + " |")
    lines += ["", "Personalize s: what a user waits before the first image can be made: a trained method's job (wall "
              "seconds of its training in the run that made the cell, on whatever else the machine did), or nothing for "
              "an image prompt (its photos are encoded within the request: `python -m bench.bench_image_prompts`).",
              "", f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']}, "
              f"{report['cache']['misses']} cells computed, {report['cache']['hits']} from the cache)."]
    return "\n".join(lines) + "\n"


def paired(a: list[dict], b: list[dict], what: str) -> dict:
    """Fidelity of a - b over the units both measured (paired bootstrap)."""
    return {"what": what, **paired_difference(a, b, "agreement").as_dict()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--split", choices=(DEV, TEST), default=TEST)
    p.add_argument("--scales", nargs="+", type=float, default=[DEFAULT_SCALE],
                   help="image-prompt scales; the trained rows are made only for the first")
    p.add_argument("--image-prompt-only", action="store_true", help="no trained rows (the dev scale sweep)")
    p.add_argument("--seeds", type=int, default=Sampling.seeds)
    p.add_argument("--steps", type=int, default=Sampling.steps)
    p.add_argument("--guidance", type=float, default=Sampling.guidance)
    p.add_argument("--no-cache", action="store_true")
    add_run_arguments(p)
    args = p.parse_args(argv)
    t0 = start_run(args)
    concepts = split(CONCEPTS, args.split)
    setup = ImagePromptSetup(args.model, Sampling(args.seeds, args.steps, args.guidance),
                             ResultCache("quality_image_prompt", enabled=not args.no_cache))
    records: dict[str, dict] = {}

    def add(name: str, settings: str, cell: dict, concept: str, seconds) -> None:
        row = records.setdefault(name, {"name": name, "settings": settings, "records": [], "per_concept": {},
                                        "seconds_list": []})
        row["records"] += cell["records"]
        row["per_concept"][concept] = summarize(cell["records"])
        row["seconds_list"].append(seconds)

    scale = args.scales[0]
    for name in progress(concepts, desc="image-prompt cells"):
        concept = CONCEPTS[name]
        add("Before (base model)", "the class word only", before_cell(setup, concept), name, 0.0)
        for s in args.scales:
            add(f"Image prompt, scale {s:g}", f"{REFERENCES} photos, no training", image_prompt_cell(setup, concept, s), name, 0.0)
        if args.image_prompt_only:
            continue
        for method in TRAINED:
            alone, combined = trained_cells(setup, method, concept, scale)
            text = settings_text(method, resolved_settings(method, {}))
            add(SHORT[method], text, alone, name, alone["train_seconds"])
            add(f"{SHORT[method]} + image prompt ({scale:g})", text, combined, name, combined["train_seconds"])
    rows = []
    for row in records.values():
        seconds = row.pop("seconds_list")
        rows.append({**row, "summary": summarize(row["records"]), "seconds": f"{np.mean(seconds):.0f}" if any(seconds) else "0"})
    by_name = {r["name"]: r["records"] for r in rows}
    ip = by_name[f"Image prompt, scale {scale:g}"]
    differences = [paired(ip, by_name["Before (base model)"], "image prompt - before")]
    if not args.image_prompt_only:
        for method in TRAINED:
            differences.append(paired(ip, by_name[SHORT[method]], f"image prompt - {SHORT[method]}"))
            differences.append(paired(by_name[f"{SHORT[method]} + image prompt ({scale:g})"], by_name[SHORT[method]],
                                      f"{SHORT[method]} + image prompt - {SHORT[method]} alone"))
    for row in rows:
        row.pop("records")
    command = "python -m bench.quality_image_prompt" + (f" --split {args.split}" if args.split != TEST else "")
    if args.image_prompt_only:
        command += " --image-prompt-only --scales " + " ".join(f"{s:g}" for s in args.scales)
    if args.seeds != Sampling.seeds:
        command += f" --seeds {args.seeds}"
    report = {
        "settings": {"model": Path(args.model).name, "split": args.split, "concepts": concepts, "references": REFERENCES,
                     "sampling": asdict(setup.sampling), "scales": args.scales, "command": command},
        "rows": rows, "differences": differences,
        "cache": {"hits": setup.cache.hits, "misses": setup.cache.misses},
        "seconds": time.time() - t0, "machine": f"{platform.machine()}, {args.threads} threads",
    }
    stem = "quality_image_prompt" if args.split == TEST else f"quality_image_prompt_{args.split}"
    write_outputs(args.out_dir, stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
