"""Personalization quality on the world's held-out concepts: each method, each concept, before vs after.

    python -m bench.quality_personalize                 # the table in the README and docs/personalize/
    python -m bench.quality_personalize --methods DREAMBOOTH_LORA --concepts yellow-crescent --seeds 2

For every (method, held-out concept): train the method with its defaults on 4 reference photos of
the concept (service/personalize, the code the jobs run), then sample "a <token> <class_word> on a
<background>" in backgrounds the photos never showed, through the serving path (Engine + adapter
bank), and read the images with the attribute classifier:

- concept fidelity (the CLIP-I stand-in): share of images whose object has the concept's shape,
  colour and texture (all three, and each), and embedding similarity to the references;
- context alignment (the CLIP-T stand-in for the context): share whose background kind and colour
  are the ones the prompt asked for.

"Before" is the same prompt on the base model without the adapter (the token means nothing to it).
Writes bench/results/quality_personalize.{json,md} and docs/images/personalize_grid.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bench.common import add_run_arguments, apply_overrides, serving_engine, start_run
from service.basemodel import DEFAULT_MODEL_DIR
from service.engine.pipeline import AdapterUse, Engine, GenerationSpec
from service.measures import Judge
from service.personalize import SUBJECT_METHODS, FrozenBase, TrainingSpec, defaults, train
from service.personalize.tokens import default_token
from service.world.heldout import CONCEPTS

ROOT = Path(__file__).resolve().parent.parent
# The class word a user would give each concept: the seen shape it is closest to (crescent: a
# circle with a bite; hexagon: a polygon), or its own shape when only colour/texture are new.
CLASS_WORDS = {"yellow-crescent": "circle", "green-striped-hexagon": "square", "purple-dotted-heart": "heart"}
# New contexts: background kinds and colours chosen so that none is the concept's own colour.
CONTEXTS = ("on a white background", "on a blue checkered background", "on a black striped background",
            "on an orange gradient background", "on a pink dotted background", "on a green background")
METHOD_SHORT = {"DREAMBOOTH_LORA": "DreamBooth-LoRA", "TEXTUAL_INVERSION": "Textual Inversion",
                "CUSTOM_DIFFUSION": "Custom Diffusion"}


def sample(engine: Engine, prompts: list[str], seeds: int, adapter: str | None, steps: int, guidance: float):
    images, asked = [], []
    uses = (AdapterUse(adapter),) if adapter else ()
    for prompt in prompts:
        out = engine.generate(GenerationSpec(prompt=prompt, steps=steps, guidance_scale=guidance, seed=0,
                                             num_images=seeds, adapters=uses))
        images += [np.asarray(im) for im in out.images]
        asked += [prompt] * seeds
    return images, asked


def scores(judge: Judge, concept, images, prompts) -> dict:
    fidelity = judge.concept_fidelity(images, concept)
    context = judge.prompt_alignment(images, prompts)
    return {**{k: round(v, 3) for k, v in fidelity.items()},
            "context_background": round(context["background"], 3), "context_bg_color": round(context["bg_color"], 3)}


def grid(rows: list[tuple[str, list[np.ndarray]]], path: Path, scale: int = 2) -> None:
    """One labelled row of tiles per (concept, what)."""
    font = ImageFont.load_default(size=12)
    tile = 64 * scale
    label_w = 190
    cols = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (label_w + cols * tile, len(rows) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        for line, text in enumerate(label.split("\n")):
            draw.text((6, r * tile + 8 + 16 * line), text, fill="black", font=font)
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (label_w + c * tile, r * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Held-out concepts, {s['references']} reference photos each; each method with its defaults; "
        f"{len(s['contexts'])} new backgrounds x {s['seeds']} seeds = {len(s['contexts']) * s['seeds']} images per cell "
        f"(DDIM {s['steps']} steps, guidance {s['guidance']}), read by the attribute classifier. "
        "Fidelity: object has the concept's shape + colour + texture (all three); context: background kind and "
        "colour as the prompt asks. Before = same prompt, base model.",
        "",
        "| method | concept (class word) | fidelity before → after | shape | colour | texture | similarity | "
        "context kind before → after | context colour before → after | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {METHOD_SHORT[r['method']]} | {r['concept']} ({r['class_word']}) | {b['agreement']:.0%} → **{a['agreement']:.0%}** "
            f"| {b['shape']:.0%} → {a['shape']:.0%} | {b['color']:.0%} → {a['color']:.0%} | {b['texture']:.0%} → {a['texture']:.0%} "
            f"| {b['similarity']:.2f} → {a['similarity']:.2f} | {b['context_background']:.0%} → {a['context_background']:.0%} "
            f"| {b['context_bg_color']:.0%} → {a['context_bg_color']:.0%} | {r['train_seconds']:.0f} |"
        )
    lines += ["", "Mean over concepts:", "", "| method | fidelity before → after | shape after | colour after | "
              "context kind after | context colour after |", "|---|---|---|---|---|---|"]
    for method, m in report["means"].items():
        lines.append(f"| {METHOD_SHORT[method]} | {m['before_agreement']:.0%} → **{m['after_agreement']:.0%}** | "
                     f"{m['after_shape']:.0%} | {m['after_color']:.0%} | {m['after_context_background']:.0%} | "
                     f"{m['after_context_bg_color']:.0%} |")
    lines += ["", "Train s: wall seconds of each training in this run, on whatever else the machine was doing; "
              "`python -m bench.bench_personalize` measures training speed on its own.",
              "", f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--methods", nargs="+", default=list(SUBJECT_METHODS))
    p.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    p.add_argument("--references", type=int, default=4)
    p.add_argument("--seeds", type=int, default=4, help="images per context")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    add_run_arguments(p)
    p.add_argument("--grid-path", default=str(ROOT / "docs" / "images" / "personalize_grid.png"))
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override a TrainingSpec field for every run (e.g. steps=600, extra.augment=0)")
    args = p.parse_args(argv)

    t0 = start_run(args)
    judge = Judge()
    base = FrozenBase.from_pretrained(args.model)
    trained: dict[str, object] = {}
    engine = serving_engine(args.model, trained, max_rows=4 * args.seeds)

    results, grid_rows = [], []
    for concept_name in args.concepts:
        concept = CONCEPTS[concept_name]
        class_word = CLASS_WORDS[concept_name]
        references = concept.references(args.references, seed=0)
        grid_rows.append((f"{concept_name}\nreferences", [r.image for r in references]))
        before_of: dict[str, tuple] = {}  # the base model's images of a prompt, shared by the methods
        for method in args.methods:
            d = defaults(method)
            token = default_token(learns_token=d.learns_token, taken=[])
            spec = TrainingSpec(method=method, images=[Image.fromarray(r.image) for r in references], token=token,
                                class_word=class_word, steps=d.steps, learning_rate=d.learning_rate, rank=d.rank,
                                batch_size=d.batch_size, seed=0)
            apply_overrides(spec, args.set)
            started = time.time()
            key = f"{method}:{concept_name}"
            trained[key] = train(base, spec)
            train_seconds = time.time() - started
            prompts = [f"a {token} {class_word} {context}" for context in CONTEXTS]
            if token not in before_of:
                before_of[token] = sample(engine, prompts, args.seeds, None, args.steps, args.guidance)
            before, asked = before_of[token]
            after, _ = sample(engine, prompts, args.seeds, key, args.steps, args.guidance)
            engine.adapters.manager.invalidate(key)
            results.append({"method": method, "concept": concept_name, "class_word": class_word, "token": token,
                            "before": scores(judge, concept, before, asked), "after": scores(judge, concept, after, asked),
                            "train_seconds": round(train_seconds, 1), "steps": spec.steps})
            print(json.dumps(results[-1]), flush=True)
            pick = list(range(0, len(after), args.seeds))[:6]  # the first image of each context
            grid_rows.append((f"{METHOD_SHORT[method]}\nbefore | after", [before[i] for i in pick[:3]] + [after[i] for i in pick]))

    means = {}
    for method in args.methods:
        rows = [r for r in results if r["method"] == method]
        means[method] = {
            "before_agreement": float(np.mean([r["before"]["agreement"] for r in rows])),
            **{f"after_{k}": float(np.mean([r["after"][k] for r in rows]))
               for k in ("agreement", "shape", "color", "texture", "context_background", "context_bg_color")},
        }
    report = {
        "settings": {"model": Path(args.model).name, "references": args.references, "seeds": args.seeds,
                     "steps": args.steps, "guidance": args.guidance, "contexts": list(CONTEXTS),
                     "overrides": args.set, "command": "python -m bench.quality_personalize"},
        "results": results,
        "means": means,
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {args.threads} CPU threads",
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality_personalize.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "quality_personalize.md").write_text(markdown(report))
    grid(grid_rows, Path(args.grid_path))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
