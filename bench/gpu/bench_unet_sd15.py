"""The serving UNet at Stable Diffusion 1.5 size, for an H100-class GPU (runs on CPU at a small size).

    python -m bench.gpu.bench_unet_sd15                      # GPU: SD 1.5 UNet (860 M), fp16 and bf16
    python -m bench.gpu.bench_unet_sd15 --size small         # CPU check that every part runs

Random weights in SD 1.5's architecture (diffusers' UNet2DConditionModel defaults: 320/640/1280/1280
channels, cross-attention 768, 64x64 latents = 512x512 images) with the adapter bank on every
attention projection. For each dtype, batch 1/2/4/8 images (CFG pairs: 2/4/8/16 UNet rows), eager vs
torch.compile (CUDA graphs), base rows vs 8 distinct rank-8 adapters in the one batch:
per-step latency, images/s (at 50 steps), adapter overhead, the cost of a swap into a slot, and the
fraction of the FLOP ceiling (UNet FLOPs counted by torch's FlopCounterMode -- about 1.78 TFLOP per
CFG step at 512x512 -- over the device's dense matmul rate measured in the same run). Also the UNet
call of one DDS edit iteration (4 rows: source and target, each with CFG, the target rows on an
adapter; the rest of an iteration is a few element-wise ops) and one DreamBooth-LoRA training step
(rank 4 on every attention projection, batch 2, AdamW). "adapters" rows: image i of a batch on
adapter i, so a batch of n images mixes min(n, 8) distinct adapters.
Goals: adapter overhead <= 10% of the base step; >= 50% of the ceiling at batch 8.

Writes bench/results/gpu_unet_<size>_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from prometheus_client import CollectorRegistry  # noqa: F401  (keeps the import cost out of timings)

from bench.common import write_results
from service.adapters import Adapter, AdapterBank, LoraModule
from service.compiled.torch_compile import CompiledUNet
from service.personalize.lora import lora_layers, parameters

SIZES = {
    # diffusers' defaults are SD 1.5's UNet but for the text width (its default is 1280).
    "sd15": dict(config=dict(cross_attention_dim=768, sample_size=64), latent=64, text=(77, 768)),
    "small": dict(config=dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, attention_head_dim=8,
                              norm_num_groups=32), latent=16, text=(77, 64)),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device, dtype) -> float:
    """Dense matmul FLOP/s the device sustains in this dtype (the ceiling)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = timeit(lambda: a @ b, device, repeats=10)
    return 2 * n**3 / seconds


def unet_flops_per_row(unet, latent, text, device, dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    e = torch.randn(1, *text, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=device), encoder_hidden_states=e)
    return float(counter.get_total_flops())


def random_adapter(bank: AdapterBank, rank: int, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, (out_f, in_f) in bank.module_shapes.items():
        if name.startswith("unet."):
            lora[name] = LoraModule(down=torch.randn(rank, in_f, generator=g) / in_f**0.5,
                                    up=torch.randn(out_f, rank, generator=g) * 0.01, alpha=float(rank))
    return Adapter(lora=lora)


def run_dtype(args, device, dtype, size) -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**size["config"]).to(device, dtype).eval().requires_grad_(False)
    latent, text = size["latent"], size["text"]
    batches = [int(b) for b in args.batches.split(",")]
    max_rows = 2 * max(max(batches), 2)
    flops_row = unet_flops_per_row(unet, latent, text, device, dtype)
    bank = AdapterBank(unet, num_slots=args.adapters + 1, max_rank=args.rank, max_rows=max_rows)
    prepared = [bank.prepare(random_adapter(bank, args.rank, seed)) for seed in range(args.adapters)]
    for slot, adapter in enumerate(prepared, start=1):
        bank.load_slot(slot, adapter, check=False)
    eager = lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample  # noqa: E731
    runtimes = {"eager": eager}
    compile_s = None
    if not args.no_compile:
        row_buckets = sorted({2 * b for b in batches} | {4})  # 4: the DDS iteration's rows
        compiled = CompiledUNet(unet, buckets=row_buckets, text_length=text[0])
        t0 = time.perf_counter()
        compiled.warmup([(rows, latent, latent) for rows in row_buckets])
        compile_s = time.perf_counter() - t0
        runtimes["compiled"] = compiled
    ceiling = matmul_rate(device, dtype)
    results = []
    with torch.no_grad():
        for batch in batches:
            rows = 2 * batch
            x = torch.randn(rows, 4, latent, latent, device=device, dtype=dtype)
            t = torch.full((rows,), 500.0, device=device)
            e = torch.randn(rows, *text, device=device, dtype=dtype)
            # CFG pairs: image i's two rows share its adapter; 8 images = 8 distinct adapters.
            routed = [[1 + i % args.adapters] for i in range(batch)]
            for name, fn in runtimes.items():
                base = timeit(lambda: fn(x, t, e), device, args.repeats)
                with bank.activate(routed, repeat=2):
                    adapted = timeit(lambda: fn(x, t, e), device, args.repeats)
                results.append(dict(
                    runtime=name, batch=batch, rows=rows, base_ms=base * 1e3, adapters_ms=adapted * 1e3,
                    adapter_overhead=adapted / base - 1, images_per_s_50_steps=batch / (50 * adapted),
                    ceiling_fraction=flops_row * rows / adapted / ceiling,
                ))
                print(results[-1], flush=True)
        # Swap: a prepared adapter copied into a slot (what a cache miss costs after the file is read).
        swap = timeit(lambda: bank.load_slot(1, prepared[1 % len(prepared)], check=False), device, args.repeats)
        # One DDS iteration: [source uncond, source cond, target uncond, target cond], target on an adapter.
        x4, t4, e4 = (torch.randn(4, 4, latent, latent, device=device, dtype=dtype), torch.full((4,), 500.0, device=device),
                      torch.randn(4, *text, device=device, dtype=dtype))
        fn = runtimes.get("compiled", eager)
        with bank.activate([[], [], [1], [1]]):
            dds = timeit(lambda: fn(x4, t4, e4), device, args.repeats)
    # One DreamBooth-LoRA step: the trainers' LoRA layers (fp32 updates on the frozen base), batch 2.
    bank_free = UNet2DConditionModel(**size["config"]).to(device, dtype).requires_grad_(False)
    x2, e2 = torch.randn(2, 4, latent, latent, device=device, dtype=dtype), torch.randn(2, *text, device=device, dtype=dtype)
    with lora_layers(bank_free, "unet", ("to_q", "to_k", "to_v", "to_out.0"), rank=4, seed=0) as layers:
        opt = torch.optim.AdamW(list(parameters(layers).values()), lr=1e-4)

        def train_step():
            pred = bank_free(x2, torch.tensor([500, 200], device=device), encoder_hidden_states=e2).sample
            loss = torch.nn.functional.mse_loss(pred.float(), x2.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        train = timeit(train_step, device, max(3, args.repeats // 3))
    return dict(dtype=str(dtype).removeprefix("torch."), unet_params=sum(p.numel() for p in unet.parameters()),
                flops_per_cfg_step=2 * flops_row, matmul_tflops=ceiling / 1e12, compile_seconds=compile_s,
                swap_ms=swap * 1e3, dds_iteration_ms=dds * 1e3, dreambooth_lora_step_ms=train * 1e3, steps=results)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--dtypes", default=None, help="default: float16,bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batches", default="1,2,4,8", help="images per step (CFG: 2 rows each)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = args.dtypes or ("float16,bfloat16" if device.type == "cuda" else "float32")
    torch.set_flush_denormal(True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    report = dict(date=time.strftime("%Y-%m-%d"), device=name, size=args.size, torch=torch.__version__,
                  command=" ".join(["python -m bench.gpu.bench_unet_sd15", *(sys.argv[1:] if argv is None else argv)]),
                  runs=[run_dtype(args, device, getattr(torch, d), SIZES[args.size]) for d in dtypes.split(",")])
    lines = [f"# Serving UNet at {args.size} size on {name} ({report['date']})", ""]
    for run in report["runs"]:
        lines += [
            f"## {run['dtype']}: {run['unet_params'] / 1e6:.1f} M parameters, {run['flops_per_cfg_step'] / 1e9:.1f} "
            f"GFLOP per CFG step (one image), matmul ceiling {run['matmul_tflops']:.2f} TFLOP/s",
            "",
            "| runtime | images (rows) | base ms/step | ms/step, one distinct adapter per image | adapter overhead | images/s (50 steps) | of ceiling |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in run["steps"]:
            lines.append(f"| {s['runtime']} | {s['batch']} ({s['rows']}) | {s['base_ms']:.1f} | {s['adapters_ms']:.1f} | "
                         f"{s['adapter_overhead'] * 100:+.1f}% | {s['images_per_s_50_steps']:.2f} | "
                         f"{s['ceiling_fraction'] * 100:.0f}% |")
        lines += ["", f"- swap into a slot: {run['swap_ms']:.2f} ms; a DDS iteration's UNet call (4 rows): {run['dds_iteration_ms']:.1f} ms; "
                  f"DreamBooth-LoRA step (batch 2): {run['dreambooth_lora_step_ms']:.1f} ms; compile + warm-up: "
                  f"{run['compile_seconds'] or 0:.0f} s", ""]
    out = args.out_dir or "bench/results"
    write_results(out, f"gpu_unet_{args.size}_{'cuda' if device.type == 'cuda' else 'cpu'}", report, "\n".join(lines))


if __name__ == "__main__":
    main()
