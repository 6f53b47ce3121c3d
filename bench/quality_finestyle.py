"""FineStyle against a plain style LoRA on the world's held-out styles: style, prompt, leakage.

    python -m bench.quality_finestyle               # the table in the README and docs/personalize/finestyle.md
    python -m bench.quality_finestyle --styles neon-outline --seeds 2 --no-sweep

For each held-out style (service/world/heldout.py: a background + a rendering treatment the base
model never saw, and a reference image with objects of its own), train from the ONE reference image,
all with the same rank, steps, learning rate and seed:

- plain style LoRA on attn2 K/V (FineStyle's layers): the whole image with its whole caption
  ("a yellow star and a pink circle in zwx style"), which is also FineStyle without data scaling;
- plain style LoRA on all attention layers (attn1 + attn2, q/k/v/out), same data;
- FineStyle: concept-oriented data scaling, attn2 K/V (service/personalize/finestyle.py).

Then sample prompts that name OTHER objects in the style ("a blue square in zwx style": shapes the
style image does not hold) through the serving path (Engine + adapter bank), and read every image
with the attribute classifier:

- style fidelity: background kind, background colour and treatment as the style's (all three);
- prompt alignment: the asked object's shape and colour;
- content leakage: share of images showing a shape of the style image's objects that was not asked.

Rows: the base model (no adapter), each plain LoRA with ordinary CFG, the ablations (K/V LoRA
without data scaling under two-scale guidance; FineStyle under ordinary CFG), FineStyle with
two-scale guidance; then the sweep of the style scale and the prompt scale on FineStyle.
Writes bench/results/quality_finestyle.{json,md} and docs/images/finestyle_grid.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import add_run_arguments, apply_overrides, serving_engine, start_run
from bench.quality_personalize import grid
from service.basemodel import DEFAULT_MODEL_DIR
from service.engine.pipeline import AdapterUse, GenerationSpec
from service.measures import Judge
from service.personalize import FINESTYLE, Concept, FrozenBase, TrainingSpec, defaults, finestyle, train
from service.world.heldout import STYLES, shapes_outside

ROOT = Path(__file__).resolve().parent.parent
STYLE_PHRASE = "in zwx style"
# Colours of the asked objects: each differs from the style's background colour (so the object can
# be read) and the style's content colours are left out (so a leaked object is not an asked one).
COLORS = ("blue", "red", "green", "orange", "white", "purple", "yellow", "pink")

VARIANTS = {
    # name: (TrainingSpec.extra, style adapter?)
    "plain_kv": {"data_scaling": False},
    "plain_all": {"data_scaling": False, "targets": list(finestyle.ALL_ATTENTION_TARGETS)},
    "finestyle": {},
}
LABELS = {
    "base": "base model, no adapter",
    "plain_kv@cfg": "plain style LoRA, attn2 K/V (CFG)",
    "plain_all@cfg": "plain style LoRA, all attention (CFG)",
    "plain_kv@style": "ablation: FineStyle without data scaling",
    "finestyle@cfg": "ablation: FineStyle without two-scale guidance (CFG)",
    "finestyle@style": "**FineStyle**",
}


def prompts_for(style, n: int) -> list[str]:
    shapes = shapes_outside(style)
    taken = {style.bg_color} | {o.color for o in style.content}
    colors = [c for c in COLORS if c not in taken]
    return [f"a {colors[i % len(colors)]} {shapes[i % len(shapes)]} {STYLE_PHRASE}" for i in range(n)]


def sample(engine, prompts, seeds, adapter, steps, guidance, style_scale=0.0):
    images, asked = [], []
    uses = (AdapterUse(adapter, style=True),) if adapter else ()
    for prompt in prompts:
        out = engine.generate(GenerationSpec(prompt=prompt, steps=steps, guidance_scale=guidance, seed=0,
                                             num_images=seeds, adapters=uses, style_guidance_scale=style_scale))
        images += [np.asarray(im) for im in out.images]
        asked += [prompt] * seeds
    return images, asked


def scores(judge: Judge, style, images, prompts) -> dict:
    out, read = judge.read(images)
    style_ok = [[lab["background"] == style.background, lab["bg_color"] == style.bg_color,
                 lab["treatment"] == style.treatment] for lab in read]
    align = judge.prompt_alignment(images, prompts)
    leak = judge.content_leakage(images, prompts, forbidden_shapes={o.shape for o in style.content})
    s = np.array(style_ok, dtype=float)
    return {
        "style": round(float(s.all(1).mean()), 3), "background": round(float(s[:, 0].mean()), 3),
        "bg_color": round(float(s[:, 1].mean()), 3), "treatment": round(float(s[:, 2].mean()), 3),
        "shape": round(align["shape"], 3), "color": round(align["color"], 3), "prompt": round(align["all"], 3),
        "leakage": round(leak["forbidden"], 3), "any_extra_object": round(leak["leakage"], 3),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--styles", nargs="+", default=list(STYLES))
    p.add_argument("--prompts", type=int, default=8, help="prompts per style")
    p.add_argument("--seeds", type=int, default=3, help="images per prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--style-scale", type=float, default=finestyle.STYLE_GUIDANCE_SCALE)
    p.add_argument("--style-sweep", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0])
    p.add_argument("--guidance-sweep", type=float, nargs="*", default=[2.0, 4.0, 7.5])
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    add_run_arguments(p)
    p.add_argument("--grid-path", default=str(ROOT / "docs" / "images" / "finestyle_grid.png"))
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override a TrainingSpec field for every run (e.g. steps=600, extra.crops_per_concept=16)")
    args = p.parse_args(argv)

    t0 = start_run(args)
    judge = Judge()
    base = FrozenBase.from_pretrained(args.model)
    trained: dict[str, object] = {}
    engine = serving_engine(args.model, trained, max_rows=4 * args.seeds)
    d = defaults(FINESTYLE)

    results, grid_rows, train_seconds = [], [], {}
    for style_name in args.styles:
        style = STYLES[style_name]
        reference = style.reference()
        concepts = [Concept(f"a {o.phrase}") for o in style.content]  # no boxes: located by cross-attention
        prompts = prompts_for(style, args.prompts)
        rows: dict[str, dict] = {}
        shown: dict[str, list] = {}

        def record(name, images, asked, **extra):
            rows[name] = {**scores(judge, style, images, asked), **extra}
            shown[name] = images[:: args.seeds][:4]
            print(style_name, name, json.dumps(rows[name]), flush=True)

        record("base", *sample(engine, prompts, args.seeds, None, args.steps, args.guidance))
        for variant in args.variants:
            spec = TrainingSpec(method=FINESTYLE, images=[Image.fromarray(reference.image)], token=STYLE_PHRASE,
                                class_word="", steps=d.steps, learning_rate=d.learning_rate, rank=d.rank,
                                batch_size=d.batch_size, seed=0, concepts=concepts, style_phrase=STYLE_PHRASE,
                                extra=dict(VARIANTS[variant]))
            apply_overrides(spec, args.set)
            started = time.time()
            key = f"{variant}:{style_name}"
            trained[key] = train(base, spec)
            train_seconds[key] = round(time.time() - started, 1)
            record(f"{variant}@cfg", *sample(engine, prompts, args.seeds, key, args.steps, args.guidance))
            if variant != "plain_all":
                record(f"{variant}@style", *sample(engine, prompts, args.seeds, key, args.steps, args.guidance,
                                                   args.style_scale), style_scale=args.style_scale)
            if variant == "finestyle" and not args.no_sweep:
                for s in args.style_sweep:
                    if s != args.style_scale:
                        record(f"finestyle@style={s}", *sample(engine, prompts, args.seeds, key, args.steps,
                                                               args.guidance, s), style_scale=s)
                for g in args.guidance_sweep:
                    if g != args.guidance:
                        record(f"finestyle@guidance={g}", *sample(engine, prompts, args.seeds, key, args.steps, g,
                                                                  args.style_scale), style_scale=args.style_scale,
                               guidance=g)
            engine.adapters.manager.invalidate(key)
        results.append({"style": style_name, "prompts": prompts, "rows": rows})
        grid_rows.append((f"{style_name}\nreference", [reference.image]))
        for name, label in (("plain_kv@cfg", "plain LoRA K/V"), ("plain_all@cfg", "plain LoRA all attn"),
                            ("finestyle@style=1.0", "FineStyle style 1"), ("finestyle@style", f"FineStyle style {args.style_scale:g}"),
                            ("finestyle@style=4.0", "FineStyle style 4")):
            if name in shown:
                grid_rows.append((f"{style_name}\n{label}", shown[name]))

    names = list(dict.fromkeys(n for r in results for n in r["rows"]))
    means = {n: {k: float(np.mean([r["rows"][n][k] for r in results if n in r["rows"]]))
                 for k in ("style", "treatment", "background", "bg_color", "prompt", "shape", "color", "leakage")}
             for n in names}
    report = {
        "settings": {"model": Path(args.model).name, "prompts": args.prompts, "seeds": args.seeds, "steps": args.steps,
                     "guidance": args.guidance, "style_scale": args.style_scale, "style_phrase": STYLE_PHRASE,
                     "training": {"steps": d.steps, "rank": d.rank, "learning_rate": d.learning_rate,
                                  "batch_size": d.batch_size}, "overrides": args.set,
                     "command": "python -m bench.quality_finestyle"},
        "results": results, "means": means, "train_seconds": train_seconds,
        "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()}, {args.threads} CPU threads",
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality_finestyle.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "quality_finestyle.md").write_text(markdown(report))
    grid(grid_rows, Path(args.grid_path))
    print(markdown(report))
    return report


def _label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    variant, _, setting = name.partition("@")
    return f"FineStyle, {setting.replace('=', ' ')}"


def markdown(report: dict) -> str:
    s = report["settings"]
    t = s["training"]
    per_cell = s["prompts"] * s["seeds"]
    lines = [
        f"Held-out styles, ONE reference image each; every adapter rank {t['rank']}, {t['steps']} steps, batch "
        f"{t['batch_size']}, lr {t['learning_rate']}, seed 0. {s['prompts']} prompts naming objects the style image "
        f"does not hold (\"a blue square {s['style_phrase']}\") x {s['seeds']} seeds = {per_cell} images per cell "
        f"(DDIM {s['steps']} steps, guidance {s['guidance']}; two-scale guidance at style scale {s['style_scale']} "
        "unless the row says otherwise), read by the attribute classifier. Style: background kind + colour + "
        "treatment all the style's. Prompt: the asked shape and colour. Leakage: a shape of the style image's "
        "objects appears unasked (lower is better).",
        "",
        "Mean over the styles:",
        "",
        "| sampler / adapter | style ↑ | treatment | background | bg colour | prompt ↑ | shape | colour | leakage ↓ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["means"].items():
        lines.append(f"| {_label(name)} | {m['style']:.0%} | {m['treatment']:.0%} | {m['background']:.0%} | "
                     f"{m['bg_color']:.0%} | {m['prompt']:.0%} | {m['shape']:.0%} | {m['color']:.0%} | {m['leakage']:.0%} |")
    lines += ["", "Per style (style / prompt / leakage):", "",
              "| sampler / adapter | " + " | ".join(r["style"] for r in report["results"]) + " |",
              "|---|" + "---|" * len(report["results"])]
    for name in report["means"]:
        cells = [f"{r['rows'][name]['style']:.0%} / {r['rows'][name]['prompt']:.0%} / {r['rows'][name]['leakage']:.0%}"
                 if name in r["rows"] else "" for r in report["results"]]
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    lines += ["", "Train seconds (wall, this run): " + ", ".join(f"{k} {v:.0f}" for k, v in report["train_seconds"].items()),
              "", f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
