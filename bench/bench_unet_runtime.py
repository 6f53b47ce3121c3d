"""Per-step UNet latency of the runtimes, side by side on the embedded model: eager vs torch.compile
vs onnxruntime, each on base rows and on rows with a different adapter each.

    python -m bench.bench_unet_runtime          # writes bench/results/unet_runtime.{json,md}

One process; every variant is timed in turn inside each round (A, B, C, ... A, B, C) so load from
elsewhere on a shared machine hits all alike; figures are medians of per-round means. The baseline
a user would otherwise pick is the plain diffusers UNet, eager, with no adapter bank. Also reported:
the cost of a swap (an adapter copied into a bound slot) and that no variant recompiled or
re-exported across the swaps of the run (Dynamo's compiled-graph count and the export count before
and after).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from bench.common import add_run_arguments, start_run, write_results
from service.adapters import BankedAdapters, parse_adapter
from bench.reference_adapters import write_reference_lora
from service.compiled import RuntimeOptions, configure_unet_runtime, onnx_export
from service.compiled.torch_compile import compiled_graph_count
from service.engine.default_model import default_model_dir
from service.engine.pipeline import AdapterUse, Engine


def make_adapters(unet, count: int, rank: int, out: Path) -> dict:
    adapters = {}
    for i in range(count):
        path = write_reference_lora(out / f"a{i}", unet, rank=rank, alpha=rank, seed=100 + i, std=0.05)
        adapters[f"a{i}"] = parse_adapter(str(path))
    return adapters


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--model-dir", default=None, help="diffusers folder (default: the embedded model)")
    parser.add_argument("--rows", default="2,8", help="UNet rows per call (CFG: 2 per image)")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters, one per row")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5, help="UNet calls per variant per round")
    args = parser.parse_args(argv)
    started = start_run(args)
    row_counts = [int(r) for r in args.rows.split(",")]
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir(Path(tempfile.gettempdir()) / "steerserve-models")

    with tempfile.TemporaryDirectory() as tmp:
        plain = Engine.from_pretrained(model_dir)
        adapters = make_adapters(plain.unet, args.adapters, args.rank, Path(tmp) / "loras")
        engines, setup = {}, {}
        for kind in ("eager", "compile", "onnx"):
            engine = Engine.from_pretrained(model_dir)
            BankedAdapters.attach(engine, adapters.__getitem__, num_slots=args.adapters + 1, max_rank=args.rank,
                                  max_rows=max(row_counts), registry=CollectorRegistry())
            t0 = time.perf_counter()
            configure_unet_runtime(engine, RuntimeOptions(kind=kind, buckets=tuple(row_counts),
                                                          cache_dir=Path(tmp) / "compiled"))
            setup[kind] = time.perf_counter() - t0
            engines[kind] = engine
            print(f"{kind}: ready in {setup[kind]:.1f} s", flush=True)

        size = plain.limits.default_size // plain.vae_scale_factor
        g = torch.Generator().manual_seed(0)
        inputs = {}
        for rows in row_counts:
            latents = torch.randn(rows, plain.unet.config.in_channels, size, size, generator=g)
            t = torch.randint(1, 1000, (rows,), generator=g)
            embeds = plain.encode_prompts([f"prompt {i}" for i in range(rows)])
            inputs[rows] = (latents, t, embeds)
        keys = list(adapters)

        def routed(rows):
            return [[AdapterUse(keys[i % len(keys)])] for i in range(rows)]

        variants = {}
        for rows in row_counts:
            latents, t, embeds = inputs[rows]
            variants[("plain diffusers UNet (eager, no bank)", "base", rows)] = (
                lambda l=latents, t=t, e=embeds: plain.unet(l, t, encoder_hidden_states=e).sample)
            for kind, engine in engines.items():
                for label, adapter_rows in (("base", [[]] * rows), ("adapters", routed(rows))):
                    variants[(kind, label, rows)] = (
                        lambda en=engine, l=latents, t=t, e=embeds, r=adapter_rows: en.predict_noise(l, t, e, r))
        # Make every adapter resident first (a swap is measured separately below).
        for fn in variants.values():
            fn()
        # What a recompile or re-export would change: Dynamo's compiled-graph count, this process's
        # ONNX exports, the onnxruntime session object.
        session = engines["onnx"].unet_runtime.session
        graphs_before = {"torch.compile graphs": compiled_graph_count(), "onnx exports": onnx_export.exports_done}

        times = {key: [] for key in variants}
        with torch.no_grad():
            for r in range(args.rounds):
                for key, fn in variants.items():
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    times[key].append((time.perf_counter() - t0) / args.calls)
                # A swap into a bound slot every round on every runtime: later rounds run on new weights.
                for engine in engines.values():
                    bank = engine.adapters.bank
                    slot = engine.adapters.manager.resident()[keys[r % len(keys)]]
                    bank.load_slot(slot, adapters[keys[(r + 1) % len(keys)]])
                    bank.load_slot(slot, adapters[keys[r % len(keys)]])
        graphs_after = {"torch.compile graphs": compiled_graph_count(), "onnx exports": onnx_export.exports_done}
        assert engines["onnx"].unet_runtime.session is session

        # Swap cost: copy a prepared adapter into a slot.
        bank = engines["eager"].adapters.bank
        prepared = bank.prepare(adapters[keys[0]])
        swap = []
        for _ in range(50):
            t0 = time.perf_counter()
            bank.load_slot(1, prepared, check=False)
            swap.append(time.perf_counter() - t0)

    med = {key: statistics.median(v) for key, v in times.items()}
    rows_out = []
    for rows in row_counts:
        baseline = med[("plain diffusers UNet (eager, no bank)", "base", rows)]
        for (kind, label, r), value in med.items():
            if r != rows:
                continue
            base = med.get((kind, "base", rows), value)
            rows_out.append(dict(runtime=kind, rows=rows, adapters=label, step_ms=value * 1e3,
                                 vs_plain_eager=value / baseline, vs_banked_eager=value / med[("eager", label, rows)]
                                 if kind in engines else None, adapter_overhead=value / base - 1 if label == "adapters"
                                 else None))
    report = dict(
        date=time.strftime("%Y-%m-%d"), machine=f"{platform.processor() or platform.machine()}, "
        f"{args.threads} threads", model=str(model_dir.name), rows=row_counts, adapters=args.adapters, rank=args.rank,
        rounds=args.rounds, calls=args.calls, setup_seconds=setup, swap_ms_median=statistics.median(swap) * 1e3,
        graphs_before_swaps=graphs_before, graphs_after_swaps=graphs_after, results=rows_out,
        seconds=time.time() - started,
    )
    lines = [
        f"# UNet runtimes: per-step latency ({report['date']}, {report['machine']}, model {report['model']})",
        "",
        "`python -m bench.bench_unet_runtime` -- medians of per-round means, variants interleaved in each of "
        f"{args.rounds} rounds x {args.calls} calls. \"adapters\": every row a different rank-{args.rank} adapter "
        f"({args.adapters} resident). Baseline: the plain diffusers UNet, eager, no adapter bank.",
        "",
        "| runtime | rows | rows' adapters | ms / step | vs plain eager UNet | vs banked eager | adapter overhead |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows_out:
        def fmt(x, pct=False):
            return "" if x is None else (f"{x * 100:+.0f}%" if pct else f"{x:.2f}x")
        lines.append(f"| {r['runtime']} | {r['rows']} | {r['adapters']} | {r['step_ms']:.1f} | {fmt(r['vs_plain_eager'])} "
                     f"| {fmt(r['vs_banked_eager'])} | {fmt(r['adapter_overhead'], pct=True)} |")
    lines += [
        "",
        f"- Start-up: eager {setup['eager']:.1f} s; torch.compile of {len(row_counts)} buckets {setup['compile']:.1f} s; "
        f"ONNX export + session {setup['onnx']:.1f} s (cached on disk after the first export).",
        f"- A swap (a prepared adapter copied into a slot the graphs read): {report['swap_ms_median']:.2f} ms median.",
        f"- Before / after the {args.rounds * 2} swaps into slots the graphs read: {graphs_before} / {graphs_after} "
        "(equal: no recompilation, no re-export; the same onnxruntime session throughout).",
        "",
    ]
    write_results(args.out_dir, "unet_runtime", report, "\n".join(lines))


if __name__ == "__main__":
    main()
