"""Adapter-bank benchmarks on the embedded tiny model, CPU: switch cost, heterogeneity, churn.

    python -m bench.bench_adapter_bank            # writes bench/results/adapter_bank.{json,md}

Everything runs in one process, side by side, interleaved variant by variant (A, B, C, A, B, C, ...)
so load from other processes on a shared machine hits every variant alike; figures are medians.

- switch: UNet calls on the base model (plain UNet, and through the bank's slot 0) vs with a
  resident adapter (a different one each call); the switch itself timed directly: a resident hit,
  a cold load (read file, parse, validate, copy into a slot) in UNet-step units, and diffusers'
  load_lora_weights + set_adapters + unload_lora_weights. Whole requests as a cross-check.
- heterogeneity: 8 requests (16 UNet rows with CFG) with 8 different adapters vs all on one adapter,
  per UNet call and as whole batched requests; and diffusers serving the same 8 one by one with a
  swap each.
- churn: 1,000 cycles that each read an adapter from disk into a slot, evicting another; resident
  memory (RSS) sampled along the way, with its least-squares slope.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from service.adapters import BankedAdapters, parse_adapter
from bench.reference_adapters import tiny_pipeline, write_reference_lora
from service.engine.pipeline import AdapterUse, Engine, GenerationSpec

RESULTS = Path(__file__).parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def generate_batch(engine: Engine, specs: list[GenerationSpec]):
    """Several requests in one denoising loop (what a batching backend does with the engine's steps)."""
    rows = [tuple(s.adapters) for s in specs]
    embeds = engine.encode_prompts([s.negative_prompt for s in specs] + [s.prompt for s in specs], rows + rows)
    latents = engine.initial_latents([s.seed for s in specs], specs[0].height, specs[0].width)
    scheduler = engine.new_scheduler(specs[0].steps)
    # Pin the batch's adapters for the whole loop, so every step's activate() is a hit.
    with engine.adapters.hold(rows) if any(rows) else contextlib.nullcontext():
        for t in scheduler.timesteps:
            noise = engine.predict_noise_cfg(latents, t, embeds, specs[0].guidance_scale, rows)
            latents = scheduler.step(noise, t, latents).prev_sample
    return engine.decode(latents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of whole requests")
    parser.add_argument("--unet-calls", type=int, default=60, help="interleaved rounds of single UNet calls")
    parser.add_argument("--batch-repeats", type=int, default=2, help="rounds of the 8-request batches")
    parser.add_argument("--adapters", type=int, default=9)
    parser.add_argument("--rank", type=int, default=4, help="rank of the benchmark adapters")
    parser.add_argument("--max-rank", type=int, default=8, help="bank slots' rank (adapters zero-padded)")
    parser.add_argument("--max-adapters-per-row", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # per thread: with more intra-op threads, workers may not flush
    pipe = tiny_pipeline()
    workdir = Path(tempfile.mkdtemp(prefix="bench_adapter_bank_"))
    keys = [f"user{i}" for i in range(args.adapters)]
    dirs = {}
    for i, key in enumerate(keys):
        dirs[key] = workdir / key
        write_reference_lora(dirs[key], pipe.unet, rank=args.rank, alpha=2.0 * args.rank, seed=100 + i, std=0.1)
    files = {k: d / "pytorch_lora_weights.safetensors" for k, d in dirs.items()}

    def loader(key: str):
        return parse_adapter(str(files[key]))  # from disk every time: the store's cost included

    def new_engine(banked: bool, max_rank: int = args.max_rank, per_row: int = args.max_adapters_per_row):
        c = copy.deepcopy(pipe)
        engine = Engine(c.tokenizer, c.text_encoder, c.unet, c.vae, c.scheduler)
        hook = None
        if banked:
            hook = BankedAdapters.attach(
                engine, loader, num_slots=args.adapters + 1, max_rank=max_rank, max_rows=32,
                max_adapters_per_row=per_row, registry=CollectorRegistry(),
            )
        return engine, hook

    plain, _ = new_engine(False)
    engine, hook = new_engine(True)
    # The same bank sized to the adapters (slot rank = adapter rank, one adapter per row): the
    # LoRA path's cost is proportional to slot rank x adapters per row.
    tight, tight_hook = new_engine(True, max_rank=args.rank, per_row=1)
    ref = copy.deepcopy(pipe)  # diffusers serving: swap per request

    def spec(key: str | None, seed: int = 0) -> GenerationSpec:
        adapters = (AdapterUse(key),) if key else ()
        return GenerationSpec(prompt="a photo of a dog", steps=args.steps, seed=seed, adapters=adapters)

    def diffusers_request(key: str, seed: int = 0) -> dict[str, float]:
        t0 = time.perf_counter()
        ref.load_lora_weights(str(dirs[key]), adapter_name=key)
        ref.set_adapters([key])
        t1 = time.perf_counter()
        latents = plain.initial_latents([seed], 64, 64)
        ref("a photo of a dog", num_inference_steps=args.steps, guidance_scale=7.5, latents=latents)
        t2 = time.perf_counter()
        ref.unload_lora_weights()
        t3 = time.perf_counter()
        return dict(total=t3 - t0, switch=(t1 - t0) + (t3 - t2))

    # Warm up every path once (allocator, first-call costs), and make all adapters resident.
    for key in keys:
        hook.manager.prefetch(key)
        tight_hook.manager.prefetch(key)
    plain.generate(spec(None))
    engine.generate(spec(keys[0]))
    diffusers_request(keys[0])

    # ---- switch cost ---------------------------------------------------------------------------
    # UNet calls, interleaved call by call: at this grain a load swing on the shared machine hits
    # all variants alike. Each "resident" call routes to the next adapter: every call is a switch.
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor(500)
    use = [(AdapterUse(k),) for k in keys]

    def unet_call(eng: Engine, rows=None):
        with torch.no_grad(), (eng.adapters.activate(rows) if rows else contextlib.nullcontext()):
            eng.unet(x, t, encoder_hidden_states=ehs)

    calls: dict[str, list[float]] = {k: [] for k in ("base_plain", "base_bank", "resident", "resident_tight")}
    for r in range(args.unet_calls):
        calls["base_plain"].append(timed(lambda: unet_call(plain)))
        calls["base_bank"].append(timed(lambda: unet_call(engine)))
        calls["resident"].append(timed(lambda: unet_call(engine, [use[r % len(keys)]] * 2)))
        calls["resident_tight"].append(timed(lambda: unet_call(tight, [use[r % len(keys)]] * 2)))
    cmed = {k: statistics.median(v) for k, v in calls.items()}
    step = cmed["base_plain"]

    # The switch itself, measured directly.
    hit = [timed(lambda: hook.manager.prefetch(keys[i % len(keys)])) for i in range(1000)]
    cold_load = []
    for i in range(args.repeats * 4):
        hook.manager.invalidate(keys[i % len(keys)])  # out of its slot and host memory: reads the file
        cold_load.append(timed(lambda: hook.manager.prefetch(keys[i % len(keys)])))

    # Whole requests, interleaved (noisier: seconds-long, on a shared machine).
    times: dict[str, list[float]] = {k: [] for k in ("base_plain", "resident", "cold", "diffusers")}
    diffusers_switch = []
    for r in range(args.repeats):
        key = keys[r % len(keys)]
        times["base_plain"].append(timed(lambda: plain.generate(spec(None))))
        times["resident"].append(timed(lambda: engine.generate(spec(key))))
        hook.manager.invalidate(key)
        times["cold"].append(timed(lambda: engine.generate(spec(key))))
        d = diffusers_request(key)
        times["diffusers"].append(d["total"])
        diffusers_switch.append(d["switch"])
    med = {k: statistics.median(v) for k, v in times.items()}
    switch = dict(
        unet_call_seconds=cmed,
        resident_vs_base_plain=cmed["resident"] / cmed["base_plain"],
        resident_vs_base_bank=cmed["resident"] / cmed["base_bank"],
        resident_tight_vs_base_plain=cmed["resident_tight"] / cmed["base_plain"],
        bank_base_vs_base_plain=cmed["base_bank"] / cmed["base_plain"],
        resident_switch_seconds=statistics.median(hit),
        cold_load_seconds=statistics.median(cold_load),
        cold_extra_in_unet_steps=statistics.median(cold_load) / step,
        diffusers_switch_seconds=statistics.median(diffusers_switch),
        diffusers_switch_vs_bank_cold=statistics.median(diffusers_switch) / statistics.median(cold_load),
        diffusers_switch_vs_bank_resident=statistics.median(diffusers_switch) / statistics.median(hit),
        request_seconds=med,
        request_resident_vs_base_plain=med["resident"] / med["base_plain"],
        request_cold_minus_resident_seconds=med["cold"] - med["resident"],
        request_diffusers_vs_bank_resident=med["diffusers"] / med["resident"],
    )
    print(json.dumps(switch, indent=2))

    # ---- heterogeneity -------------------------------------------------------------------------
    eight = keys[:8]
    x16, e16 = x.repeat(8, 1, 1, 1), ehs.repeat(8, 1, 1)
    different = [(AdapterUse(k),) for k in eight] * 2  # [uncond; cond] rows of 8 requests
    shared = [(AdapterUse(eight[0]),)] * 16
    het_calls: dict[str, list[float]] = {"different": [], "shared": []}
    with hook.hold(different):
        for r in range(args.unet_calls // 2):
            for name, rows in (("different", different), ("shared", shared)):
                with torch.no_grad(), engine.adapters.activate(rows):
                    het_calls[name].append(timed(lambda: engine.unet(x16, t, encoder_hidden_states=e16)))
    het = {"different": [], "shared": [], "diffusers": []}
    for r in range(args.batch_repeats):
        het["different"].append(timed(lambda: generate_batch(engine, [spec(k, seed=i) for i, k in enumerate(eight)])))
        het["shared"].append(timed(lambda: generate_batch(engine, [spec(eight[0], seed=i) for i in range(8)])))
        het["diffusers"].append(timed(lambda: [diffusers_request(k, seed=i) for i, k in enumerate(eight)]))
    hc = {k: statistics.median(v) for k, v in het_calls.items()}
    hmed = {k: statistics.median(v) for k, v in het.items()}
    heterogeneity = dict(
        unet_call_seconds_16_rows=hc,
        different_vs_shared_throughput_unet=hc["shared"] / hc["different"],
        seconds_for_8_requests=hmed,
        images_per_second={k: 8 / v for k, v in hmed.items()},
        different_vs_shared_throughput=hmed["shared"] / hmed["different"],
        bank_vs_diffusers_swap_throughput=hmed["diffusers"] / hmed["different"],
    )
    print(json.dumps(heterogeneity, indent=2))

    # ---- churn: 1,000 load/evict cycles --------------------------------------------------------
    from service.adapters import AdapterBank, AdapterManager

    churn_unet = copy.deepcopy(pipe.unet)
    churn_bank = AdapterBank(churn_unet, num_slots=3, max_rank=args.max_rank)
    manager = AdapterManager(churn_bank, loader, host_cache_size=0, registry=CollectorRegistry())
    samples_x, samples_rss = [], []
    t0 = time.perf_counter()
    for i in range(args.cycles):
        manager.prefetch(keys[i % len(keys)])  # 9 keys round-robin over 2 slots: every cycle misses
        if i % 20 == 0 or i == args.cycles - 1:
            samples_x.append(i)
            samples_rss.append(rss_bytes())
    churn_seconds = time.perf_counter() - t0
    # The slope over the second half: the first cycles fill caches (allocator arenas, safetensors).
    half = len(samples_x) // 2
    churn = dict(
        cycles=args.cycles,
        evictions=manager.metrics.evictions._value.get(),
        seconds_per_cycle=churn_seconds / args.cycles,
        rss_start_mib=samples_rss[0] / 2**20,
        rss_end_mib=samples_rss[-1] / 2**20,
        rss_slope_bytes_per_cycle=slope(samples_x, samples_rss),
        rss_slope_second_half_bytes_per_cycle=slope(samples_x[half:], samples_rss[half:]),
        adapter_file_bytes=files[keys[0]].stat().st_size,
    )
    print(json.dumps(churn, indent=2))

    results = dict(
        machine=dict(
            cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch_threads=args.threads,
            load_average=os.getloadavg(), torch=torch.__version__,
        ),
        config=dict(
            model="seeded tiny SD-architecture pipeline (UNet 1.4 M params), 64x64, CFG 7.5",
            steps=args.steps, repeats=args.repeats, unet_calls=args.unet_calls, batch_repeats=args.batch_repeats,
            adapters=args.adapters, adapter_rank=args.rank,
            bank_max_rank=args.max_rank, max_adapters_per_row=args.max_adapters_per_row,
            bank_slot_bytes=hook.bank.slot_nbytes(),
        ),
        switch=switch,
        heterogeneity=heterogeneity,
        churn=churn,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_bank.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "adapter_bank.md").write_text(render_markdown(results))
    print(f"wrote {args.out / 'adapter_bank.json'} and {args.out / 'adapter_bank.md'}")


def render_markdown(r: dict) -> str:
    s, h, c, m, cfg = r["switch"], r["heterogeneity"], r["churn"], r["machine"], r["config"]
    uc = {k: v * 1e3 for k, v in s["unet_call_seconds"].items()}
    rq = s["request_seconds"]
    hs, hc = h["seconds_for_8_requests"], h["unet_call_seconds_16_rows"]
    return f"""## Adapter bank (CPU, tiny model)

`python -m bench.bench_adapter_bank`: seeded tiny SD-architecture model (UNet 1.4 M parameters), 64x64,
CFG 7.5, {cfg['steps']} DDIM steps; adapters of rank {cfg['adapter_rank']} (attn1/attn2 q, k, v, out) in bank
slots of rank {cfg['bank_max_rank']}, up to {cfg['max_adapters_per_row']} adapters per row; {m['torch_threads']}
torch thread on a shared {m['cores']}-core machine (load average {m['load_average'][0]:.1f} at the end).
Medians of runs interleaved variant by variant ({cfg['unet_calls']} rounds of single UNet calls,
{cfg['repeats']} of whole requests, {cfg['batch_repeats']} of 8-request batches).

### Switch cost

| | measured | ratio | goal |
|---|---:|---:|---|
| UNet call (CFG pair), base model, plain UNet | {uc['base_plain']:.1f} ms | 1.00 | |
| UNet call, base model through the bank (slot 0) | {uc['base_bank']:.1f} ms | {s['bank_base_vs_base_plain']:.3f} | |
| UNet call, resident adapter (a different one each call) | {uc['resident']:.1f} ms | **{s['resident_vs_base_plain']:.3f}** vs plain, {s['resident_vs_base_bank']:.3f} vs bank base | <= 1.05 |
| same, bank sized to the adapters (slot rank {cfg['adapter_rank']}, 1 adapter per row) | {uc['resident_tight']:.1f} ms | **{s['resident_tight_vs_base_plain']:.3f}** vs plain | <= 1.05 |
| switch to a resident adapter (acquire, hit) | {s['resident_switch_seconds'] * 1e6:.0f} us | | |
| switch to a cold adapter (read file, parse, validate, copy into a slot) | {s['cold_load_seconds'] * 1e3:.1f} ms | **{s['cold_extra_in_unet_steps']:.2f} UNet steps** | <= 1 step |
| diffusers load_lora_weights + set_adapters + unload_lora_weights | {s['diffusers_switch_seconds'] * 1e3:.0f} ms | **{s['diffusers_switch_vs_bank_cold']:.0f}x** our cold switch, {s['diffusers_switch_vs_bank_resident']:.0f}x our resident switch | >= 20x |
| whole request, base plain / resident / cold / diffusers swap | {rq['base_plain']:.2f} / {rq['resident']:.2f} / {rq['cold']:.2f} / {rq['diffusers']:.2f} s | resident {s['request_resident_vs_base_plain']:.2f}x base; diffusers {s['request_diffusers_vs_bank_resident']:.2f}x ours | |

### Heterogeneity: 8 requests, 8 different adapters

| | measured | ratio | goal |
|---|---:|---:|---|
| UNet call, 16 rows, 8 different adapters | {hc['different'] * 1e3:.0f} ms | | |
| UNet call, 16 rows, one shared adapter | {hc['shared'] * 1e3:.0f} ms | different/shared throughput **{h['different_vs_shared_throughput_unet']:.3f}** | >= 0.85 |
| 8 requests batched, different adapters | {hs['different']:.2f} s ({8 / hs['different']:.2f} img/s) | | |
| 8 requests batched, one shared adapter | {hs['shared']:.2f} s ({8 / hs['shared']:.2f} img/s) | different/shared {h['different_vs_shared_throughput']:.2f} | >= 0.85 |
| diffusers, one by one, swap per request | {hs['diffusers']:.2f} s ({8 / hs['diffusers']:.2f} img/s) | bank/diffusers **{h['bank_vs_diffusers_swap_throughput']:.2f}x** | >= 3x |

### Churn: {c['cycles']} load/evict cycles

{c['evictions']:.0f} evictions, {c['seconds_per_cycle'] * 1e3:.1f} ms per cycle (file {c['adapter_file_bytes'] / 1024:.0f} KiB
read from disk each time, no host cache). RSS {c['rss_start_mib']:.1f} MiB -> {c['rss_end_mib']:.1f} MiB; slope
{c['rss_slope_bytes_per_cycle']:.0f} B/cycle overall, {c['rss_slope_second_half_bytes_per_cycle']:.0f} B/cycle over the second half.
"""


if __name__ == "__main__":
    main()
