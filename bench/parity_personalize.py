"""Parity on quality: our trainers against diffusers' example training scripts, judged alike.

    python -m bench.parity_personalize                  # the table: the TEST split, profile defaults, 8 seeds
    python -m bench.parity_personalize --split dev --methods TEXTUAL_INVERSION --concepts purple-dotted-heart --seeds 2
    python -m bench.parity_personalize --their-set learning_rate=2e-5   # the scripts alone at another setting

Issue 37's question: when a method falls short of its goal, is it the method or the base model?
For every (method, held-out concept) two adapters are judged on the same units:

- OURS: bench.quality_personalize's own cell (service/personalize at the model profile's defaults or
  `--set`), read from quality_personalize's cache under the same key: a cell it computed is not
  recomputed here, and one computed here is its cell too;
- THEIRS: the diffusers example script of the method (bench/baselines.py: train_dreambooth_lora.py,
  textual_inversion.py, train_custom_diffusion.py, their training logic as their READMEs run them)
  at OUR settings where the script has the argument (steps, learning rate, batch, seed, the same 4
  photos; DreamBooth-LoRA's rank and --train_text_encoder; prior preservation with the same class
  images where the script has --with_prior_preservation), its weights converted to our adapter
  format and served by the same engine (Engine + adapter bank).

Both are sampled and judged by exactly quality_personalize's cells (the same contexts, seeds,
DDIM steps, guidance, attribute classifier). Per method: fidelity (shape + colour + texture all
right) and context kept, ours and theirs, each with its 95% interval, and the PAIRED difference
ours - theirs over the units both measured (one concept x one seed, its contexts averaged;
bench.evaluation.paired_difference: concepts resampled, then seeds within them). The goal: ours >=
theirs on fidelity, with context kept >= 85%.

Theirs' cells are cached under var/bench-cache/parity_personalize/ with "trainer": "diffusers-example"
in their key; their trained adapters are kept there too (a new judge rescores without retraining).
`--shard I/N` computes every N-th cell and writes nothing, as quality_personalize's does.
Writes bench/results/parity_personalize[_<split>].{json,md}.
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

from bench import baselines
from bench.common import add_run_arguments, serving_engine, start_run
from bench.evaluation import ResultCache, paired_difference, progress, write_outputs
from bench.quality_personalize import (
    CONTEXTS_PER_CONCEPT, METHOD_SHORT, REFERENCES, Sampling, Setup, add_cell_arguments, after_cells, contexts_for,
    resolved_settings, sample_and_score, settings_text, summarize, token_for,
)
from service.adapters import parse_adapter, serialize_adapter
from service.engine.pipeline import GenerationSpec
from service.personalize import (
    CUSTOM_DIFFUSION, DREAMBOOTH_LORA, SUBJECT_METHODS, TEXTUAL_INVERSION, FrozenBase, concept_prompt,
)
from service.personalize.custom_diffusion import INITIALIZER_WORD as CUSTOM_DIFFUSION_INITIALIZER
from service.research.world.heldout import CONCEPTS, TEST, HeldOutConcept, split

TRAINER = "diffusers-example"
SCRIPTS = {DREAMBOOTH_LORA: "train_dreambooth_lora.py", TEXTUAL_INVERSION: "textual_inversion.py",
           CUSTOM_DIFFUSION: "train_custom_diffusion.py"}
ENGINE_RANK = 16  # quality_personalize's bank (bench.common.serving_engine); wider only for an adapter that needs it
CONTEXT_GOAL = 0.85
DIFFERENCE_METRICS = ("agreement", "context", "shape", "color", "texture", "similarity")
# What each script is given besides steps / lr / batch / seed (ScriptRun's fields and the functions'
# arguments that a --their-set may change), at the values its README runs it with.
SCRIPT_ARGUMENTS = {
    DREAMBOOTH_LORA: ("rank", "train_text_encoder", "prior_loss_weight", "num_class_images", "lr_scheduler",
                      "lr_warmup_steps"),
    TEXTUAL_INVERSION: ("initializer_word", "repeats", "lr_scheduler", "lr_warmup_steps"),
    CUSTOM_DIFFUSION: ("prior_loss_weight", "num_class_images", "initializer_word", "hflip", "augment",
                       "lr_scheduler", "lr_warmup_steps"),
}
COMMON_ARGUMENTS = ("steps", "learning_rate", "batch_size", "seed")


def their_settings(method: str, settings: dict, overrides: dict) -> dict:
    """What the script is run with: OUR settings wherever the script has the argument, the README's
    values for its own switches, then `--their-set` overrides (those the script has)."""
    run = baselines.ScriptRun()
    s = {k: settings[k] for k in COMMON_ARGUMENTS}
    if method == DREAMBOOTH_LORA:
        s |= {"rank": settings["rank"], "train_text_encoder": settings["train_text_encoder"]}
    if method in (DREAMBOOTH_LORA, CUSTOM_DIFFUSION):
        s |= {"prior_loss_weight": settings["prior_loss_weight"],
              "num_class_images": settings["num_class_images"] if settings["prior_loss_weight"] > 0 else 0}
    if method == TEXTUAL_INVERSION:
        # ours starts from the class word (or extra.initializer_word), as the README's --initializer_token does
        s |= {"initializer_word": settings["extra"].get("initializer_word", ""), "repeats": run.repeats}
    if method == CUSTOM_DIFFUSION:
        s |= {"initializer_word": settings["extra"].get("initializer_word", CUSTOM_DIFFUSION_INITIALIZER),
              "hflip": run.hflip, "augment": run.augment}
    s |= {"lr_scheduler": run.lr_scheduler, "lr_warmup_steps": run.lr_warmup_steps}
    allowed = set(COMMON_ARGUMENTS) | set(SCRIPT_ARGUMENTS[method])
    return s | {k: v for k, v in overrides.items() if k in allowed}


def not_given(method: str, settings: dict) -> list[str]:
    """Our settings the script has no argument for (what theirs runs without)."""
    out = []
    if method == TEXTUAL_INVERSION and settings["prior_loss_weight"] > 0:
        out.append(f"prior {settings['prior_loss_weight']:g} (textual_inversion.py has no prior preservation)")
    if method == CUSTOM_DIFFUSION:
        out.append(f"rank {settings['rank']} (the script trains whole K/V matrices)")
    out += [f"extra.{k}={v} (a switch of ours)" for k, v in settings["extra"].items() if k != "initializer_word"]
    return out


def script_text(method: str, their: dict) -> str:
    parts = [SCRIPTS[method], f"{their['steps']} steps", f"lr {their['learning_rate']:g}",
             f"batch {their['batch_size']}"]
    if method == DREAMBOOTH_LORA:
        parts.append(f"--rank {their['rank']}")
        if their["train_text_encoder"]:
            parts.append("--train_text_encoder")
    if their.get("prior_loss_weight", 0) > 0:
        parts.append(f"--with_prior_preservation --prior_loss_weight {their['prior_loss_weight']:g} "
                     f"--num_class_images {their['num_class_images']}")
    if method == TEXTUAL_INVERSION:
        parts.append(f"--initializer_token {their['initializer_word'] or '<class word>'}")
    if method == CUSTOM_DIFFUSION:
        parts.append(f"--initializer_token {their['initializer_word']}")
        parts += ["--hflip"] if their["hflip"] else []
        parts += [] if their["augment"] else ["--noaug"]
    if (their["lr_scheduler"], their["lr_warmup_steps"]) != ("constant", 0):
        parts.append(f"--lr_scheduler {their['lr_scheduler']} --lr_warmup_steps {their['lr_warmup_steps']}")
    return " ".join(parts)


class TheirSetup(Setup):
    """quality_personalize's Setup for the scripts' adapters: the same model, sampling and judge
    (shared with ours), a cache of its own, and a bank as wide as the adapter in hand needs (whole
    K/V updates of Custom Diffusion are rank min(out, in)); every other adapter is served by a bank
    of quality_personalize's width."""

    def __init__(self, ours: Setup, cache: ResultCache):
        self.model, self.sampling, self.cache, self.model_id = ours.model, ours.sampling, cache, ours.model_id
        self.judge, self.ours = ours.judge, ours
        self.adapters: dict[str, object] = {}
        self.rank = ENGINE_RANK
        self._engines: dict[int, object] = {}

    @property
    def engine(self):
        if self.rank not in self._engines:
            self._engines[self.rank] = serving_engine(self.model, self.adapters, max_rows=4 * self.sampling.seeds,
                                                      max_rank=self.rank)
        return self._engines[self.rank]


def class_images(base: FrozenBase, class_word: str, n: int, seed: int) -> list[Image.Image]:
    """The class images our trainers' prior uses (FrozenBase.class_images: the base model's own
    "a <class_word>", 25 DDIM steps, seeds seed, seed + 4, ...), handed to the script as its
    --class_data_dir."""
    images = []
    for start in range(0, n, 4):
        spec = GenerationSpec(prompt=f"a {class_word}", steps=25, seed=seed + start, num_images=min(4, n - start),
                              width=base.size, height=base.size)
        images += base.engine.generate(spec).images
    return images


def train_theirs(ours: Setup, method: str, concept: HeldOutConcept, their: dict) -> baselines.Trained:
    """One whole run of the method's script on the concept's reference photos."""
    images = [Image.fromarray(r.image) for r in concept.references(REFERENCES, seed=0)]
    token = token_for(method)
    prompt = concept_prompt(token, concept.class_word)  # --instance_prompt: the one our trainers use
    prior = their.get("prior_loss_weight", 0) > 0
    run = baselines.ScriptRun(
        prior_loss_weight=their.get("prior_loss_weight", 0.0) if prior else 0.0,
        class_images=tuple(class_images(ours.base, concept.class_word, their["num_class_images"], their["seed"]))
        if prior else (),
        class_prompt=f"a {concept.class_word}", train_text_encoder=their.get("train_text_encoder", False),
        **{k: their[k] for k in ("hflip", "augment", "repeats", "lr_scheduler", "lr_warmup_steps") if k in their})
    common = dict(model_dir=ours.model, images=images, steps=their["steps"], learning_rate=their["learning_rate"],
                  batch_size=their["batch_size"], seed=their["seed"], script=run)
    if method == DREAMBOOTH_LORA:
        return baselines.dreambooth_lora(prompt=prompt, rank=their["rank"], **common)
    if method == TEXTUAL_INVERSION:
        return baselines.textual_inversion(placeholder_token=token, prompt=prompt,
                                           initializer_word=their["initializer_word"] or concept.class_word, **common)
    return baselines.custom_diffusion(modifier_token=token, initializer_word=their["initializer_word"], prompt=prompt,
                                      **common)


def adapter_key(theirs: TheirSetup, method: str, their: dict, concept: HeldOutConcept) -> dict:
    return {"what": "adapter", "trainer": TRAINER, "script": SCRIPTS[method], "model": theirs.model_id,
            "method": method, "settings": their, "concept": concept.name, "references": REFERENCES}


def their_cell(theirs: TheirSetup, blobs: ResultCache, method: str, their: dict, concept: HeldOutConcept) -> dict:
    """The script's adapter judged as quality_personalize judges ours (trained only if its adapter
    is not cached)."""
    key = theirs.key(what="after", trainer=TRAINER, script=SCRIPTS[method], method=method, settings=their,
                     concept=concept.name, contexts=contexts_for(concept), references=REFERENCES)

    def compute():
        trained = {}

        def train() -> bytes:
            trained["run"] = run = train_theirs(theirs.ours, method, concept, their)
            return serialize_adapter(run.adapter)

        adapter = parse_adapter(blobs.blob(adapter_key(theirs, method, their, concept), train))
        name = f"{TRAINER}:{method}:{concept.name}"
        theirs.rank = max(ENGINE_RANK, adapter.max_rank)
        theirs.adapters[name] = adapter
        try:
            value = sample_and_score(theirs, concept, token_for(method), name)
        finally:
            theirs.engine.adapters.manager.invalidate(name)
            del theirs.adapters[name]
        run = trained.get("run")
        value["train_seconds"] = round(run.seconds, 1) if run else None  # None: the adapter came from the cache
        value["final_loss"] = round(float(np.mean(run.losses[-20:])), 4) if run else None
        value["adapter"] = {"rank": adapter.max_rank, "parameters": adapter.num_parameters, "layout": adapter.layout}
        return value

    return theirs.cache.cell(key, compute)


def verdict(difference: dict, ours: dict) -> str:
    d, context = difference["agreement"], ours["context"]["mean"]
    fidelity = "ours >= theirs" if d["mean"] >= 0 else "ours < theirs"
    if d["lo"] > 0:
        fidelity += " (interval above 0)"
    elif d["hi"] < 0:
        fidelity += " (interval below 0)"
    else:  # a point estimate on either side of 0 that this n cannot tell from equal
        fidelity += f" by {d['mean'] * 100:+.0f} points, the interval spans 0 (equal at this n)"
    met = d["mean"] >= 0 and context >= CONTEXT_GOAL
    return f"{'met' if met else '**not met**'}: {fidelity}, context {context:.0%}"


def markdown(report: dict) -> str:
    s = report["settings"]
    pct = lambda e: f"{e['mean']:.0%} [{e['lo'] * 100:.0f}, {e['hi'] * 100:.0f}]"  # noqa: E731
    pts = lambda e: f"{e['mean'] * 100:+.0f} [{e['lo'] * 100:+.0f}, {e['hi'] * 100:+.0f}]"  # noqa: E731
    lines = [
        f"**{s['split']} split** ({len(s['concepts'])} concepts: {', '.join(s['concepts'])}), {REFERENCES} reference "
        f"photos each; {s['contexts_per_concept']} new backgrounds x {s['sampling']['seeds']} seeds per concept "
        f"(DDIM {s['sampling']['steps']} steps, guidance {s['sampling']['guidance']}), read by the attribute "
        "classifier: exactly bench.quality_personalize's cells. Ours: service/personalize at the settings shown. "
        "Theirs: the diffusers example script's training (bench/baselines.py) at the same settings where the script has the "
        "argument, its weights served by the same engine. Fidelity: shape + colour + texture all right. Context: "
        "background kind and colour as asked. Every figure: mean over units (one concept x one seed, its contexts "
        "averaged) [95% interval, concepts resampled, then seeds within them]; Δ = ours − theirs in points, paired "
        "over the same units; n = units both measured.",
        "",
        "| method | settings (both) | fidelity ours | fidelity theirs | Δ fidelity | context ours | context theirs "
        "| Δ context | n | goal: ours ≥ theirs, context ≥ 85% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, m in report["methods"].items():
        o, t, d = m["ours"], m["theirs"], m["difference"]
        lines.append(
            f"| {METHOD_SHORT[method]} | {m['settings_text']} | {pct(o['agreement'])} | {pct(t['agreement'])} "
            f"| **{pts(d['agreement'])}** | {pct(o['context'])} | {pct(t['context'])} | {pts(d['context'])} "
            f"| {d['agreement']['n']} | {m['verdict']} |")
    lines += ["", "Per attribute, Δ ours − theirs in points (paired): shape, colour, texture; similarity to the "
              "reference photos (Δ in thousandths):", "",
              "| method | Δ shape | Δ colour | Δ texture | Δ similarity |", "|---|---|---|---|---|"]
    for method, m in report["methods"].items():
        d = m["difference"]
        sim = d["similarity"]
        lines.append(f"| {METHOD_SHORT[method]} | {pts(d['shape'])} | {pts(d['color'])} | {pts(d['texture'])} "
                     f"| {sim['mean'] * 1000:+.0f} [{sim['lo'] * 1000:+.0f}, {sim['hi'] * 1000:+.0f}] |")
    lines += ["", "Per concept, fidelity ours / theirs:", "",
              "| method | " + " | ".join(f"{c} ({CONCEPTS[c].kind})" for c in s["concepts"]) + " |",
              "|---|" + "---|" * len(s["concepts"])]
    for method, m in report["methods"].items():
        cells = [f"{pc['ours']['agreement']['mean']:.0%} / {pc['theirs']['agreement']['mean']:.0%}"
                 for pc in m["per_concept"].values()]
        lines.append(f"| {METHOD_SHORT[method]} | " + " | ".join(cells) + " |")
    lines += ["", "What theirs ran (bench/baselines.py says what each whole run keeps of its script):", ""]
    for method, m in report["methods"].items():
        missing = "; without " + ", ".join(m["not_given"]) if m["not_given"] else ""
        seconds = {k: "-" if v is None else f"{v:.0f}" for k, v in m["train_seconds"].items()}
        lines.append(f"- {METHOD_SHORT[method]}: `{m['script_text']}`{missing}. Train s per job (as the cells "
                     f"recorded them, on whatever else the machine ran): ours {seconds['ours']}, "
                     f"theirs {seconds['theirs']}.")
    objective = report["settings"]["objective"]
    lines += [
        "",
        "Differences that are the scripts' own, not settings: their loss is plain MSE (none of the three has "
        "--snr_gamma)"
        + (f", where our trainers keep the model's declared objective ({objective})" if objective else "")
        + "; textual_inversion.py trains on its templates (\"a photo of a <token>\", no class word) with horizontal "
        "flips; train_custom_diffusion.py trains whole K/V matrices (served as their exact rank-min(out, in) "
        "factors), scale-augments and flips its photos as its README runs it, and starts its token from the "
        "vocabulary entry \"ktn\".",
        "",
        f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']}; cells computed / from "
        f"the cache: ours {report['cache']['ours']['misses']} / {report['cache']['ours']['hits']}, theirs "
        f"{report['cache']['theirs']['misses']} / {report['cache']['theirs']['hits']}).",
    ]
    return "\n".join(lines) + "\n"


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(p)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override a TrainingSpec field for every method, ours and theirs alike (e.g. steps=600); "
                        "JSON values")
    p.add_argument("--their-set", nargs="*", default=[], metavar="ARG=VALUE",
                   help="override a script argument for theirs only (e.g. learning_rate=2e-5, augment=false); "
                        "JSON values")
    p.add_argument("--no-cache", action="store_true", help="recompute every cell and retrain every adapter")
    add_run_arguments(p)
    args = p.parse_args(argv)

    t0 = start_run(args)
    concepts = args.concepts or split(CONCEPTS, args.split)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    their_overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.their_set)}
    known = set(COMMON_ARGUMENTS).union(*SCRIPT_ARGUMENTS.values())
    if set(their_overrides) - known:
        p.error(f"--their-set: unknown {sorted(set(their_overrides) - known)}; one of {sorted(known)}")
    ours = Setup(args.model, Sampling(args.seeds, args.steps, args.guidance),
                 ResultCache("quality_personalize", enabled=not args.no_cache))
    theirs = TheirSetup(ours, ResultCache("parity_personalize", enabled=not args.no_cache))
    blobs = ResultCache("parity_personalize", enabled=not args.no_cache)
    cells = [(m, c) for m in args.methods for c in concepts]
    shard, shards = (int(v) for v in args.shard.split("/"))
    if shards > 1:
        for method, name in progress(cells[shard::shards], desc=f"parity cells, shard {shard}/{shards}"):
            settings = resolved_settings(method, overrides)
            after_cells(ours, method, settings, CONCEPTS[name])
            their_cell(theirs, blobs, method, their_settings(method, settings, their_overrides), CONCEPTS[name])
        return {}

    methods = {}
    for method, name in progress(cells, desc="parity cells"):
        concept = CONCEPTS[name]
        settings = resolved_settings(method, overrides)
        their = their_settings(method, settings, their_overrides)
        mine = after_cells(ours, method, settings, concept)[settings["steps"]]
        other = their_cell(theirs, blobs, method, their, concept)
        m = methods.setdefault(method, {
            "settings": settings, "settings_text": settings_text(method, settings), "script": SCRIPTS[method],
            "their_settings": their, "script_text": script_text(method, their),
            "not_given": not_given(method, settings),
            "ours_records": [], "theirs_records": [], "seconds": {"ours": [], "theirs": []}, "per_concept": {}})
        m["ours_records"] += mine["records"]
        m["theirs_records"] += other["records"]
        m["seconds"]["ours"].append(mine.get("train_seconds"))
        m["seconds"]["theirs"].append(other.get("train_seconds"))
        m["per_concept"][name] = {"ours": summarize(mine["records"]), "theirs": summarize(other["records"]),
                                  "theirs_adapter": other["adapter"], "theirs_final_loss": other.get("final_loss")}
    for m in methods.values():
        a, b = m.pop("ours_records"), m.pop("theirs_records")
        m["ours"], m["theirs"] = summarize(a), summarize(b)
        m["difference"] = {k: paired_difference(a, b, k).as_dict() for k in DIFFERENCE_METRICS}
        m["verdict"] = verdict(m["difference"], m["ours"])
        seconds = m.pop("seconds")
        m["train_seconds"] = {"ours": _mean_or_none(seconds["ours"]), "theirs": _mean_or_none(seconds["theirs"])}

    suffix = "" if args.split == TEST else f"_{args.split}"
    if their_overrides:
        suffix += "_theirs_" + "_".join(f"{k}-{v}" for k, v in sorted(their_overrides.items()))
    objective_file = Path(args.model) / "training_objective.json"
    command = "python -m bench.parity_personalize" + (f" --split {args.split}" if args.split != TEST else "")
    if args.methods != list(SUBJECT_METHODS):
        command += " --methods " + " ".join(args.methods)
    if args.concepts:
        command += " --concepts " + " ".join(args.concepts)
    for flag, value, default in (("seeds", args.seeds, Sampling.seeds), ("steps", args.steps, Sampling.steps),
                                 ("guidance", args.guidance, Sampling.guidance)):
        if value != default:
            command += f" --{flag} {value:g}"
    if args.set:
        command += " --set " + " ".join(args.set)
    if args.their_set:
        command += " --their-set " + " ".join(args.their_set)
    report = {
        "settings": {"model": Path(args.model).name, "split": args.split, "concepts": concepts,
                     "references": REFERENCES,
                     "contexts_per_concept": CONTEXTS_PER_CONCEPT,
                     "sampling": asdict(ours.sampling), "overrides": overrides, "their_overrides": their_overrides,
                     "objective": objective_file.read_text().strip() if objective_file.is_file() else "",
                     "command": command},
        "methods": methods,
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {args.threads} CPU threads",
        "cache": {"ours": {"hits": ours.cache.hits, "misses": ours.cache.misses},
                  "theirs": {"hits": theirs.cache.hits, "misses": theirs.cache.misses}},
    }
    write_outputs(args.out_dir, f"parity_personalize{suffix}", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
