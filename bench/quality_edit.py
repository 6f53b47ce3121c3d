"""Editing quality on the world's held-out concepts, with 95% paired intervals: DDS against
DreamSteerer for each subject method, and every DreamSteerer component's ablation.

    python -m bench.quality_edit                          # the README table: TEST split, DDS vs DreamSteerer
    python -m bench.quality_edit --table ablations        # each component off, against full DreamSteerer
    python -m bench.quality_edit --split dev --set steer_steps=60      # tune on the dev split
    python -m bench.quality_edit --shard 0/2 --threads 1  # (and 1/2 beside it) fill the cache in 2 processes

For every (method, held-out concept of the split): an adapter trained as the personalization table's
(service/personalize with the model profile's defaults, 4 reference photos; `--one-shot` adds
adapters trained on ONE photo), then edits of the concept's 8 edit sources (HeldOutConcept.
edit_sources: varied layouts, sizes and backgrounds, one or two objects, the edited object's shape
the class word's or another) with the target prompt = the source caption with its first object
replaced by "<token> <class word>", through the serving path (service.edit.runner: engine + adapter
bank + workbench; a cell's 8 edits run side by side and share UNet calls). Each edit is a unit
(concept x source, seed = source index); DDS and DreamSteerer see the same sources and seeds, so
their difference gets a PAIRED bootstrap interval (bench/evaluation.py). Measures:

- structure: SSIM to the source; background error (mean absolute error, 0-255, outside the edited
  object grown by 4 px: a second object counts as background); feature distance (LPIPS-style, the
  classifier's features); the VAE round trip of the sources is the floor no latent edit beats;
- concept: fidelity (the classifier reads the concept's shape + colour + texture in the largest
  object, which is the edited one), the concept colour's share of the object region's pixels, and
  the embedding similarity to the reference photos (the CLIP-I stand-in).

Cells (8 edits each) and adapters are cached under var/bench-cache/, so a rerun recomputes only
what changed. Writes bench/results/quality_edit[_ablations][_dev].{json,md} and, for the test
split's main table, docs/images/edit_grid.png (source, DDS, DreamSteerer, mask).
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

from bench.common import add_run_arguments, serving_engine, start_run
from bench.evaluation import (
    ResultCache, estimate, grid, images_from_json, images_to_json, model_identity, paired_difference, progress,
    write_outputs,
)
from bench.quality_personalize import METHOD_SHORT, resolved_settings, token_for, training_spec
from service.adapters import parse_adapter, serialize_adapter
from service.edit import EditOptions, EditSpec
from service.edit.runner import run_edits
from service.edit.workbench import Workbench
from service.engine.pipeline import AdapterUse
from service.personalize import SUBJECT_METHODS, FrozenBase, train
from service.profiles import choose
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.measures import Judge
from service.research.measures.metrics import colour_share, structure_preservation
from service.research.world.generator import Scene, _erode, _with_article, render
from service.research.world.heldout import CONCEPTS, DEV, TEST, HeldOutConcept, split

ROOT = Path(__file__).resolve().parent.parent
REFERENCES = 4
VARIANTS = {
    "dds": ("DDS", {}),
    "dreamsteerer": ("DREAMSTEERER", {}),
    "no_edsd": ("DREAMSTEERER", {"edsd": False}),
    "no_mode_shifting": ("DREAMSTEERER", {"mode_shifting": False}),
    "no_guided": ("DREAMSTEERER", {"feature_injection": False}),  # mode shifting on unguided samples
    "no_bias_correction": ("DREAMSTEERER", {"bias_correction": False}),
    "no_mask": ("DREAMSTEERER", {"use_subject_mask": False}),
}
VARIANT_LABEL = {"dds": "DDS", "dreamsteerer": "DreamSteerer", "no_edsd": "without EDSD",
                 "no_mode_shifting": "without mode shifting", "no_guided": "mode shifting on unguided samples",
                 "no_bias_correction": "without bias correction", "no_mask": "without subject mask"}
TABLES = {"main": ("dds", "dreamsteerer"),
          "ablations": ("dreamsteerer", "no_edsd", "no_mode_shifting", "no_guided", "no_bias_correction", "no_mask")}
STRUCTURE = ("ssim", "background_error", "feature_distance")
CONCEPT = ("agreement", "colour_share", "similarity")
METRICS = STRUCTURE + CONCEPT + ("shape", "color", "texture")
LOWER_IS_BETTER = {"background_error", "feature_distance"}
# EditOptions fields added after cells were cached, with the value those cells ran with: a cell's
# key leaves such a field out at that value, so the cells stay valid.
LEGACY_OPTIONS = {"guided_feature_fraction": 0.8, "guided_attention_fraction": 0.5}
DDS_OPTIONS = ("iterations", "guidance_scale", "learning_rate", "t_min", "t_max")
GROW = 4  # px the edited object's mask is grown by before "outside" starts


def target_prompt(scene: Scene, token: str, class_word: str) -> str:
    """The source caption with its first object replaced by the concept."""
    first = _with_article(scene.objects[0].phrase)
    return scene.caption.replace(first, f"a {token} {class_word}", 1)


class Setup:
    """The base model to train on, the serving engine and workbench to edit with, the judge, caches."""

    def __init__(self, model: str, cache: bool, edits_per_cell: int, train_overrides: dict | None = None):
        self.model = model
        self.train_overrides = dict(train_overrides or {})
        self.model_id = model_identity(model)
        self.cells = ResultCache("quality_edit", enabled=cache)
        self.adapter_cache = ResultCache("edit_adapters", enabled=cache)
        self.judge = Judge()
        self.adapters: dict[str, object] = {}
        self.base = FrozenBase.from_pretrained(model)
        self.workbench = Workbench(FrozenBase.from_pretrained(model))
        # A cell's edits run side by side: 4 rows each, a slot for the adapter and one per steered copy.
        self.engine = serving_engine(model, self.adapters, max_rows=4 * edits_per_cell, num_slots=edits_per_cell + 2)

    def adapter(self, method: str, concept: HeldOutConcept, photos: int) -> tuple[str, str]:
        """(bank key, token) of the method's adapter for the concept, trained once and cached."""
        settings = self.training(method)
        key = {"model": self.model_id, "method": method, "settings": settings, "concept": concept.name, "photos": photos}

        def compute() -> bytes:
            spec = training_spec(method, concept, settings)
            spec.images = spec.images[:photos]
            return serialize_adapter(train(self.base, spec))

        blob = self.adapter_cache.blob(key, compute)
        name = f"{method}:{concept.name}:{photos}"
        self.adapters[name] = parse_adapter(blob)
        return name, token_for(method)

    def training(self, method: str) -> dict:
        """The adapter's training settings: the profile's defaults, then --train-set."""
        return resolved_settings(method, self.train_overrides)


def score(judge: Judge, concept: HeldOutConcept, sources, edits) -> list[dict]:
    """Per-edit records (unit: concept x source index)."""
    read, labels = judge.read(edits)
    ref_read, _ = judge.read([r.image for r in concept.references(REFERENCES, seed=0)])
    centre = ref_read["embedding"].mean(0)
    centre /= np.linalg.norm(centre)
    similarity = read["embedding"] @ centre
    distance = judge.feature_distance([s.image for s in sources], edits)
    records = []
    for i, (source, edit, lab) in enumerate(zip(sources, edits, labels)):
        edited_object = source.masks[0]
        grown = ~_erode(~edited_object, GROW)
        s = structure_preservation(source.image, edit, grown)
        shape, color, texture = lab["shape"] == concept.shape, lab["color"] == concept.color, lab["texture"] == concept.texture
        records.append({
            "item": concept.name, "seed": i, "ssim": round(s["ssim"], 4), "background_error": round(s["outside_mae"], 3),
            "feature_distance": round(float(distance[i]), 4), "agreement": float(shape and color and texture),
            "shape": float(shape), "color": float(color), "texture": float(texture),
            "colour_share": round(colour_share(edit, ~_erode(~edited_object, 2), concept.color), 4),
            "similarity": round(float(similarity[i]), 4),
        })
    return records


def edit_cell(setup: Setup, method: str, concept: HeldOutConcept, photos: int, variant: str,
              options: EditOptions) -> dict:
    edit_method, changes = VARIANTS[variant]
    used = asdict(options.replace(**changes))
    if edit_method == "DDS":  # DreamSteerer's options do not touch a DDS cell
        used = {k: used[k] for k in DDS_OPTIONS}
    injecting = used.get("mode_shifting") and used.get("feature_injection") and used.get("guided_samples", 0) > 0
    for k, legacy in LEGACY_OPTIONS.items():
        # Left out where no injection runs (the fraction changes nothing), and at the value cells
        # made before the option existed ran with (their keys stay valid).
        if k in used and (not injecting or used[k] == legacy):
            del used[k]
    key = {"bench": "edit", "model": setup.model_id, "method": method, "concept": concept.name, "photos": photos,
           "training": setup.training(method), "edit_method": edit_method, "options": used,
           "sources": [s.caption for s in concept.edit_sources()]}

    def compute() -> dict:
        adapter, token = setup.adapter(method, concept, photos)
        scenes = concept.edit_sources()
        sources = [render(s) for s in scenes]
        specs = [EditSpec(method=edit_method, source=src.image, source_prompt=scene.caption,
                          target_prompt=target_prompt(scene, token, concept.class_word), adapter=AdapterUse(adapter),
                          adapter_method=method, token=token, class_word=concept.class_word, seed=i,
                          options=options.replace(**changes))
                 for i, (scene, src) in enumerate(zip(scenes, sources))]
        started = time.perf_counter()
        outs = run_edits(setup.engine, setup.workbench, specs)
        elapsed = time.perf_counter() - started
        setup.engine.adapters.manager.invalidate(adapter)
        edits = [o.image for o in outs]
        masks = [(np.stack([o.mask] * 3, -1) * 255).astype(np.uint8) if o.mask is not None else np.zeros_like(o.image)
                 for o in outs]
        return {"records": score(setup.judge, concept, sources, edits), "tiles": images_to_json(edits),
                "masks": images_to_json(masks), "seconds_per_edit": round(elapsed / len(specs), 2),
                "steer_losses": [o.steer_losses for o in outs]}

    return setup.cells.cell(key, compute)


def round_trip_records(setup: Setup, concept: HeldOutConcept) -> list[dict]:
    """The VAE's own round trip of the sources: the structure no latent edit can beat."""
    sources = [render(s) for s in concept.edit_sources()]
    trips = [setup.engine.decode_array(setup.engine.encode_image(Image.fromarray(s.image)))[0] for s in sources]
    return score(setup.judge, concept, sources, trips)


def summary(records: list[dict]) -> dict:
    return {m: estimate(records, m).as_dict() for m in METRICS}


def fmt(e: dict, metric: str, signed: bool = False) -> str:
    if metric in ("agreement", "colour_share", "shape", "color", "texture"):
        scale, digits, unit = 100, 0, ""
    elif metric == "background_error":
        scale, digits, unit = 1, 1, ""
    else:
        scale, digits, unit = 1, 3, ""
    sign = "+" if signed else ""
    return (f"{e['mean'] * scale:{sign}.{digits}f} [{e['lo'] * scale:{sign}.{digits}f}, "
            f"{e['hi'] * scale:{sign}.{digits}f}]{unit}")


HEADERS = {"ssim": "SSIM ↑", "background_error": "background error ↓", "feature_distance": "feature distance ↓",
           "agreement": "fidelity % ↑", "colour_share": "concept colour % of object ↑", "similarity": "similarity ↑"}


def markdown(report: dict) -> str:
    s = report["settings"]
    shown = STRUCTURE + CONCEPT
    lines = [
        f"**{s['split']} split** ({len(s['concepts'])} concepts: {', '.join(s['concepts'])}); "
        f"{s['sources_per_concept']} edit sources each (HeldOutConcept.edit_sources); adapters trained with the "
        f"model profile's defaults; editing options {s['options_text']}. Each figure: mean over edits (a unit = one "
        "concept x one source) [95% interval, concepts resampled, then sources within them]; a Δ row is the PAIRED "
        "difference (same sources and seeds, resampled the same way) "
        "with its interval: an interval that excludes 0 is a difference this n can show. "
        f"VAE round trip of the sources (the floor): SSIM {report['floor']['ssim']['mean']:.3f}, background error "
        f"{report['floor']['background_error']['mean']:.1f}, feature distance {report['floor']['feature_distance']['mean']:.3f}.",
        "",
        "| adapter | variant | n | " + " | ".join(HEADERS[m] for m in shown) + " | s / edit |",
        "|---|---|---|" + "---|" * len(shown) + "---|",
    ]
    for adapter, rows in report["adapters"].items():
        for variant, r in rows["variants"].items():
            lines.append(f"| {adapter} | {VARIANT_LABEL[variant]} | {r['agreement']['n']} | "
                         + " | ".join(fmt(r[m], m) for m in shown) + f" | {rows['seconds'][variant]:.1f} |")
        for variant, d in rows["differences"].items():
            lines.append(f"| {adapter} | Δ {d['label']} | {d['agreement']['n']} | "
                         + " | ".join(fmt(d[m], m, signed=True) for m in shown) + " | |")
    steer_lines = []
    for adapter, rows in report["adapters"].items():
        for variant, st in rows.get("steering", {}).items():
            if st:
                parts = [f"{name} {v['first']:.4f} → {v['last']:.4f} (lower in {v['lower_in']:.0%} of edits)"
                         for name, v in st.items()]
                steer_lines.append(f"- {adapter}, {VARIANT_LABEL[variant]}: " + "; ".join(parts))
    if steer_lines:
        lines += ["", "Steering's objectives, mean over the first and the last 5 steps of each edit:", ""] + steer_lines
    lines += ["", "Fidelity: the classifier reads the concept's shape + colour + texture in the edited (largest) "
              "object. Concept colour: share of the object region's pixels (the source object grown by 2 px) whose "
              "nearest world colour is the concept's. Feature distance: LPIPS-style, over the world classifier's "
              "features (no LPIPS weights exist here). s / edit: wall seconds per edit with a cell's 8 edits side by "
              "side, in whatever run made the cell; `python -m bench.bench_edit` measures speed alone.",
              "", f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']}, "
              f"{report['cache']['misses']} cells computed, {report['cache']['hits']} from the cache)."]
    return "\n".join(lines) + "\n"


def steering_summary(per_edit: list[list[dict]], k: int = 5) -> dict:
    """What steering did to its objectives: each loss averaged over the first and the last `k`
    steps of every edit (one step's loss is noisy: its t is random)."""
    out = {}
    for name in ("edsd", "mode_shifting"):
        first = [np.mean([s[name] for s in losses[:k]]) for losses in per_edit if losses and name in losses[0]]
        last = [np.mean([s[name] for s in losses[-k:]]) for losses in per_edit if losses and name in losses[0]]
        if first:
            out[name] = {"first": round(float(np.mean(first)), 5), "last": round(float(np.mean(last)), 5),
                         "lower_in": round(float(np.mean([b < a for a, b in zip(first, last)])), 3)}
    return out


def profile_edit(model: str) -> dict:
    """The model profile's editing defaults (service/profiles.py), as the gateway applies them."""
    return dict(choose(model).profile.edit)


def options_text(options: EditOptions) -> str:
    d = EditOptions()
    changed = {k: v for k, v in asdict(options).items() if v != getattr(d, k)}
    base = f"{options.iterations} DDS iterations, guidance {options.guidance_scale:g}"
    return base + "".join(f", {k}={v}" for k, v in changed.items() if k not in ("iterations", "guidance_scale"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--split", choices=(DEV, TEST), default=TEST)
    p.add_argument("--table", choices=tuple(TABLES), default="main")
    p.add_argument("--methods", nargs="+", default=list(SUBJECT_METHODS))
    p.add_argument("--concepts", nargs="+", default=None, help="default: every concept of the split")
    p.add_argument("--variants", nargs="+", default=None, choices=tuple(VARIANTS),
                   help="only these of the table's variants (e.g. to fill the cache for one of them)")
    p.add_argument("--one-shot", action="store_true", help="add adapters trained on ONE photo (main table)")
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="override an EditOptions field (JSON value)")
    p.add_argument("--train-set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override a TrainingSpec field of the adapters (JSON value), as quality_personalize's --set")
    p.add_argument("--against-defaults", action="store_true",
                   help="with --set: also each variant at the profile's defaults, and the paired difference "
                        "(--set minus defaults) per variant: how a candidate default is judged on the dev split")
    p.add_argument("--no-cache", action="store_true", help="recompute every cell")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="compute only every N-th cell (from the I-th) and write nothing: run N processes with "
                        "--threads 1 side by side, then once without --shard to write the table from the cache")
    p.add_argument("--grid-path", default=None, help="default: docs/images/edit_grid.png for the test split's main table")
    add_run_arguments(p)
    args = p.parse_args(argv)

    t0 = start_run(args)
    concepts = args.concepts or split(CONCEPTS, args.split)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    # The model profile's edit defaults (service/profiles.py), then --set.
    options = EditOptions(**profile_edit(args.model)).replace(**overrides)
    per_cell = CONCEPTS[concepts[0]].edit_sources().__len__()
    train_overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.train_set)}
    setup = Setup(args.model, not args.no_cache, per_cell, train_overrides)
    variants = tuple(v for v in TABLES[args.table] if not args.variants or v in args.variants)
    photo_cases = [REFERENCES] + ([1] if args.one_shot and args.table == "main" else [])
    cells = [(m, c, ph, v) for ph in photo_cases for m in args.methods for c in concepts for v in variants]
    shard, shards = (int(v) for v in args.shard.split("/"))
    if shards > 1:
        for method, name, photos, variant in progress(cells[shard::shards], desc=f"edit cells, shard {shard}/{shards}"):
            edit_cell(setup, method, CONCEPTS[name], photos, variant, options)
            if args.against_defaults:
                edit_cell(setup, method, CONCEPTS[name], photos, variant, EditOptions(**profile_edit(args.model)))
        return {}

    floor_records = [r for name in concepts for r in round_trip_records(setup, CONCEPTS[name])]
    records: dict[tuple, list[dict]] = {}
    timing: dict[tuple, list[float]] = {}
    steering: dict[tuple, list[list[dict]]] = {}
    grid_rows = []
    defaults_options = EditOptions(**profile_edit(args.model))
    against: dict[tuple, list[dict]] = {}
    for method, name, photos, variant in progress(cells, desc="edit cells"):
        value = edit_cell(setup, method, CONCEPTS[name], photos, variant, options)
        if args.against_defaults:
            base_value = edit_cell(setup, method, CONCEPTS[name], photos, variant, defaults_options)
            against.setdefault((method, photos, variant), []).extend(base_value["records"])
        records.setdefault((method, photos, variant), []).extend(value["records"])
        timing.setdefault((method, photos, variant), []).append(value["seconds_per_edit"])
        steering.setdefault((method, photos, variant), []).extend(value["steer_losses"])
        if args.table == "main" and name == concepts[0]:
            label = METHOD_SHORT[method] + (" (one photo)" if photos == 1 else "")
            grid_rows.append((f"{label}\n{VARIANT_LABEL[variant]}", images_from_json(value["tiles"])))
            if variant == "dreamsteerer":
                grid_rows.append((f"{label}\nsubject mask", images_from_json(value["masks"])))
    reference = variants[0]  # main: differences against DDS; ablations: against full DreamSteerer
    adapters = {}
    for method in args.methods:
        for photos in photo_cases:
            label = METHOD_SHORT[method] + (" (one photo)" if photos == 1 else "")
            rows = {"variants": {}, "differences": {}, "seconds": {}, "steering": {}}
            for variant in variants:
                rows["variants"][variant] = summary(records[(method, photos, variant)])
                rows["steering"][variant] = steering_summary(steering[(method, photos, variant)])
                rows["seconds"][variant] = float(np.mean(timing[(method, photos, variant)]))
                if variant != reference:
                    diff = {m: paired_difference(records[(method, photos, variant)], records[(method, photos, reference)],
                                                 m).as_dict() for m in METRICS}
                    diff["label"] = f"{VARIANT_LABEL[variant]} − {VARIANT_LABEL[reference]}"
                    rows["differences"][variant] = diff
                if args.against_defaults:
                    diff = {m: paired_difference(records[(method, photos, variant)], against[(method, photos, variant)],
                                                 m).as_dict() for m in METRICS}
                    diff["label"] = f"{VARIANT_LABEL[variant]}: these settings − defaults"
                    rows["differences"][f"{variant}:against_defaults"] = diff
            adapters[label] = rows
    if grid_rows:
        first = CONCEPTS[concepts[0]]
        grid_rows.insert(0, (f"sources\n({first.name})", [render(s).image for s in first.edit_sources()]))
    stem = "quality_edit" + ("" if args.table == "main" else f"_{args.table}") + ("" if args.split == TEST else f"_{args.split}")
    if overrides:  # a candidate's table never overwrites the defaults' table
        stem += "_" + "_".join(f"{k}-{v}" for k, v in sorted(overrides.items()))
    command = "python -m bench.quality_edit" + (f" --table {args.table}" if args.table != "main" else "") + (
        f" --split {args.split}" if args.split != TEST else "") + (" --one-shot" if len(photo_cases) > 1 else "") + (
        f" --methods {' '.join(args.methods)}" if list(args.methods) != list(SUBJECT_METHODS) else "") + (
        f" --concepts {' '.join(args.concepts)}" if args.concepts else "") + (
        f" --variants {' '.join(args.variants)}" if args.variants else "") + (
        f" --set {' '.join(args.set)}" if args.set else "") + (" --against-defaults" if args.against_defaults else "")
    report = {
        "settings": {"model": Path(args.model).name, "split": args.split, "table": args.table, "concepts": concepts,
                     "sources_per_concept": per_cell, "options": asdict(options), "options_text": options_text(options),
                     "overrides": overrides, "command": command},
        "floor": summary(floor_records),
        "adapters": adapters,
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {args.threads} CPU threads",
        "cache": {"hits": setup.cells.hits, "misses": setup.cells.misses},
    }
    write_outputs(args.out_dir, stem, report, markdown(report))
    grid_path = args.grid_path or (ROOT / "docs" / "images" / "edit_grid.png"
                                   if args.split == TEST and args.table == "main" else None)
    if grid_path and grid_rows:
        grid(grid_rows, Path(grid_path), label_width=200)
    return report


if __name__ == "__main__":
    main()
