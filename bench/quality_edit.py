"""Editing quality on the synthetic world: DDS against DDS + DreamSteerer, with ablations, for
each subject personalization method, on a held-out concept.

    python -m bench.quality_edit                                   # the table in the README
    python -m bench.quality_edit --methods DREAMBOOTH_LORA --sources 2 --variants dds dreamsteerer

For each method (DreamBooth-LoRA, Textual Inversion, Custom Diffusion): train an adapter with the
method's defaults on 4 reference photos of the concept (and, for the one-shot case, on ONE photo),
then edit world images whose object and background are known (`SOURCES`) with the target prompt
"a <token> <class_word> on <the source's background>", through the serving path
(service.edit.runner: engine + adapter bank + workbench), and measure:

- structure: SSIM to the source (whole image), and the mean absolute error outside the source
  object's mask grown by 4 px (the background, 0-255 levels); the VAE's own round trip of each
  source is reported as the floor no latent edit can beat;
- concept fidelity in the edited object: the attribute classifier's share of edits whose object has
  the concept's shape + colour + texture (all three, and each), and embedding similarity to the
  reference photos (the CLIP-I stand-in).

Variants: plain DDS with the adapter; DreamSteerer; DreamSteerer without EDSD, without mode
shifting, without the subject mask, without bias correction. Writes
bench/results/quality_edit.{json,md} and docs/images/edit_grid.png (source, DDS, DreamSteerer, mask).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import add_run_arguments, serving_engine, start_run, write_results
from bench.evaluation import grid
from bench.quality_personalize import METHOD_SHORT
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.edit import EditOptions, EditSpec
from service.edit.runner import run_edit
from service.edit.workbench import Workbench
from service.engine.pipeline import AdapterUse
from service.research.measures import Judge
from service.research.measures.metrics import structure_preservation
from service.personalize import SUBJECT_METHODS, FrozenBase, TrainingSpec, defaults, learns_token, train
from service.research.world.generator import Scene, WorldObject, _erode, render
from service.research.world.heldout import CONCEPTS

ROOT = Path(__file__).resolve().parent.parent
# Sources: one seen object on a seen background each, none in the concept's colours.
SOURCES = (
    Scene("stripes", "blue", (WorldObject("square", "red", "solid", 0.5, 0.5, 0.28),)),
    Scene("solid", "green", (WorldObject("circle", "orange", "solid", 0.45, 0.55, 0.25),)),
    Scene("checker", "white", (WorldObject("triangle", "blue", "solid", 0.5, 0.45, 0.27),)),
    Scene("dots", "yellow", (WorldObject("star", "black", "solid", 0.55, 0.5, 0.28),)),
)
VARIANTS = {
    "dds": ("DDS", {}),
    "dreamsteerer": ("DREAMSTEERER", {}),
    "no_edsd": ("DREAMSTEERER", {"edsd": False}),
    "no_mode_shifting": ("DREAMSTEERER", {"mode_shifting": False}),
    "no_mask": ("DREAMSTEERER", {"use_subject_mask": False}),
    "no_bias_correction": ("DREAMSTEERER", {"bias_correction": False}),
}
VARIANT_LABEL = {"dds": "DDS", "dreamsteerer": "DDS + DreamSteerer", "no_edsd": "  without EDSD",
                 "no_mode_shifting": "  without mode shifting", "no_mask": "  without subject mask",
                 "no_bias_correction": "  without bias correction"}
ONE_SHOT_VARIANTS = ("dds", "dreamsteerer")


def background_words(scene: Scene) -> str:
    return scene.caption.split(" on ", 1)[1]


def edit_scores(judge: Judge, concept, sources, edits) -> dict:
    structure = [structure_preservation(s.image, e, ~_erode(~s.masks[0], 4)) for s, e in zip(sources, edits)]
    fidelity = judge.concept_fidelity(edits, concept)
    return {"ssim": float(np.mean([s["ssim"] for s in structure])),
            "background_mae": float(np.mean([s["outside_mae"] for s in structure])),
            **{k: float(v) for k, v in fidelity.items()}}


def markdown(report: dict) -> str:
    s = report["settings"]
    floor = report["vae_round_trip"]
    lines = [
        f"Concept {s['concept']} (class word '{s['class_word']}'); {s['sources']} world sources (a seen object on a "
        f"seen background), target 'a <token> {s['class_word']} on <the source's background>'; editing defaults "
        f"({s['iterations']} DDS iterations, guidance {s['guidance']}). Structure: SSIM to the source, background "
        "error = mean absolute error (0-255) outside the source object grown by 4 px; the VAE round trip of the "
        f"sources alone scores SSIM {floor['ssim']:.3f}, background error {floor['background_mae']:.1f}. Concept "
        "fidelity: the classifier reads the concept's shape + colour + texture (all three; each), and embedding "
        "similarity to the reference photos.",
        "",
        "| adapter | variant | SSIM ↑ | background error ↓ | fidelity ↑ | shape | colour | texture | similarity ↑ | s / edit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        m = r["scores"]
        lines.append(f"| {r['adapter']} | {VARIANT_LABEL[r['variant']]} | {m['ssim']:.3f} | {m['background_mae']:.1f} | "
                     f"{m['agreement']:.0%} | {m['shape']:.0%} | {m['color']:.0%} | {m['texture']:.0%} | "
                     f"{m['similarity']:.3f} | {r['seconds_per_edit']:.1f} |")
    lines += ["", f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--methods", nargs="+", default=list(SUBJECT_METHODS))
    p.add_argument("--concept", default="purple-dotted-heart")
    p.add_argument("--sources", type=int, default=len(SOURCES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--no-one-shot", action="store_true", help="skip the adapters trained on a single photo")
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="override an EditOptions field (JSON value)")
    add_run_arguments(p)
    p.add_argument("--grid-path", default=str(ROOT / "docs" / "images" / "edit_grid.png"))
    args = p.parse_args(argv)

    t0 = start_run(args)
    judge = Judge()
    base = FrozenBase.from_pretrained(args.model)
    workbench = Workbench(FrozenBase.from_pretrained(args.model))
    trained: dict[str, object] = {}
    engine = serving_engine(args.model, trained, max_rows=16)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    options = EditOptions().replace(**overrides)

    concept = CONCEPTS[args.concept]
    class_word = CONCEPTS[args.concept].class_word
    sources = [render(scene) for scene in SOURCES[: args.sources]]
    round_trip = [engine.decode_array(engine.encode_image(Image.fromarray(s.image)))[0] for s in sources]
    floor = edit_scores(judge, concept, sources, round_trip)
    results, grid_rows = [], [("sources", [s.image for s in sources])]
    cases = [(m, 4) for m in args.methods] + ([] if args.no_one_shot else [(m, 1) for m in args.methods])
    for method, photos in cases:
        d = defaults(method)
        token = "<sks>" if learns_token(method) else "sks"
        references = concept.references(photos, seed=0)
        spec = TrainingSpec(method=method, images=[Image.fromarray(r.image) for r in references], token=token,
                            class_word=class_word, steps=d.steps, learning_rate=d.learning_rate, rank=d.rank,
                            batch_size=d.batch_size, seed=0)
        key = f"{method}:{photos}"
        trained[key] = train(base, spec)
        label = METHOD_SHORT[method] + (" (one photo)" if photos == 1 else "")
        variants = [v for v in args.variants if photos > 1 or v in ONE_SHOT_VARIANTS]
        for variant in variants:
            edit_method, changes = VARIANTS[variant]
            edits, masks, started = [], [], time.time()
            for i, (scene, source) in enumerate(zip(SOURCES, sources)):
                out = run_edit(engine, workbench, EditSpec(
                    method=edit_method, source=source.image, source_prompt=scene.caption,
                    target_prompt=f"a {token} {class_word} on {background_words(scene)}", adapter=AdapterUse(key),
                    adapter_method=method, token=token, class_word=class_word, seed=i,
                    options=options.replace(**changes)))
                edits.append(out.image)
                masks.append(out.mask)
            seconds = (time.time() - started) / len(sources)
            results.append({"adapter": label, "method": method, "photos": photos, "variant": variant,
                            "scores": edit_scores(judge, concept, sources, edits), "seconds_per_edit": round(seconds, 1)})
            print(json.dumps(results[-1]), flush=True)
            if variant in ("dds", "dreamsteerer"):
                grid_rows.append((f"{label}\n{VARIANT_LABEL[variant]}", edits))
            if variant == "dreamsteerer":
                grid_rows.append((f"{label}\nsubject mask", [
                    (np.stack([m] * 3, -1) * 255).astype(np.uint8) if m is not None else np.zeros_like(edits[0])
                    for m in masks]))
        engine.adapters.manager.invalidate(key)

    report = {
        "settings": {"model": Path(args.model).name, "concept": args.concept, "class_word": class_word,
                     "sources": len(sources), "iterations": options.iterations, "guidance": options.guidance_scale,
                     "overrides": overrides, "command": "python -m bench.quality_edit"},
        "vae_round_trip": floor,
        "results": results,
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {args.threads} CPU threads",
    }
    grid(grid_rows, Path(args.grid_path))
    write_results(args.out_dir, "quality_edit", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
