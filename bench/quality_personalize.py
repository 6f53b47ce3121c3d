"""Personalization quality on the world's held-out concepts, with 95% intervals.

    python -m bench.quality_personalize                      # the README table: the TEST split, profile defaults
    python -m bench.quality_personalize --split dev --set steps=600 prior_loss_weight=0
    python -m bench.quality_personalize --methods DREAMBOOTH_LORA --concepts yellow-crescent --seeds 2

For every (method, held-out concept): train the method on 4 reference photos of the concept
(service/personalize, the code the jobs run) with the model profile's defaults (service/profiles.py)
or `--set` overrides, then sample "a <token> <class_word> on <a background the photos never showed>"
through the serving path (Engine + adapter bank) and read each image with the attribute classifier:

- fidelity (the CLIP-I stand-in): the object has the concept's shape, colour and texture (all
  three; each also reported), and the embedding similarity to the reference photos;
- context kept (the CLIP-T stand-in for the context): the background has the asked kind and colour.

"Before" is the same prompt on the base model without the adapter (the token means nothing to it).
A unit is one (concept, seed): the mean over its contexts' images. Every figure is a mean over
units with a 95% bootstrap interval (bench/evaluation.py); n is the number of units. Cells are
cached (var/bench-cache/), so a rerun recomputes only what changed.
Writes bench/results/quality_personalize[_dev].{json,md} and docs/images/personalize_grid.png.
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
    ResultCache, estimate, grid, images_from_json, images_to_json, model_identity, progress, write_outputs,
)
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.engine.pipeline import AdapterUse, Engine, GenerationSpec
from service.research.measures import Judge
from service.personalize import (
    SUBJECT_METHODS, FrozenBase, TrainingSpec, adapter_from_checkpoint, defaults, learns_token, train,
)
from service.personalize.tokens import default_token
from service.research.world.generator import _with_article
from service.research.world.heldout import CONCEPTS, DEV, TEST, HeldOutConcept, split
from service.research.world.vocab import BACKGROUND_WORDS

ROOT = Path(__file__).resolve().parent.parent
REFERENCES = 4
# New contexts, in order of preference: a concept gets the first CONTEXTS_PER_CONCEPT whose colour
# is not its own and that none of its reference photos shows.
CANDIDATE_CONTEXTS = (("solid", "white"), ("checker", "blue"), ("stripes", "black"), ("gradient", "orange"),
                      ("dots", "pink"), ("solid", "green"), ("checker", "yellow"), ("stripes", "red"),
                      ("dots", "purple"))
CONTEXTS_PER_CONCEPT = 6
METHOD_SHORT = {"DREAMBOOTH_LORA": "DreamBooth-LoRA", "TEXTUAL_INVERSION": "Textual Inversion",
                "CUSTOM_DIFFUSION": "Custom Diffusion"}
METRICS = ("agreement", "shape", "color", "texture", "similarity", "context", "context_background",
           "context_bg_color")
GRID_TILES = 6  # per cell: the first seed's image of each context


def contexts_for(concept: HeldOutConcept) -> list[tuple[str, str]]:
    shown = {(r.scene.background, r.scene.bg_color) for r in concept.references(REFERENCES, seed=0)}
    usable = [c for c in CANDIDATE_CONTEXTS if c[1] != concept.color and c not in shown]
    return usable[:CONTEXTS_PER_CONCEPT]


def context_phrase(kind: str, colour: str) -> str:
    return "on " + _with_article(" ".join(w for w in (colour, BACKGROUND_WORDS[kind]) if w)) + " background"


@dataclass(frozen=True)
class Sampling:
    seeds: int = 8  # images per (concept, context); a unit is one seed across the contexts
    steps: int = 25
    guidance: float = 4.0


class Setup:
    """What every cell needs: the base model to train on, the serving engine to sample with, the
    judge, the cache, and the sampling settings."""

    def __init__(self, model: str, sampling: Sampling, cache: ResultCache):
        self.model, self.sampling, self.cache = model, sampling, cache
        self.model_id = model_identity(model)
        self.judge = Judge()
        self._base: FrozenBase | None = None
        self.adapters: dict[str, object] = {}
        self._engine: Engine | None = None

    @property
    def base(self) -> FrozenBase:
        if self._base is None:
            self._base = FrozenBase.from_pretrained(self.model)
        return self._base

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = serving_engine(self.model, self.adapters, max_rows=4 * self.sampling.seeds)
        return self._engine

    def key(self, **parts) -> dict:
        return {"bench": "personalize", "model": self.model_id, "sampling": asdict(self.sampling), **parts}


def resolved_settings(method: str, overrides: dict) -> dict:
    """Every TrainingSpec field that decides a trained adapter: the method's defaults, then overrides
    (`extra.KEY` for a method switch)."""
    d = defaults(method)
    settings = {"steps": d.steps, "learning_rate": d.learning_rate, "rank": d.rank, "batch_size": d.batch_size,
                "prior_loss_weight": d.prior_loss_weight, "num_class_images": d.num_class_images,
                "train_text_encoder": d.train_text_encoder, "seed": 0, "extra": {}}
    for key, value in overrides.items():
        if key.startswith("extra."):
            settings["extra"] = {**settings["extra"], key[6:]: value}
        else:
            settings[key] = value
    return settings


def token_for(method: str) -> str:
    return default_token(learns_token=learns_token(method), taken=[])


def training_spec(method: str, concept: HeldOutConcept, settings: dict, checkpoint_every: int = 0) -> TrainingSpec:
    references = concept.references(REFERENCES, seed=0)
    return TrainingSpec(method=method, images=[Image.fromarray(r.image) for r in references], token=token_for(method),
                        class_word=concept.class_word, checkpoint_every=checkpoint_every,
                        **{k: (dict(v) if k == "extra" else v) for k, v in settings.items()})


def prompts_for(token: str, concept: HeldOutConcept) -> list[tuple[str, tuple[str, str]]]:
    return [(f"a {token} {concept.class_word} {context_phrase(*c)}".replace("  ", " "), c) for c in contexts_for(concept)]


def sample_and_score(setup: Setup, concept: HeldOutConcept, token: str, adapter_key: str | None,
                     image_prompt=None) -> dict:
    """Per-image records of one (adapter, concept) cell, and its grid tiles. `image_prompt`: an
    ImagePrompt every image also gets (bench/quality_image_prompt.py)."""
    s = setup.sampling
    uses = (AdapterUse(adapter_key),) if adapter_key else ()
    images, meta = [], []
    for i, (prompt, context) in enumerate(prompts_for(token, concept)):
        out = setup.engine.generate(GenerationSpec(prompt=prompt, steps=s.steps, guidance_scale=s.guidance, seed=0,
                                                   num_images=s.seeds, adapters=uses, image_prompt=image_prompt))
        images += [np.asarray(im) for im in out.images]
        meta += [(seed, i, context) for seed in range(s.seeds)]
    read, labels = setup.judge.read(images)
    ref_read, _ = setup.judge.read([r.image for r in concept.references(REFERENCES, seed=0)])
    centre = ref_read["embedding"].mean(0)
    centre /= np.linalg.norm(centre)
    similarity = read["embedding"] @ centre
    records = []
    for lab, sim, (seed, ci, (kind, colour)) in zip(labels, similarity, meta):
        shape, color, texture = lab["shape"] == concept.shape, lab["color"] == concept.color, lab["texture"] == concept.texture
        records.append({
            "item": concept.name, "seed": seed, "context_index": ci,
            "agreement": float(shape and color and texture), "shape": float(shape), "color": float(color),
            "texture": float(texture), "similarity": round(float(sim), 4),
            "context_background": float(lab["background"] == kind), "context_bg_color": float(lab["bg_color"] == colour),
            "context": float(lab["background"] == kind and lab["bg_color"] == colour),
        })
    tiles = [images[i] for i, (seed, _, _) in enumerate(meta) if seed == 0][:GRID_TILES]
    return {"records": records, "tiles": images_to_json(tiles)}


def before_cell(setup: Setup, method: str, concept: HeldOutConcept) -> dict:
    token = token_for(method)
    key = setup.key(what="before", token=token, concept=concept.name, contexts=contexts_for(concept))
    return setup.cache.cell(key, lambda: sample_and_score(setup, concept, token, None))


def after_cells(setup: Setup, method: str, settings: dict, concept: HeldOutConcept,
                snapshot_steps: tuple[int, ...] = ()) -> dict[int, dict]:
    """The cells of `settings` at its own step count and at each of `snapshot_steps` (fewer steps of
    the same run: a snapshot at step k IS the k-step job, since every step's randomness depends on
    (seed, step) alone). Trains once, only if a cell is missing."""
    counts = sorted({*snapshot_steps, settings["steps"]})
    keys = {n: setup.key(what="after", method=method, settings={**settings, "steps": n}, concept=concept.name,
                         contexts=contexts_for(concept), references=REFERENCES) for n in counts}
    out = {n: setup.cache.get(k) for n, k in keys.items()}
    missing = [n for n, v in out.items() if v is None]
    setup.cache.hits += len(counts) - len(missing)
    setup.cache.misses += len(missing)
    if not missing:
        return out
    spec = training_spec(method, concept, settings)
    snapshots: dict[int, bytes] = {}

    class Snapshots:
        def step(self, step, total, loss):
            pass

        def checkpoint(self, step, state):
            if step in missing:
                snapshots[step] = state

        def should_stop(self):
            return False

    # Checkpoints every gcd of the counts, so every asked count gets one.
    spec.checkpoint_every = int(np.gcd.reduce(counts)) if len(counts) > 1 else 0
    started = time.perf_counter()
    final = train(setup.base, spec, Snapshots())
    train_seconds = time.perf_counter() - started
    for n in missing:
        adapter = final if n == settings["steps"] else adapter_from_checkpoint(spec, snapshots[n])
        key = f"{method}:{concept.name}:{n}"
        setup.adapters[key] = adapter
        value = sample_and_score(setup, concept, spec.token, key)
        value["train_seconds"] = round(train_seconds * n / settings["steps"], 1)
        setup.engine.adapters.manager.invalidate(key)
        del setup.adapters[key]
        setup.cache.put(keys[n], value)
        out[n] = value
    return out


def summarize(records: list[dict]) -> dict:
    return {m: estimate(records, m).as_dict() for m in METRICS}


def pct(e: dict) -> str:
    return f"{e['mean']:.0%} [{e['lo'] * 100:.0f}, {e['hi'] * 100:.0f}]"


def cells_description(s: dict) -> str:
    """What a table's cells are (split, photos, contexts, sampling, judge, units): this bench's and
    bench/quality_image_prompt.py's."""
    return (f"**{s['split']} split** ({len(s['concepts'])} concepts: {', '.join(s['concepts'])}), {REFERENCES} reference "
            f"photos each; {CONTEXTS_PER_CONCEPT} new backgrounds x {s['sampling']['seeds']} seeds per concept "
            f"(DDIM {s['sampling']['steps']} steps, guidance {s['sampling']['guidance']}), read by the attribute classifier. "
            "Fidelity: the object has the concept's shape + colour + texture (all three). Context: background kind and "
            "colour as asked. Every figure: mean over units (one concept x one seed, its contexts averaged) "
            "[95% interval, concepts resampled, then seeds within them], n = units.")


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        cells_description(s) + " Before = same prompt on the base model.",
        "",
        "| method | settings | fidelity before → after | shape | colour | texture | context kept (kind + colour) | "
        "similarity | n | train s per job |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, m in report["methods"].items():
        a, b = m["after"], m["before"]
        lines.append(
            f"| {METHOD_SHORT[method]} | {m['settings_text']} | {b['agreement']['mean']:.0%} → **{pct(a['agreement'])}** "
            f"| {pct(a['shape'])} | {pct(a['color'])} | {pct(a['texture'])} | {pct(a['context'])} "
            f"| {a['similarity']['mean']:.3f} | {a['agreement']['n']} | {m['train_seconds_mean']:.0f} |")
    lines += ["", "Per concept (fidelity after, all three attributes; context kept):", "",
              "| method | " + " | ".join(f"{c} ({CONCEPTS[c].kind})" for c in s["concepts"]) + " |",
              "|---|" + "---|" * len(s["concepts"])]
    for method, m in report["methods"].items():
        cells = [f"{pc['agreement']['mean']:.0%} / {pc['context']['mean']:.0%}" for pc in m["per_concept"].values()]
        lines.append(f"| {METHOD_SHORT[method]} | " + " | ".join(cells) + " |")
    lines += ["", "Train s: wall seconds of one training in the run that made the cell (cached cells keep theirs), "
              "on whatever else the machine was doing; `python -m bench.bench_personalize` measures speed alone.",
              "", f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']}, "
              f"{report['cache']['misses']} cells computed, {report['cache']['hits']} from the cache)."]
    return "\n".join(lines) + "\n"


def settings_text(method: str, settings: dict) -> str:
    parts = [f"{settings['steps']} steps", f"lr {settings['learning_rate']:g}", f"batch {settings['batch_size']}"]
    if defaults(method).rank:
        parts.append(f"rank {settings['rank']}")
    if settings["prior_loss_weight"]:
        parts.append(f"prior {settings['prior_loss_weight']:g} x {settings['num_class_images']}")
    if settings["train_text_encoder"]:
        parts.append("+ text encoder")
    parts += [f"{k}={v}" for k, v in settings["extra"].items()]
    return ", ".join(parts)


def add_cell_arguments(p) -> None:
    """What decides the cells (model, split, methods, concepts, sampling): this bench's and the
    parity bench's (bench/parity_personalize.py), which judges on the same cells."""
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--split", choices=(DEV, TEST), default=TEST)
    p.add_argument("--methods", nargs="+", default=list(SUBJECT_METHODS))
    p.add_argument("--concepts", nargs="+", default=None, help="default: every concept of the split")
    p.add_argument("--seeds", type=int, default=Sampling.seeds, help="images per (concept, context)")
    p.add_argument("--steps", type=int, default=Sampling.steps)
    p.add_argument("--guidance", type=float, default=Sampling.guidance)
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="compute only every N-th cell (from the I-th) and write nothing: run N processes with "
                        "--threads 1 side by side, then once without --shard to write the table from the cache")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(p)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override a TrainingSpec field for every method (e.g. steps=600, extra.augment=false); JSON values")
    p.add_argument("--no-cache", action="store_true", help="recompute every cell")
    p.add_argument("--grid-path", default=None, help="default: docs/images/personalize_grid.png for the test split")
    add_run_arguments(p)
    args = p.parse_args(argv)

    t0 = start_run(args)
    concepts = args.concepts or split(CONCEPTS, args.split)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    setup = Setup(args.model, Sampling(args.seeds, args.steps, args.guidance),
                  ResultCache("quality_personalize", enabled=not args.no_cache))
    methods, grid_rows = {}, []
    cells = [(m, c) for m in args.methods for c in concepts]
    shard, shards = (int(v) for v in args.shard.split("/"))
    if shards > 1:
        for method, name in progress(cells[shard::shards], desc=f"personalization cells, shard {shard}/{shards}"):
            before_cell(setup, method, CONCEPTS[name])
            after_cells(setup, method, resolved_settings(method, overrides), CONCEPTS[name])
        return {}
    for method, name in progress(cells, desc="personalization cells"):
        concept = CONCEPTS[name]
        settings = resolved_settings(method, overrides)
        before = before_cell(setup, method, concept)
        after = after_cells(setup, method, settings, concept)[settings["steps"]]
        m = methods.setdefault(method, {"settings": settings, "settings_text": settings_text(method, settings),
                                        "before_records": [], "after_records": [], "train_seconds": [], "per_concept": {}})
        m["before_records"] += before["records"]
        m["after_records"] += after["records"]
        m["train_seconds"].append(after["train_seconds"])
        m["per_concept"][name] = summarize(after["records"])
        grid_rows.append((f"{name}\n{METHOD_SHORT[method]}\nbefore | after",
                          images_from_json(before["tiles"])[:3] + images_from_json(after["tiles"])))
    for m in methods.values():
        m["before"] = summarize(m.pop("before_records"))
        m["after"] = summarize(m.pop("after_records"))
        m["train_seconds_mean"] = float(np.mean(m.pop("train_seconds")))
    stem = "quality_personalize" if args.split == TEST else f"quality_personalize_{args.split}"
    report = {
        "settings": {"model": Path(args.model).name, "split": args.split, "concepts": concepts, "references": REFERENCES,
                     "sampling": asdict(setup.sampling), "overrides": overrides,
                     "command": "python -m bench.quality_personalize" + (f" --split {args.split}" if args.split != TEST else "")},
        "methods": methods,
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {args.threads} CPU threads",
        "cache": {"hits": setup.cache.hits, "misses": setup.cache.misses},
    }
    write_outputs(args.out_dir, stem, report, markdown(report))
    grid_path = args.grid_path or (ROOT / "docs" / "images" / "personalize_grid.png" if args.split == TEST else None)
    if grid_path:
        grid(grid_rows, Path(grid_path), label_width=170)
    return report


if __name__ == "__main__":
    main()
