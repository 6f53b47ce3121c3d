"""The serving UNet at Stable Diffusion 1.5 or SDXL size, for an H100-class GPU (on CPU: a reduced size).

    python -m bench.gpu.bench_unet                           # GPU: SD 1.5 UNet (860 M), fp16 and bf16
    python -m bench.gpu.bench_unet --model sdxl              # GPU: SDXL base UNet (2.6 B), fp16, 1024 px
    python -m bench.gpu.bench_unet --model sdxl --size small # CPU check that every part runs (the default without CUDA)

Random weights in the model's architecture, built from its config (nothing downloaded), with the
adapter bank on every attention projection:

- sd15: diffusers' UNet2DConditionModel defaults (320/640/1280/1280 channels) with cross-attention
  768, 64x64 latents = 512x512 images.
- sdxl: SDXL base's UNet (bench/model_folders.py: sdxl_base_unet_config; 320/640/1280 channels, 1/2/10
  transformer layers, cross-attention 2048, `text_time` added conditioning), 128x128 latents =
  1024x1024 images. Its conditioning (pooled text embedding and size time_ids) rides in a trailing
  token of `embeds` [rows, 78, 2048], unpacked by the family's UNet pre-hook
  (service/engine/families/sdxl.py), as served.

For each dtype, batch 1/2/4/8 images (CFG pairs: 2/4/8/16 UNet rows), eager vs torch.compile (CUDA
graphs), base rows vs 8 distinct rank-8 adapters in the one batch: per-step latency, images/s (at 50
steps), adapter overhead, the cost of a swap into a slot, and the fraction of the FLOP ceiling (UNet
FLOPs counted by torch's FlopCounterMode -- about 1.78 TFLOP per CFG step for SD 1.5 at 512x512 --
over the device's dense matmul rate measured in the same run; on a GPU whose datasheet rate is known,
also the fraction of that). Also the UNet call of one DDS edit iteration (4 rows: source and target,
each with CFG, the target rows on an adapter; the rest of an iteration is a few element-wise ops)
and one DreamBooth-LoRA training step (rank 4 on every attention projection, batch 2, AdamW).
"adapters" rows: image i of a batch on adapter i, so a batch of n images mixes min(n, 8) distinct
adapters; each batch also records how much the adapters change the eager output (0 would mean the
bank routed nothing). Goals: adapter overhead <= 10% of the base step; >= 50% of the ceiling at
batch 8.

`--size small` (the default without CUDA) runs the same architecture at tiny widths (SD 1.5: 16x16
latents; SDXL: 8x8 latents = 64 px, batch 1-2) to show on a CPU that every part runs; its times
say nothing about a GPU. Without CUDA torch.compile is left out unless `--compile` is given
(Inductor takes minutes per graph on a small CPU; tests/test_bench_unet.py runs the CPU check).

Writes bench/results/gpu_unet_<model>[_small]_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from prometheus_client import CollectorRegistry  # noqa: F401  (keeps the import cost out of timings)

from bench.common import write_results
from bench.model_folders import sdxl_base_unet_config
from service.adapters import Adapter, AdapterBank, LoraModule
from service.compiled.torch_compile import CompiledUNet
from service.engine.families import ModelFamily, of_configs
from service.personalize.lora import lora_layers, parameters


@dataclass(frozen=True)
class Case:
    """One UNet to measure: its architecture (UNet2DConditionModel kwargs) at one latent size."""

    model: str  # "sd15" or "sdxl"
    size: str  # "full" or "small"
    config: dict
    latent: int  # latent side; images are 8x that (both models' VAE)
    # model_index.json entries the family is detected from (service/engine/families), as served.
    index: dict = field(default_factory=dict)
    batches: str = "1,2,4,8"
    cuda_dtypes: str = "float16,bfloat16"

    @property
    def name(self) -> str:
        return self.model if self.size == "full" else f"{self.model}_{self.size}"

    @property
    def family(self) -> ModelFamily:
        return of_configs({"_class_name": "bench", **self.index}, self.config, f"bench {self.name}")


_SDXL_INDEX = {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
CASES = {
    ("sd15", "full"): Case("sd15", "full", dict(cross_attention_dim=768, sample_size=64), latent=64),
    # diffusers' defaults are SD 1.5's UNet but for the text width (its default is 1280).
    ("sd15", "small"): Case("sd15", "small", dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64,
                                                  attention_head_dim=8, norm_num_groups=32), latent=16),
    ("sdxl", "full"): Case("sdxl", "full", sdxl_base_unet_config(), latent=128, index=_SDXL_INDEX, cuda_dtypes="float16"),
    # SDXL's architecture (three levels, the same block types, text_time conditioning) at tiny widths:
    # a 32-wide pooled embedding + 6 time ids of width 8, 64-wide token conditioning; 64 px.
    ("sdxl", "small"): Case("sdxl", "small", sdxl_base_unet_config(
        sample_size=8, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2),
        cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
        latent=8, index=_SDXL_INDEX, batches="1,2", cuda_dtypes="float16"),
}

# Dense fp16/bf16 tensor-core rates from NVIDIA's datasheets (the "with sparsity" figure halved), by
# a part of torch.cuda.get_device_name(); first match wins.
DATASHEET_DENSE_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4), ("H200 NVL", 835.5),
                          ("H200", 989.4), ("A100", 312.0))


def datasheet_rate(device_name: str, dtype: torch.dtype) -> float | None:
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    return next((tflops * 1e12 for part, tflops in DATASHEET_DENSE_TFLOPS if part in device_name), None)


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


def embeds(case: Case, family: ModelFamily, rows: int, device, dtype) -> torch.Tensor:
    """Random conditioning of `rows` rows as the served UNet takes it: token states [rows, 77, D],
    and for SDXL the pooled embedding and the time_ids of a full-size image packed behind them."""
    tokens = torch.randn(rows, family.text_tokens, family.text_width, device=device, dtype=dtype)
    if not family.added_tokens:
        return tokens
    side = 8 * case.latent
    pooled = torch.randn(rows, family.pooled_width, device=device, dtype=dtype)
    time_ids = torch.tensor([side, side, 0, 0, side, side], device=device, dtype=dtype).expand(rows, -1)
    return family.pack(tokens, pooled, time_ids)


def build_unet(case: Case, family: ModelFamily, device, dtype) -> torch.nn.Module:
    unet = UNet2DConditionModel(**case.config).to(device, dtype).eval().requires_grad_(False)
    family.install(unet)  # SDXL: unpacks the added conditioning on the way in (as Engine does)
    return unet


def unet_flops_per_row(unet, case: Case, family: ModelFamily, device, dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 4, case.latent, case.latent, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=device), encoder_hidden_states=embeds(case, family, 1, device, dtype))
    return float(counter.get_total_flops())


def random_adapter(bank: AdapterBank, rank: int, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, shape in bank.module_shapes.items():
        if name.startswith("unet.") and len(shape) == 2:  # the attention Linears (a conv's shape has a kernel)
            out_f, in_f = shape
            lora[name] = LoraModule(down=torch.randn(rank, in_f, generator=g) / in_f**0.5,
                                    up=torch.randn(out_f, rank, generator=g) * 0.01, alpha=float(rank))
    return Adapter(lora=lora)


def run_dtype(args, device, device_name: str, dtype, case: Case) -> dict:
    torch.manual_seed(0)
    family = case.family
    unet = build_unet(case, family, device, dtype)
    latent = case.latent
    batches = [int(b) for b in args.batches.split(",")]
    max_rows = 2 * max(max(batches), 2)
    flops_row = unet_flops_per_row(unet, case, family, device, dtype)
    bank = AdapterBank(unet, num_slots=args.adapters + 1, max_rank=args.rank, max_rows=max_rows)
    prepared = [bank.prepare(random_adapter(bank, args.rank, seed)) for seed in range(args.adapters)]
    for slot, adapter in enumerate(prepared, start=1):
        bank.load_slot(slot, adapter, check=False)
    eager = lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample  # noqa: E731
    runtimes = {"eager": eager}
    compiled, compile_s = None, None
    if args.compile:
        row_buckets = sorted({2 * b for b in batches} | {4})  # 4: the DDS iteration's rows
        compiled = CompiledUNet(unet, buckets=row_buckets, text_length=family.text_length)
        t0 = time.perf_counter()
        compiled.warmup([(rows, latent, latent) for rows in row_buckets])
        compile_s = time.perf_counter() - t0
        runtimes["compiled"] = compiled
    ceiling = matmul_rate(device, dtype)
    peak = datasheet_rate(device_name, dtype)
    results = []
    with torch.no_grad():
        for batch in batches:
            rows = 2 * batch
            x = torch.randn(rows, 4, latent, latent, device=device, dtype=dtype)
            t = torch.full((rows,), 500.0, device=device)
            e = embeds(case, family, rows, device, dtype)
            # CFG pairs: image i's two rows share its adapter; 8 images = 8 distinct adapters.
            routed = [[1 + i % args.adapters] for i in range(batch)]
            with bank.activate(routed, repeat=2):
                out_adapted = eager(x, t, e).float()
            out_base = eager(x, t, e).float()
            change = float((out_adapted - out_base).abs().max() / out_base.abs().max())
            for name, fn in runtimes.items():
                base = timeit(lambda: fn(x, t, e), device, args.repeats)
                with bank.activate(routed, repeat=2):
                    adapted = timeit(lambda: fn(x, t, e), device, args.repeats)
                achieved = flops_row * rows / adapted
                results.append(dict(
                    runtime=name, batch=batch, rows=rows, base_ms=base * 1e3, adapters_ms=adapted * 1e3,
                    adapter_overhead=adapted / base - 1, images_per_s_50_steps=batch / (50 * adapted),
                    achieved_tflops=achieved / 1e12, ceiling_fraction=achieved / ceiling,
                    peak_fraction=None if peak is None else achieved / peak, adapter_output_change=change,
                ))
                print(results[-1], flush=True)
        # Swap: a prepared adapter copied into a slot (what a cache miss costs after the file is read).
        swap = timeit(lambda: bank.load_slot(1, prepared[1 % len(prepared)], check=False), device, args.repeats)
        # One DDS iteration: [source uncond, source cond, target uncond, target cond], target on an adapter.
        x4, t4, e4 = (torch.randn(4, 4, latent, latent, device=device, dtype=dtype), torch.full((4,), 500.0, device=device),
                      embeds(case, family, 4, device, dtype))
        fn = runtimes.get("compiled", eager)
        with bank.activate([[], [], [1], [1]]):
            dds = timeit(lambda: fn(x4, t4, e4), device, args.repeats)
    # The serving UNet's graphs and memory go before the training copy is built (SDXL: 5 GB each in fp16).
    params = sum(p.numel() for p in unet.parameters())
    del runtimes, compiled, fn, unet, bank, prepared, eager
    gc.collect()
    if device.type == "cuda":
        import torch._dynamo as dynamo  # (as: a plain `import torch._dynamo` would make torch local here)

        dynamo.reset()
        torch.cuda.empty_cache()
    # One DreamBooth-LoRA step: the trainers' LoRA layers (fp32 updates on the frozen base), batch 2.
    bank_free = build_unet(case, family, device, dtype)
    x2, e2 = torch.randn(2, 4, latent, latent, device=device, dtype=dtype), embeds(case, family, 2, device, dtype)
    with lora_layers(bank_free, "unet", ("to_q", "to_k", "to_v", "to_out.0"), rank=4, seed=0) as layers:
        opt = torch.optim.AdamW(list(parameters(layers).values()), lr=1e-4)

        def train_step():
            pred = bank_free(x2, torch.tensor([500, 200], device=device), encoder_hidden_states=e2).sample
            loss = torch.nn.functional.mse_loss(pred.float(), x2.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        train = timeit(train_step, device, max(min(3, args.repeats), args.repeats // 3))
    return dict(dtype=str(dtype).removeprefix("torch."), unet_params=params, flops_per_cfg_step=2 * flops_row,
                matmul_tflops=ceiling / 1e12, datasheet_tflops=None if peak is None else peak / 1e12,
                compile_seconds=compile_s, swap_ms=swap * 1e3, dds_iteration_ms=dds * 1e3,
                dreambooth_lora_step_ms=train * 1e3, steps=results)


def markdown(report: dict, case: Case) -> str:
    side = 8 * case.latent
    lines = [f"# Serving UNet: {case.model} at {case.size} size ({side}x{side} px) on {report['device']} ({report['date']})", ""]
    if report["device"].startswith("CPU"):
        lines += ["No GPU measured here: a CPU check that every part runs at a reduced size; its times say "
                  "nothing about a GPU.", ""]
    for run in report["runs"]:
        peak = run["datasheet_tflops"]
        lines += [
            f"## {run['dtype']}: {run['unet_params'] / 1e6:.1f} M parameters, {run['flops_per_cfg_step'] / 1e9:.1f} "
            f"GFLOP per CFG step (one image), matmul ceiling {run['matmul_tflops']:.2f} TFLOP/s"
            + (f" (datasheet {peak:.0f})" if peak else ""),
            "",
            "| runtime | images (rows) | base ms/step | ms/step, one distinct adapter per image | adapter overhead | "
            "images/s (50 steps) | TFLOP/s | of ceiling |" + (" of datasheet |" if peak else ""),
            "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if peak else ""),
        ]
        for s in run["steps"]:
            lines.append(f"| {s['runtime']} | {s['batch']} ({s['rows']}) | {s['base_ms']:.1f} | {s['adapters_ms']:.1f} | "
                         f"{s['adapter_overhead'] * 100:+.1f}% | {s['images_per_s_50_steps']:.2f} | "
                         f"{s['achieved_tflops']:.3g} | {s['ceiling_fraction'] * 100:.0f}% |"
                         + (f" {s['peak_fraction'] * 100:.0f}% |" if peak else ""))
        lines += ["", f"- swap into a slot: {run['swap_ms']:.2f} ms; a DDS iteration's UNet call (4 rows): {run['dds_iteration_ms']:.1f} ms; "
                  f"DreamBooth-LoRA step (batch 2): {run['dreambooth_lora_step_ms']:.1f} ms; compile + warm-up: "
                  + ("not run" if run["compile_seconds"] is None else f"{run['compile_seconds']:.0f} s"), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--size", choices=("full", "small"), default=None,
                        help="full: the real architecture's widths and resolution (default with CUDA); "
                             "small: tiny widths, a check that every part runs (default without CUDA)")
    parser.add_argument("--dtypes", default=None, help="default: float16,bfloat16 (SDXL: float16) on CUDA, float32 on CPU")
    parser.add_argument("--batches", default=None, help="images per step (CFG: 2 rows each); default 1,2,4,8 (SDXL small: 1,2)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile (default: on CUDA only; Inductor takes minutes per graph on a "
                             "small CPU)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = CASES[(args.model, args.size or ("full" if device.type == "cuda" else "small"))]
    args.batches = args.batches or case.batches
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    dtypes = args.dtypes or (case.cuda_dtypes if device.type == "cuda" else "float32")
    torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU ({platform.machine()}, {threads} thread{'s' if threads > 1 else ''})")
    report = dict(date=time.strftime("%Y-%m-%d"), device=name, model=case.model, size=case.size, torch=torch.__version__,
                  command=" ".join(["python -m bench.gpu.bench_unet", *(sys.argv[1:] if argv is None else argv)]),
                  runs=[run_dtype(args, device, name, getattr(torch, d), case) for d in dtypes.split(",")])
    out = args.out_dir or "bench/results"
    write_results(out, f"gpu_unet_{case.name}_{'cuda' if device.type == 'cuda' else 'cpu'}", report, markdown(report, case))
    return report


if __name__ == "__main__":
    main()
