"""Editing speed on CPU (embedded world model): seconds per edit, DreamSteerer split into its parts,
against plain DDS with the same adapter, for each subject method; and the cost of the per-request
adapter copy.

    python -m bench.bench_edit                  # bench/results/edit_speed.{json,md}
    python -m bench.bench_edit --rounds 1 --methods TEXTUAL_INVERSION

Also: a few edits side by side (run_edits) against one by one, and the model copies an edit
instance holds. Each round runs, per method, plain DDS then DreamSteerer on the same source with the defaults,
through the serving path (service.edit.runner: engine + adapter bank + workbench); medians over
rounds. The adapters are trained for a few steps only: speed does not depend on what they learned.
The per-request copy: applying the stored adapter to the workbench's private model as trainable
fp32 tensors (before steering), and putting the steered copy into a bank slot for the request
(validate + copy), against loading a stored adapter into a slot (the ordinary cache miss).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from bench.common import add_run_arguments, serving_engine, start_run, write_results
from bench.quality_edit import profile_edit
from bench.quality_personalize import METHOD_SHORT
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.edit import EditOptions, EditSpec
from service.edit.runner import run_edit, run_edits
from service.edit.workbench import Workbench
from service.engine.pipeline import AdapterUse
from PIL import Image

from service.adapters import parse_adapter, serialize_adapter
from service.personalize import SUBJECT_METHODS, FrozenBase, TrainingSpec, defaults, learns_token, train
from service.research.world.generator import Scene, WorldObject, render
from service.research.world.heldout import CONCEPTS

SOURCE = render(Scene("stripes", "blue", (WorldObject("square", "red", "solid", 0.5, 0.5, 0.28),)))
SOURCE_PROMPT = SOURCE.caption

PARTS = ("mask_seconds", "guided_seconds", "steer_seconds", "dds_seconds", "decode_seconds")


class StoredBlobs(dict):
    """key -> serialized adapter; reading parses it, as the blob store's loader does."""

    def __getitem__(self, key):
        return parse_adapter(dict.__getitem__(self, key))


def quick_adapter(base: FrozenBase, method: str, steps: int):
    d = defaults(method)
    token = "<sks>" if learns_token(method) else "sks"
    photos = [Image.fromarray(s.image) for s in CONCEPTS["purple-dotted-heart"].references(3, seed=0)]
    spec = TrainingSpec(method=method, images=photos, token=token, class_word="heart", steps=steps,
                        learning_rate=d.learning_rate, rank=d.rank, batch_size=2, seed=0)
    return train(base, spec), token


def median(values) -> float:
    return float(statistics.median(values))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--methods", nargs="+", default=list(SUBJECT_METHODS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--side-by-side", type=int, default=4, help="edits run together for the side-by-side figure")
    add_run_arguments(p)
    args = p.parse_args(argv)
    t0 = start_run(args)

    base = FrozenBase.from_pretrained(args.model)
    adapters = {m: quick_adapter(base, m, steps=20) for m in args.methods}
    engine = serving_engine(args.model, StoredBlobs({m: serialize_adapter(a) for m, (a, _) in adapters.items()}),
                            max_rows=16, num_slots=8)
    workbench = Workbench(base)
    options = EditOptions(**profile_edit(args.model))  # the served defaults (the model profile's)
    times: dict[str, dict[str, list]] = {m: {"dds": [], "dreamsteerer": [], "parts": []} for m in args.methods}
    for _ in range(args.rounds):
        for method in args.methods:
            token = adapters[method][1]
            spec = EditSpec(method="DDS", source=SOURCE.image, source_prompt=SOURCE_PROMPT,
                            target_prompt=f"a {token} heart on a blue striped background", adapter=AdapterUse(method),
                            adapter_method=method, token=token, class_word="heart", seed=0, options=options)
            started = time.perf_counter()
            run_edit(engine, workbench, spec)
            times[method]["dds"].append(time.perf_counter() - started)
            spec.method = "DREAMSTEERER"
            started = time.perf_counter()
            out = run_edit(engine, workbench, spec)
            times[method]["dreamsteerer"].append(time.perf_counter() - started)
            times[method]["parts"].append(out.timings)
            print(method, json.dumps({k: round(v, 2) for k, v in out.timings.items()}), flush=True)

    # Edits side by side (run_edits: their DDS iterations share UNet calls, as concurrent edits do in
    # Triton's unet model) against the same edits one after another.
    side_by_side = {}
    together_method = args.methods[0]
    token = adapters[together_method][1]
    for edit_method in ("DDS", "DREAMSTEERER"):
        specs = [EditSpec(method=edit_method, source=SOURCE.image, source_prompt=SOURCE_PROMPT,
                          target_prompt=f"a {token} heart on a blue striped background",
                          adapter=AdapterUse(together_method), adapter_method=together_method, token=token,
                          class_word="heart", seed=i, options=options)
                 for i in range(args.side_by_side)]
        started = time.perf_counter()
        for spec in specs:
            run_edit(engine, workbench, spec)
        alone = time.perf_counter() - started
        started = time.perf_counter()
        run_edits(engine, workbench, specs)
        together = time.perf_counter() - started
        side_by_side[edit_method] = {"one_by_one_seconds": alone, "side_by_side_seconds": together,
                                     "speedup": alone / together}
        print(edit_method, json.dumps(side_by_side[edit_method]), flush=True)

    # What an edit instance holds: on Triton, one private model copy (the workbench's); it held a
    # serving engine as well before the steered copy's rows moved to the shared unet model.
    model_bytes = sum(t.numel() * t.element_size() for m in (base.unet, base.engine.vae, base.engine.text_encoder)
                      for t in list(m.parameters()) + list(m.buffers()))

    # The per-request copy.
    copy = {}
    for method in args.methods:
        adapter = adapters[method][0]
        apply_s, slot_s, miss_s = [], [], []
        for _ in range(5):
            started = time.perf_counter()
            with workbench.applied(adapter, trainable=True):
                apply_s.append(time.perf_counter() - started)
            manager = engine.adapters.manager
            started = time.perf_counter()
            with manager.ephemeral(adapter) as key, manager.acquire([key]):
                slot_s.append(time.perf_counter() - started)
            manager.invalidate(method)  # drops the host copy too: a cold miss, read from the "store" again
            started = time.perf_counter()
            with manager.acquire([method]):
                miss_s.append(time.perf_counter() - started)
        copy[method] = {"apply_ms": 1e3 * median(apply_s), "bank_slot_ms": 1e3 * median(slot_s),
                        "stored_adapter_miss_ms": 1e3 * median(miss_s), "bytes": adapter.nbytes(),
                        "parameters": adapter.num_parameters}

    results = {}
    for method in args.methods:
        t = times[method]
        parts = {k: median([p.get(k, 0.0) for p in t["parts"]]) for k in PARTS}
        results[method] = {"dds_seconds": median(t["dds"]), "dreamsteerer_seconds": median(t["dreamsteerer"]),
                           "ratio": median(t["dreamsteerer"]) / median(t["dds"]), "parts": parts, "copy": copy[method]}
    report = {"side_by_side": {"method": together_method, "edits": args.side_by_side, **side_by_side},
              "edit_instance": {"model_copies": 1, "model_copies_before": 2, "model_copy_bytes": model_bytes},
              "settings": {"model": Path(args.model).name, "rounds": args.rounds, "iterations": options.iterations,
                           "steer_steps": options.steer_steps, "preliminary_iterations": options.preliminary_iterations,
                           "guided_samples": options.guided_samples, "guided_steps": options.guided_steps,
                           "command": "python -m bench.bench_edit"},
              "results": results, "seconds": round(time.time() - t0, 1),
              "machine": f"{platform.machine()}, {args.threads} CPU threads"}
    write_results(args.out_dir, "edit_speed", report, markdown(report))
    return report


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Seconds per 64x64 edit on the embedded model, medians of {s['rounds']} rounds, defaults ({s['iterations']} DDS "
        f"iterations; DreamSteerer: {s['guided_samples']} guided samples of {s['guided_steps']} steps, "
        f"{s['preliminary_iterations']} preliminary DDS iterations + {s['steer_steps']} steering steps).",
        "",
        "| adapter | plain DDS s | DreamSteerer s | ratio | mask | guided samples | steering (incl. preliminary edit) | DDS | decode |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in report["results"].items():
        p = r["parts"]
        lines.append(f"| {METHOD_SHORT[method]} | {r['dds_seconds']:.1f} | {r['dreamsteerer_seconds']:.1f} | "
                     f"{r['ratio']:.2f}x | {p['mask_seconds']:.2f} | {p['guided_seconds']:.2f} | {p['steer_seconds']:.2f} | "
                     f"{p['dds_seconds']:.2f} | {p['decode_seconds']:.3f} |")
    sb = report["side_by_side"]
    lines += ["", f"{sb['edits']} edits ({METHOD_SHORT[sb['method']]}) side by side (`run_edits`: their DDS iterations "
              "share UNet calls, as concurrent edits' rows do in Triton's `unet` model) against one after another:", "",
              "| edit | one by one s | side by side s | speed-up |", "|---|---|---|---|"]
    for name, label in (("DDS", "plain DDS"), ("DREAMSTEERER", "DreamSteerer")):
        r = sb[name]
        lines.append(f"| {label} | {r['one_by_one_seconds']:.1f} | {r['side_by_side_seconds']:.1f} | {r['speedup']:.2f}x |")
    e = report["edit_instance"]
    lines += ["", f"Edit instance memory (Triton `edit` model): {e['model_copies']} model copy of "
              f"{e['model_copy_bytes'] / 2**20:.1f} MiB (UNet + VAE + text encoder, as loaded) for DreamSteerer's "
              f"workbench; before the steered copy's rows moved to the shared `unet` model it held "
              f"{e['model_copies_before']} (a serving engine with its own adapter bank as well)."]
    lines += ["", "The per-request adapter copy (medians of 5): applied to the workbench's private model as trainable "
              "tensors, then (steered) validated and copied into a bank slot for the request, against a stored "
              "adapter's ordinary cache miss (read + parse + validate + copy).", "",
              "| adapter | parameters | bytes | apply to workbench ms | into a bank slot ms | stored adapter miss ms |",
              "|---|---|---|---|---|---|"]
    for method, r in report["results"].items():
        c = r["copy"]
        lines.append(f"| {METHOD_SHORT[method]} | {c['parameters']} | {c['bytes']} | {c['apply_ms']:.1f} | "
                     f"{c['bank_slot_ms']:.1f} | {c['stored_adapter_miss_ms']:.1f} |")
    lines += ["", f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']}); absolute "
              "times are CPU figures, only the ratios carry over to a GPU."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
