"""The evaluation harness the quality benchmarks share (bench/evaluation.py), and the personalization
benchmark on a tiny subset: intervals with their n, cached cells, snapshots equal to shorter jobs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench.evaluation import Estimate, ResultCache, estimate, paired_difference, unit_values
from service.personalize import FrozenBase, NoProgress, TrainingSpec, adapter_from_checkpoint, train
from service.research.world.heldout import CONCEPTS


def records(values_by_unit: dict[tuple, list[float]], metric="m"):
    return [{"item": item, "seed": seed, metric: v} for (item, seed), vs in values_by_unit.items() for v in vs]


def test_estimate_averages_units_and_brackets_the_mean():
    recs = records({("a", 0): [1, 1], ("a", 1): [0, 0], ("b", 0): [1, 0], ("b", 1): [1, 1]})
    assert unit_values(recs, "m") == {("a", 0): 1.0, ("a", 1): 0.0, ("b", 0): 0.5, ("b", 1): 1.0}
    e = estimate(recs, "m")
    assert e.n == 4 and e.mean == pytest.approx(0.625)
    assert 0.0 <= e.lo <= e.mean <= e.hi <= 1.0 and e.hi > e.lo
    # A constant metric has no spread; many units narrow the interval like 1/sqrt(n).
    assert estimate(records({("a", s): [1.0] for s in range(5)}), "m").half_width == 0
    rng = np.random.default_rng(0)
    small = estimate(records({("a", s): [float(rng.random() < 0.5)] for s in range(25)}), "m")
    large = estimate(records({("a", s): [float(rng.random() < 0.5)] for s in range(400)}), "m")
    assert large.half_width < small.half_width / 2.5


def test_paired_difference_cancels_what_units_share():
    # Units differ a lot from each other, but b is always a + 0.1: the paired interval is tight.
    base = {("c", s): [float(s % 5) / 5] for s in range(40)}
    a = records(base)
    b = records({k: [v[0] + 0.1] for k, v in base.items()})
    d = paired_difference(b, a, "m")
    assert d.n == 40 and d.mean == pytest.approx(0.1) and d.half_width < 1e-9
    assert estimate(a, "m").half_width > 0.05  # unpaired, the spread between units shows
    # Only units both measured count.
    assert paired_difference(b, a[:10], "m").n == 10


def test_intervals_resample_items_first():
    """Units of one item share its adapter: two concepts, one always right and one always wrong,
    measured on 40 seeds each, say nothing about a third concept. Resampling units as if
    independent gave about [39, 61]%; resampling the items first spans what 2 items can show."""
    recs = records({**{("a", s): [0.0] for s in range(40)}, **{("b", s): [1.0] for s in range(40)}})
    e = estimate(recs, "m")
    assert e.mean == pytest.approx(0.5) and e.n == 80
    assert e.lo == 0.0 and e.hi == 1.0
    # Items alike: the interval is as narrow as their units' spread allows.
    rng = np.random.default_rng(1)
    alike = estimate(records({(item, s): [float(rng.random() < 0.5)] for item in "abcdef" for s in range(40)}), "m")
    assert alike.half_width < 0.1
    # A paired difference resamples the same way: one item's gain is not many items' gain.
    base = {**{("a", s): [0.2] for s in range(20)}, **{("b", s): [0.5] for s in range(20)}}
    better = {("a", s): [0.6] for s in range(20)} | {("b", s): [0.5] for s in range(20)}
    d = paired_difference(records(better), records(base), "m")
    assert d.mean == pytest.approx(0.2) and d.lo == pytest.approx(0.0) and d.hi == pytest.approx(0.4)


def test_cells_key_the_weights_and_the_judge_by_content(tmp_path, monkeypatch):
    import bench.evaluation as evaluation

    one, two = tmp_path / "one", tmp_path / "two"
    for folder, byte in ((one, b"\x00"), (two, b"\x01")):
        folder.mkdir()
        (folder / "unet.safetensors").write_bytes(byte * 64)  # same size, other weights
    assert evaluation.model_identity(one) != evaluation.model_identity(two)
    cache = ResultCache("t", root=tmp_path)
    scored = cache.path({"a": 1})
    monkeypatch.setattr(evaluation, "judge_identity", lambda: "another judge")
    assert cache.path({"a": 1}) != scored  # rescored by another judge


def test_cache_keys_on_everything_and_survives_a_rerun(tmp_path):
    cache = ResultCache("t", root=tmp_path)
    calls = []
    compute = lambda: calls.append(1) or {"x": len(calls)}  # noqa: E731
    assert cache.cell({"a": 1, "b": [1, 2]}, compute) == {"x": 1}
    assert cache.cell({"b": [1, 2], "a": 1}, compute) == {"x": 1}  # key order does not matter
    assert cache.cell({"a": 2, "b": [1, 2]}, compute) == {"x": 2}
    assert (cache.hits, cache.misses) == (1, 2)
    assert ResultCache("t", root=tmp_path, enabled=False).cell({"a": 1, "b": [1, 2]}, compute) == {"x": 3}
    assert not list(tmp_path.rglob("*.tmp"))


def test_estimate_formats_with_interval():
    assert Estimate(0.5, 0.4, 0.62, 12).pct() == "50% [40, 62]"
    assert Estimate(0.5, 0.4, 0.62, 12).as_dict()["n"] == 12


@pytest.mark.slow
def test_a_snapshot_is_the_shorter_job(one_torch_thread):
    """A sweep reads fewer steps from one run's checkpoints: that must BE the shorter job."""
    base = FrozenBase.from_pretrained(__import__("service.research.basemodel", fromlist=["DEFAULT_MODEL_DIR"]).DEFAULT_MODEL_DIR)
    photos = [Image.fromarray(r.image) for r in CONCEPTS["purple-dotted-heart"].references(3, seed=0)]
    for method, token in (("DREAMBOOTH_LORA", "sks"), ("CUSTOM_DIFFUSION", "<sks>")):
        spec = lambda steps, every: TrainingSpec(method=method, images=photos, token=token, class_word="heart",  # noqa: E731
                                                 steps=steps, learning_rate=1e-3, rank=2, batch_size=2,
                                                 checkpoint_every=every)
        states = {}

        class Keep(NoProgress):
            def checkpoint(self, step, state):
                states[step] = state

        train(base, spec(4, 2), Keep())
        snapshot = adapter_from_checkpoint(spec(4, 2), states[2])
        short = train(base, spec(2, 0))
        assert snapshot.lora.keys() == short.lora.keys() and snapshot.kind == short.kind
        for name, module in short.lora.items():
            assert torch.equal(snapshot.lora[name].down, module.down) and torch.equal(snapshot.lora[name].up, module.up)
            assert snapshot.lora[name].scale == module.scale
        assert snapshot.token_embeddings.keys() == short.token_embeddings.keys()
        for t, v in short.token_embeddings.items():
            assert torch.equal(snapshot.token_embeddings[t], v)


@pytest.mark.slow
def test_personalization_bench_on_a_tiny_subset(tmp_path, monkeypatch, one_torch_thread):
    """The table's command end to end on one method, one concept, 2 seeds, 3 steps: JSON and
    markdown carry intervals and n, the grid is written, and a rerun computes nothing."""
    from bench import quality_personalize

    monkeypatch.setenv("STEERSERVE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    argv = ["--split", "dev", "--methods", "TEXTUAL_INVERSION", "--concepts", "purple-dotted-heart", "--seeds", "2",
            "--steps", "3", "--set", "steps=3", "--out-dir", str(tmp_path / "out"), "--grid-path", str(tmp_path / "g.png"),
            "--threads", "1"]
    report = quality_personalize.main(argv)
    after = report["methods"]["TEXTUAL_INVERSION"]["after"]
    assert after["agreement"]["n"] == 2  # 1 concept x 2 seeds
    assert after["agreement"]["lo"] <= after["agreement"]["mean"] <= after["agreement"]["hi"]
    assert report["cache"] == {"hits": 0, "misses": 2}  # before + after
    saved = json.loads((tmp_path / "out" / "quality_personalize_dev.json").read_text())
    assert saved["methods"]["TEXTUAL_INVERSION"]["settings"]["steps"] == 3
    md = (tmp_path / "out" / "quality_personalize_dev.md").read_text()
    assert "[95% interval, concepts resampled, then seeds within them]" in md and "n = units" in md
    assert Image.open(tmp_path / "g.png").size[0] > 64
    again = quality_personalize.main(argv)
    assert again["cache"] == {"hits": 2, "misses": 0}
    assert again["methods"]["TEXTUAL_INVERSION"]["after"] == after


@pytest.mark.slow
def test_editing_bench_on_a_tiny_subset(tmp_path, monkeypatch, one_torch_thread):
    """The editing table's command end to end on one method and one concept with tiny settings:
    every figure has its interval and n (8 edits: the concept's 8 sources), the DreamSteerer − DDS
    row is a paired difference, the grid is written, a rerun computes nothing, and a candidate
    setting is judged against the defaults on the same units."""
    from bench import quality_edit

    monkeypatch.setenv("STEERSERVE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    small = {"iterations": 3, "steer_steps": 1, "preliminary_iterations": 1, "guided_samples": 1, "guided_steps": 2}
    tiny = [f"{k}={v}" for k, v in small.items()]
    argv = ["--split", "dev", "--methods", "TEXTUAL_INVERSION", "--concepts", "purple-dotted-heart",
            "--train-set", "steps=2", "--out-dir", str(tmp_path / "out"), "--grid-path", str(tmp_path / "g.png"),
            "--threads", "1", "--set", *tiny]
    report = quality_edit.main(argv)
    rows = report["adapters"]["Textual Inversion"]
    for variant in ("dds", "dreamsteerer"):
        e = rows["variants"][variant]["ssim"]
        assert e["n"] == 8 and e["lo"] <= e["mean"] <= e["hi"]
    diff = rows["differences"]["dreamsteerer"]["ssim"]
    assert diff["n"] == 8
    assert diff["mean"] == pytest.approx(rows["variants"]["dreamsteerer"]["ssim"]["mean"]
                                         - rows["variants"]["dds"]["ssim"]["mean"], abs=1e-3)
    assert report["cache"] == {"hits": 0, "misses": 2}
    stem = "quality_edit_dev_" + "_".join(sorted(t.replace("=", "-") for t in tiny))
    md = (tmp_path / "out" / f"{stem}.md").read_text()
    assert "Δ DreamSteerer − DDS" in md and "[95% interval, concepts resampled" in md
    assert Image.open(tmp_path / "g.png").size[0] > 64
    again = quality_edit.main(argv)
    assert again["cache"] == {"hits": 2, "misses": 0} and again["adapters"] == report["adapters"]
    # A candidate (one more DDS iteration) against these settings as "defaults" is the paired Δ.
    monkeypatch.setattr(quality_edit, "profile_edit", lambda model: {**small, "guidance_scale": 4.0})
    cand = quality_edit.main(argv[:-len(tiny)] + ["iterations=4", "--variants", "dds", "--against-defaults"])
    d = cand["adapters"]["Textual Inversion"]["differences"]["dds:against_defaults"]["background_error"]
    assert d["n"] == 8 and d["lo"] <= d["mean"] <= d["hi"]


@pytest.mark.slow
def test_parity_bench_on_a_tiny_subset(tmp_path, monkeypatch, one_torch_thread):
    """Ours against the diffusers example script on one method (Custom Diffusion: its whole K/V
    matrices are converted to exact LoRA factors and served by a wider bank), one concept, 1 seed, 3
    steps: the table has both rows and the paired difference with its n; ours is quality_personalize's
    own cell; the script's trained adapter parses and changes the model's output; a rerun computes
    nothing. And DreamBooth-LoRA's script file (UNet + text-encoder LoRA) reads as an adapter."""
    from bench import baselines, parity_personalize, quality_personalize
    from bench.common import serving_engine
    from bench.evaluation import ResultCache
    from service.adapters import parse_adapter
    from service.engine.pipeline import AdapterUse, GenerationSpec
    from service.research.basemodel import DEFAULT_MODEL_DIR

    monkeypatch.setenv("STEERSERVE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    argv = ["--split", "dev", "--methods", "CUSTOM_DIFFUSION", "--concepts", "purple-dotted-heart", "--seeds", "1",
            "--steps", "3", "--set", "steps=3", "--out-dir", str(tmp_path / "out"), "--threads", "1"]
    report = parity_personalize.main(argv)
    m = report["methods"]["CUSTOM_DIFFUSION"]
    for side in ("ours", "theirs"):
        e = m[side]["agreement"]
        assert e["n"] == 1 and e["lo"] <= e["mean"] <= e["hi"]
    d = m["difference"]["agreement"]
    assert d["n"] == 1 and d["mean"] == pytest.approx(m["ours"]["agreement"]["mean"] - m["theirs"]["agreement"]["mean"])
    assert m["their_settings"]["steps"] == 3 and m["their_settings"]["learning_rate"] == m["settings"]["learning_rate"]
    assert report["cache"] == {"ours": {"hits": 0, "misses": 1}, "theirs": {"hits": 0, "misses": 1}}
    md = (tmp_path / "out" / "parity_personalize_dev.md").read_text()
    assert "| Custom Diffusion |" in md and "fidelity ours | fidelity theirs | Δ fidelity" in md and "n = units" in md
    assert md.count("| Custom Diffusion |") >= 2  # the table and the per-attribute Δ
    # Ours is quality_personalize's own cell (same key, same cache): its table reads it back.
    ours = quality_personalize.main(argv[:argv.index("--out-dir")] + ["--out-dir", str(tmp_path / "q"), "--grid-path",
                                                                       str(tmp_path / "g.png"), "--threads", "1"])
    assert ours["methods"]["CUSTOM_DIFFUSION"]["after"] == m["ours"]
    assert ours["cache"]["misses"] == 1  # its "before" cell only

    # The script's adapter, as cached: our format, whole-K/V updates at rank min(out, in) = 48, the token.
    theirs = parity_personalize.TheirSetup(quality_personalize.Setup(
        str(DEFAULT_MODEL_DIR), quality_personalize.Sampling(1, 3), ResultCache("unused")), ResultCache("unused"))
    key = parity_personalize.adapter_key(theirs, "CUSTOM_DIFFUSION", m["their_settings"],
                                         CONCEPTS["purple-dotted-heart"])
    adapter = parse_adapter(ResultCache("parity_personalize").blob(key, lambda: pytest.fail("not cached")))
    assert adapter.max_rank == 48 and list(adapter.token_embeddings) == ["<sks>"]
    assert all(k.endswith(("attn2.to_k", "attn2.to_v")) for k in adapter.lora)
    engine = serving_engine(DEFAULT_MODEL_DIR, {"theirs": adapter}, max_rows=2, max_rank=48)
    spec = lambda uses: GenerationSpec(prompt="a <sks> heart on a white background", steps=3, seed=0,  # noqa: E731
                                       adapters=uses)
    base, adapted = engine.generate(spec(())).images[0], engine.generate(spec((AdapterUse("theirs"),))).images[0]
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(adapted, dtype=int)).max() > 0

    again = parity_personalize.main(argv)
    assert again["cache"] == {"ours": {"hits": 1, "misses": 0}, "theirs": {"hits": 1, "misses": 0}}
    assert again["methods"]["CUSTOM_DIFFUSION"]["difference"] == m["difference"]

    photos = [Image.fromarray(r.image) for r in CONCEPTS["purple-dotted-heart"].references(4, seed=0)]
    run = baselines.dreambooth_lora(DEFAULT_MODEL_DIR, photos, "a sks heart", rank=4, steps=2, learning_rate=1e-3,
                                    batch_size=2, script=baselines.ScriptRun(train_text_encoder=True))
    lora = parse_adapter(run.files["pytorch_lora_weights.safetensors"]).lora
    assert lora.keys() == run.adapter.lora.keys() and len(run.losses) == 2
    assert any(k.startswith("unet.") for k in lora) and any(k.startswith("text_encoder.") for k in lora)
    assert all(module.rank == 4 and module.scale == 1.0 for module in lora.values())
    assert any(module.up.abs().max() > 0 for module in lora.values())  # trained


def test_samplers_bench_on_a_few_prompts(tmp_path, one_torch_thread):
    """The samplers table's command on 3 prompts, few-step settings only: every row carries its
    interval and n, the few-step rows their paired difference and ratios to DDIM at 25 steps."""
    from bench import bench_samplers

    report = bench_samplers.main(["--prompts", "3", "--only", "few", "--threads", "1", "--out-dir", str(tmp_path)])
    reference, *few = report["few"]
    assert reference["label"] == "DDIM, 25 steps, guidance 4" and len(few) == len(bench_samplers.FEW)
    for r in report["few"]:
        assert r["accuracy"]["n"] == 3 and r["accuracy"]["lo"] <= r["accuracy"]["mean"] <= r["accuracy"]["hi"]
    assert all("delta_accuracy" in r and r["speed_ratio"] > 0 for r in few)
    md = (tmp_path / "samplers.md").read_text()
    assert "95% bootstrap interval over prompts" in md and "| LCM + LCM-LoRA, 4 steps, guidance 1 |" in md


def test_lcm_snapshot_chooser_pairs_each_file_with_the_first(tmp_path, one_torch_thread):
    """bench.lcm_snapshots on 3 dev prompts: the shipped LCM-LoRA against itself differs by exactly
    0 (same prompts, same seeds: the pairing holds), and its 4-step reading is bench_samplers' one."""
    from bench import bench_samplers, lcm_snapshots
    from service.research.lcm.distill import WEIGHTS

    report = lcm_snapshots.main([str(WEIGHTS), str(WEIGHTS), "--prompts", "3", "--out-dir", str(tmp_path)])
    first, again = report["rows"]
    assert first["delta_vs_first"] is None and first["accuracy"]["n"] == 3
    assert again["accuracy"] == first["accuracy"]
    assert again["delta_vs_first"]["mean"] == again["delta_vs_first"]["lo"] == again["delta_vs_first"]["hi"] == 0
    samplers = bench_samplers.main(["--prompts", "3", "--split", "dev", "--only", "few", "--threads", "1",
                                    "--out-dir", str(tmp_path)])
    lcm4 = next(r for r in samplers["few"] if r["label"] == "LCM + LCM-LoRA, 4 steps, guidance 1")
    assert lcm4["accuracy"] == first["accuracy"]
    assert "Δ vs first" in (tmp_path / "lcm_snapshots_dev.md").read_text()
