"""FineStyle against a plain style LoRA on the world's held-out styles: trade-off curves with 95%
intervals, and an ablation of every part of FineStyle.

    python -m bench.quality_finestyle                    # the test split: the README table and curves
    python -m bench.quality_finestyle --split dev        # where changes to the method are tried
    python -m bench.quality_finestyle --styles pixel-dots --seeds 2 --variants finestyle plain_kv

For each held-out style (service/research/world/heldout.py: a background + a rendering treatment the base
model never saw, and ONE reference image with objects of its own), train from that image, every
adapter with the profile's FineStyle rank, steps, learning rate and seed:

- plain style LoRA on attn2 K/V (FineStyle's layers): the whole image with its whole caption;
- plain style LoRA on all attention layers (attn1 + attn2, q/k/v/out), same data;
- FineStyle (service/personalize/finestyle.py), and one ablation per part: no concept crops (= the
  plain K/V LoRA under two-scale guidance), no loss masks, no concept phrases (crops captioned with
  the style phrase alone), all attention layers instead of K/V, tighter crops.

Then sample prompts that name OTHER objects in the style ("a blue square in zwx style") through the
serving path and read every image with the attribute classifier:

- style: background kind, background colour and treatment all the style's;
- prompt: the asked object's shape and colour;
- leakage: a shape of the style image's objects shows up unasked (lower is better).

The trade-off is drawn as curves, not single points: FineStyle across its style guidance scale (0 =
ordinary CFG) and its LoRA weight, the plain LoRAs across their LoRA weight (their only knob under
CFG). A unit is one (style, prompt), its seeds averaged; every figure is a mean over units with a 95%
bootstrap interval (bench/evaluation.py), and FineStyle against the plain K/V LoRA is also a paired
difference on the same units. Cells are cached (var/bench-cache/).
Writes bench/results/quality_finestyle[_dev].{json,md} and docs/images/finestyle_grid.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import add_run_arguments, serving_engine, start_run
from bench.evaluation import (
    ResultCache, estimate, grid, images_from_json, images_to_json, model_identity, paired_difference, progress,
    write_outputs,
)
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.engine.pipeline import AdapterUse, GenerationSpec
from service.research.measures import Judge
from service.research.measures.classifier import ALL_SHAPES
from service.personalize import FINESTYLE, Concept, FrozenBase, TrainingSpec, defaults, finestyle, train
from service.research.world.heldout import DEV, STYLES, TEST, shapes_outside, split

ROOT = Path(__file__).resolve().parent.parent
STYLE_PHRASE = "in zwx style"
# Colours of the asked objects: each differs from the style's background colour (so the object can
# be read) and the style's content colours are left out (so a leaked object is not an asked one).
COLORS = ("blue", "red", "green", "orange", "white", "purple", "yellow", "pink")
METRICS = ("style", "treatment", "background", "bg_color", "prompt", "shape", "color", "leakage")

# Trained variants: TrainingSpec.extra of each.
VARIANTS = {
    "finestyle": {},
    "plain_kv": {"data_scaling": False},
    "plain_all": {"data_scaling": False, "targets": list(finestyle.ALL_ATTENTION_TARGETS)},
    "no_masks": {"masks": False},
    "no_phrases": {"concept_phrases": False},
    "all_layers": {"targets": list(finestyle.ALL_ATTENTION_TARGETS)},
    "narrow_crops": {"crop_margin": [1.2, 2.0]},
}


# The method's own constants are part of every cell's key: a change to them is a change of method.
METHOD_CONSTANTS = {"crops_per_concept": finestyle.CROPS_PER_CONCEPT, "background_crops": finestyle.BACKGROUND_CROPS,
                    "crop_margin": list(finestyle.CROP_MARGIN), "background_max_overlap": finestyle.BACKGROUND_MAX_OVERLAP}


@dataclass(frozen=True)
class Point:
    """One way of sampling with a variant: two-scale style guidance (0: ordinary CFG), LoRA weight."""

    variant: str
    style_scale: float
    weight: float = 1.0
    label: str = ""


def points(style_scale: float) -> list[Point]:
    s = style_scale
    return [
        Point("base", 0.0, 0.0, "base model, no adapter"),
        *[Point("plain_kv", 0.0, w, f"plain style LoRA, attn2 K/V, weight {w:g} (CFG)") for w in (0.5, 1.0, 1.5)],
        *[Point("plain_all", 0.0, w, f"plain style LoRA, all attention, weight {w:g} (CFG)") for w in (0.5, 1.0)],
        *[Point("finestyle", g, 1.0, f"FineStyle, style scale {g:g}" + (" (= CFG)" if g == 0 else "")) for g in (0.0, 0.5, 1.0, 2.0, 4.0)],
        Point("finestyle", s, 0.5, f"FineStyle, style scale {s:g}, weight 0.5"),
        Point("plain_kv", s, 1.0, f"ablation: no concept crops (plain K/V LoRA, style scale {s:g})"),
        Point("no_masks", s, 1.0, f"ablation: no loss masks (style scale {s:g})"),
        Point("no_phrases", s, 1.0, f"ablation: no concept phrases (style scale {s:g})"),
        Point("all_layers", s, 1.0, f"ablation: all attention layers, not K/V (style scale {s:g})"),
        Point("narrow_crops", s, 1.0, f"ablation: crops 1.2-2x the object (the first default), not 2-3x (style scale {s:g})"),
    ]


def prompts_for(style, n: int) -> list[str]:
    shapes = shapes_outside(style)
    taken = {style.bg_color} | {o.color for o in style.content}
    colors = [c for c in COLORS if c not in taken]
    return [f"a {colors[i % len(colors)]} {shapes[i % len(shapes)]} {STYLE_PHRASE}" for i in range(n)]


def image_records(judge: Judge, style, images, prompts, units) -> list[dict]:
    """Per-image scores. Leakage as Judge.content_leakage reads it ("forbidden"): a shape of the
    style image's objects that the prompt did not ask for, seen by the presence head or named by
    an object head."""
    out, read = judge.read(images)
    forbidden = {o.shape for o in style.content}
    records = []
    for i, (lab, prompt, (unit, seed)) in enumerate(zip(read, prompts, units)):
        color_word, shape_word = prompt.split()[1:3]
        present = {s for s, p in zip(ALL_SHAPES, out["present"][i]) if p > judge.presence_threshold} | {lab["shape"]}
        if lab["count"] == "2":
            present.add(lab["shape2"])
        s = [lab["background"] == style.background, lab["bg_color"] == style.bg_color, lab["treatment"] == style.treatment]
        records.append({"item": style.name, "seed": unit, "image_seed": seed,
                        "style": float(all(s)), "background": float(s[0]), "bg_color": float(s[1]), "treatment": float(s[2]),
                        "shape": float(lab["shape"] == shape_word), "color": float(lab["color"] == color_word),
                        "prompt": float(lab["shape"] == shape_word and lab["color"] == color_word),
                        "leakage": float(bool((forbidden - {shape_word}) & present))})
    return records


class Run:
    def __init__(self, model: str, seeds: int, prompts: int, steps: int, guidance: float, cache: ResultCache):
        self.model, self.seeds, self.n_prompts, self.steps, self.guidance, self.cache = model, seeds, prompts, steps, guidance, cache
        self.model_id = model_identity(model)
        self.judge = Judge()
        self.adapters: dict[str, object] = {}
        self._base = self._engine = None
        self.train_seconds: dict[str, float] = {}

    @property
    def base(self):
        if self._base is None:
            self._base = FrozenBase.from_pretrained(self.model)
        return self._base

    @property
    def engine(self):
        if self._engine is None:
            self._engine = serving_engine(self.model, self.adapters, max_rows=6 * self.seeds)
        return self._engine

    def spec(self, style, variant: str, overrides: dict) -> TrainingSpec:
        d = defaults(FINESTYLE)
        extra = {**VARIANTS[variant], **{k[6:]: v for k, v in overrides.items() if k.startswith("extra.")}}
        spec = TrainingSpec(method=FINESTYLE, images=[Image.fromarray(style.reference().image)], token=STYLE_PHRASE,
                            class_word="", steps=d.steps, learning_rate=d.learning_rate, rank=d.rank,
                            batch_size=d.batch_size, seed=0, concepts=[Concept(f"a {o.phrase}") for o in style.content],
                            style_phrase=STYLE_PHRASE, extra=extra)
        for k, v in overrides.items():
            if not k.startswith("extra."):
                setattr(spec, k, v)
        return spec

    def cells(self, style, variant: str, pts: list[Point], overrides: dict) -> dict[Point, dict]:
        """Every point of one trained variant on one style; trains once, only if a point is missing."""
        spec = self.spec(style, variant, overrides) if variant != "base" else None
        settings = None if spec is None else {k: v for k, v in asdict(spec).items() if k not in ("images", "concepts")}
        sampling = {"seeds": self.seeds, "prompts": self.n_prompts, "steps": self.steps, "guidance": self.guidance}
        keys = {p: {"bench": "finestyle", "model": self.model_id, "style": style.name, "variant": variant,
                    "settings": settings, "method": METHOD_CONSTANTS, "sampling": sampling, "style_scale": p.style_scale, "weight": p.weight}
                for p in pts}
        out = {p: self.cache.get(k) for p, k in keys.items()}
        missing = [p for p, v in out.items() if v is None]
        self.cache.hits += len(pts) - len(missing)
        self.cache.misses += len(missing)
        key = f"{variant}:{style.name}"
        if missing and spec is not None:
            started = time.perf_counter()
            self.adapters[key] = train(self.base, spec)
            self.train_seconds[key] = round(time.perf_counter() - started, 1)
        for p in missing:
            value = self.sample(style, key if spec is not None else None, p)
            self.cache.put(keys[p], value)
            out[p] = value
        if key in self.adapters:
            self.engine.adapters.manager.invalidate(key)
            del self.adapters[key]
        return out

    def sample(self, style, adapter: str | None, p: Point) -> dict:
        prompts = prompts_for(style, self.n_prompts)
        uses = (AdapterUse(adapter, weight=p.weight, style=True),) if adapter else ()
        images, asked, units = [], [], []
        for i, prompt in enumerate(prompts):
            out = self.engine.generate(GenerationSpec(prompt=prompt, steps=self.steps, guidance_scale=self.guidance,
                                                      seed=0, num_images=self.seeds, adapters=uses,
                                                      style_guidance_scale=p.style_scale))
            images += [np.asarray(im) for im in out.images]
            asked += [prompt] * self.seeds
            units += [(i, s) for s in range(self.seeds)]
        return {"records": image_records(self.judge, style, images, asked, units),
                "tiles": images_to_json(images[:: self.seeds][:4])}


def markdown(report: dict) -> str:
    s = report["settings"]
    pct = lambda e: f"{e['mean']:.0%} [{e['lo'] * 100:.0f}, {e['hi'] * 100:.0f}]"  # noqa: E731
    diff = lambda e: f"{e['mean'] * 100:+.0f} [{e['lo'] * 100:+.0f}, {e['hi'] * 100:+.0f}]"  # noqa: E731
    t = s["training"]
    lines = [
        f"**{s['split']} split** ({', '.join(s['styles'])}), ONE reference image each; every adapter rank {t['rank']}, "
        f"{t['steps']} steps, batch {t['batch_size']}, lr {t['learning_rate']}, seed 0. {s['prompts']} prompts naming "
        f"objects the style image does not hold (\"a blue square {s['style_phrase']}\") x {s['seeds']} seeds per style "
        f"(DDIM {s['steps']} steps, prompt guidance {s['guidance']}), read by the attribute classifier. Style: background "
        "kind + colour + treatment all the style's. Prompt: the asked shape and colour. Leakage: a shape of the style "
        "image's objects appears unasked. Every figure: mean over units (one style x one prompt, its seeds averaged) "
        "[95% interval, styles resampled, then prompts within them], n = units.",
        "",
        "| sampler / adapter | style ↑ | prompt ↑ | leakage ↓ | treatment | background | bg colour | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        e = row["estimates"]
        lines.append(f"| {row['label']} | {pct(e['style'])} | {pct(e['prompt'])} | {pct(e['leakage'])} | "
                     f"{pct(e['treatment'])} | {pct(e['background'])} | {pct(e['bg_color'])} | {e['style']['n']} |")
    lines += ["", "Paired differences on the same units (points; positive = more):", "",
              "| comparison | style | prompt | leakage | n |", "|---|---|---|---|---|"]
    for c in report["comparisons"]:
        lines.append(f"| {c['label']} | {diff(c['style'])} | {diff(c['prompt'])} | {diff(c['leakage'])} | {c['style']['n']} |")
    lines += ["", "Per style (style / prompt / leakage, means):", "",
              "| sampler / adapter | " + " | ".join(s["styles"]) + " |", "|---|" + "---|" * len(s["styles"])]
    for row in report["rows"]:
        cells = [f"{v['style']:.0%} / {v['prompt']:.0%} / {v['leakage']:.0%}" for v in row["per_style"].values()]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Train seconds (wall, in the run that computed them): " +
              (", ".join(f"{k} {v:.0f}" for k, v in report["train_seconds"].items()) or "all cells from the cache"),
              "", f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']}, "
              f"{report['cache']['misses']} cells computed, {report['cache']['hits']} from the cache)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--split", choices=(DEV, TEST), default=TEST)
    p.add_argument("--styles", nargs="+", default=None, help="default: every style of the split")
    p.add_argument("--prompts", type=int, default=8, help="prompts per style (the units)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--style-scale", type=float, default=finestyle.STYLE_GUIDANCE_SCALE)
    p.add_argument("--variants", nargs="+", default=["base", *VARIANTS])
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override a TrainingSpec field for every variant (JSON value; extra.KEY for a switch)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="compute every N-th (style, variant) from the I-th")
    p.add_argument("--grid-path", default=None)
    add_run_arguments(p)
    args = p.parse_args(argv)

    t0 = start_run(args)
    styles = args.styles or split(STYLES, args.split)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    run = Run(args.model, args.seeds, args.prompts, args.steps, args.guidance,
              ResultCache("quality_finestyle", enabled=not args.no_cache))
    pts = [pt for pt in points(args.style_scale) if pt.variant in args.variants]
    by_variant: dict[str, list[Point]] = {}
    for pt in pts:
        by_variant.setdefault(pt.variant, []).append(pt)
    work = [(s, v) for s in styles for v in by_variant]
    shard, shards = (int(x) for x in args.shard.split("/"))
    results: dict[tuple[str, Point], dict] = {}
    for style_name, variant in progress(work[shard::shards], desc="finestyle cells"):
        for pt, value in run.cells(STYLES[style_name], variant, by_variant[variant], overrides).items():
            results[(style_name, pt)] = value
    if shards > 1:
        return {}

    rows, grid_rows = [], []
    for pt in pts:
        recs = [r for s in styles for r in results[(s, pt)]["records"]]
        rows.append({"label": pt.label, "variant": pt.variant, "style_scale": pt.style_scale, "weight": pt.weight,
                     "estimates": {m: estimate(recs, m).as_dict() for m in METRICS},
                     "per_style": {s: {m: float(np.mean([r[m] for r in results[(s, pt)]["records"]])) for m in METRICS}
                                   for s in styles}})
    all_recs = {pt: [r for s in styles for r in results[(s, pt)]["records"]] for pt in pts}
    comparisons = []

    def compare(a: Point, b: Point, label: str) -> None:
        comparisons.append({"label": label, **{m: paired_difference(all_recs[a], all_recs[b], m).as_dict()
                                               for m in ("style", "prompt", "leakage")}})

    fs = next((pt for pt in pts if pt.variant == "finestyle" and pt.style_scale == args.style_scale and pt.weight == 1.0), None)
    plain = next((pt for pt in pts if pt.variant == "plain_kv" and pt.style_scale == 0 and pt.weight == 1.0), None)
    # The curve against the plain K/V LoRA (the paper's comparison: leakage at equal style) ...
    for pt in pts:
        if pt.variant == "finestyle" and plain is not None:
            compare(pt, plain, f"{pt.label} − {plain.label}")
    # ... and every ablation against FineStyle at the default scale.
    for other in pts:
        if fs is not None and other.style_scale == args.style_scale and other.variant not in ("finestyle", "base"):
            compare(fs, other, f"FineStyle (scale {args.style_scale:g}) − {other.label}")
    for s in styles:
        grid_rows.append((f"{s}\nreference", [STYLES[s].reference().image]))
        for pt in pts:
            if pt.variant in ("plain_kv", "plain_all") and pt.weight == 1.0 and pt.style_scale == 0 or \
                    pt.variant == "finestyle" and pt.weight == 1.0 and pt.style_scale in (1.0, 2.0, 4.0):
                grid_rows.append((f"{s}\n{pt.label[:28]}", images_from_json(results[(s, pt)]["tiles"])))
    d = defaults(FINESTYLE)
    stem = "quality_finestyle" if args.split == TEST else f"quality_finestyle_{args.split}"
    report = {
        "settings": {"model": Path(args.model).name, "split": args.split, "styles": styles, "prompts": args.prompts,
                     "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance, "style_scale": args.style_scale,
                     "style_phrase": STYLE_PHRASE, "overrides": overrides,
                     "training": {"steps": d.steps, "rank": d.rank, "learning_rate": d.learning_rate, "batch_size": d.batch_size},
                     "command": "python -m bench.quality_finestyle" + (f" --split {args.split}" if args.split != TEST else "")},
        "rows": rows, "comparisons": comparisons, "train_seconds": run.train_seconds,
        "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()}, {args.threads} CPU threads",
        "cache": {"hits": run.cache.hits, "misses": run.cache.misses},
    }
    write_outputs(args.out_dir, stem, report, markdown(report))
    grid_path = args.grid_path or (ROOT / "docs" / "images" / "finestyle_grid.png" if args.split == TEST else None)
    if grid_path:
        grid(grid_rows, Path(grid_path), label_width=200)
    return report


if __name__ == "__main__":
    main()
