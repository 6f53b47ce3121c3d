"""Distil an LCM-LoRA for the embedded model: latent consistency distillation (Luo et al., "LCM-LoRA",
2023) as diffusers' `examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py` runs it,
on world images instead of LAION.

    python -m service.research.lcm.distill                      # the shipped settings (docs/samplers.md)
    python -m service.research.lcm.distill --steps 50 --out /tmp/lcm.safetensors   # a short run

Each step, for a batch of world images (latents x0) and their captions c:

1. A DDIM solver over 50 skipped steps (the teacher's schedule, step k = 1000 / 50 timesteps):
   draw an index n, so t_{n+k} = solver timestep n and t_n = t_{n+k} - k.
2. x_{t_{n+k}} = x0 noised to t_{n+k}; a guidance weight w ~ U[w_min, w_max].
3. The student (base UNet + LoRA) maps x_{t_{n+k}} to its consistency output
   f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t) (the boundary conditions: f is the identity at t = 0).
4. The teacher (the base UNet, no LoRA) takes ONE DDIM step with classifier-free guidance w from
   t_{n+k} to t_n: x_{t_n} (the ODE step the student learns to skip).
5. The target network (an EMA of the student's LoRA) gives f(x_{t_n}, t_n), without gradients.
6. Loss: the pseudo-Huber distance between the two consistency outputs; the student's LoRA steps.

Only the LoRA trains (rank 16 on every Linear layer the adapter bank serves), so the result is an
ordinary adapter: served with LCMScheduler at 2-8 steps and guidance 1 (`sampler: "lcm"`), and
combined per row with a user's adapter like any two adapters. Written as a diffusers-layout LoRA
(`export_diffusers_lora`), the format diffusers' own LCM-LoRA files use.

Differences from the diffusers script, each for a reason: the target is an EMA of the student
(decay 0.95, the full-model LCM script's) where the LoRA script reuses the online student (the
issue asked for the EMA target; both are in the paper); the guidance range is this model's (its CFG
is sharp at 4: w in [2, 4], i.e. guidance 3-5, where SD's is w in [3, 15]); rank 16, the bank's
slot rank, where SD 1.5's is 64 (this UNet is 32-128 wide). Seeded: the batch at step s depends only
on (seed, s).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

from service.adapters import Adapter, parse_adapter
from service.adapters.bank import SERVED_UNET_TARGETS
from service.adapters.formats import export_diffusers_lora
from service.personalize import lora
from service.personalize.common import optimizer_step
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.basemodel.train import images_to_tensor
from service.research.world.generator import generate_batch

WEIGHTS = Path(__file__).parent / "weights" / "steerserve-world-v1-lcm-lora.safetensors"
# A world stream of its own: the distillation images are none of the base model's or the tests'.
LCM_STREAM = 7


def scalings_for_boundary_conditions(timestep: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip, c_out of the consistency function (LCMScheduler's, with its timestep_scaling 10)."""
    scaled = timestep.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def predicted_x0(noise: torch.Tensor, t: torch.Tensor, x: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[t][:, None, None, None]
    return (x - (1 - a).sqrt() * noise) / a.sqrt()


class DDIMSolver:
    """The teacher's skipping schedule: timesteps k-1, 2k-1, ..., 999 (k = 1000 / 50), and one
    deterministic DDIM step from solver timestep n to the one k below."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_train_timesteps: int = 1000, ddim_timesteps: int = 50):
        step_ratio = num_train_timesteps // ddim_timesteps
        self.k = step_ratio
        self.timesteps = torch.arange(1, ddim_timesteps + 1) * step_ratio - 1
        self.alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]])

    def step(self, pred_x0: torch.Tensor, pred_noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a_prev = self.alphas_prev[index][:, None, None, None]
        return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_noise


def world_dataset(pipe, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Latents (scaled posterior means) and caption embeddings of n world images."""
    latents, captions = [], []
    with torch.no_grad():
        for start in range(0, n, 250):
            samples = generate_batch(seed * 1000 + LCM_STREAM, start, min(250, n - start))
            latents.append(pipe.vae.encode(images_to_tensor(samples)).latent_dist.mode() * pipe.vae.config.scaling_factor)
            captions += [s.caption for s in samples]
        embeds = torch.cat([embed(pipe, captions[i : i + 250]) for i in range(0, n, 250)])
    return {"latents": torch.cat(latents), "embeds": embeds, "uncond": embed(pipe, [""])[0]}


def embed(pipe, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def distill(model_dir: Path, steps: int, batch: int, lr: float, rank: int, w_min: float, w_max: float,
            dataset_size: int, seed: int, ema_decay: float = 0.95, huber_c: float = 0.001, schedule: str = "constant",
            init: Adapter | None = None, log=print, snapshot=None, snapshot_every: int = 0) -> Adapter:
    """The LCM-LoRA after `steps` steps (from `init`'s weights when given: a longer run in parts).
    `schedule` "cosine" decays the learning rate to 0 over the steps. `snapshot(step, adapter)` is
    called every `snapshot_every` steps (the dev split judges a run's curve from one run)."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    data = world_dataset(pipe, dataset_size, seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    solver = DDIMSolver(alphas_cumprod, noise_scheduler.config.num_train_timesteps)

    teacher = pipe.unet.requires_grad_(False)
    student_unet = copy.deepcopy(teacher)
    target_unet = copy.deepcopy(teacher)
    with lora.lora_layers(student_unet, "unet", SERVED_UNET_TARGETS, rank, seed) as student, \
         lora.lora_layers(target_unet, "unet", SERVED_UNET_TARGETS, rank, seed) as target:
        params = [p for layer in student.values() for p in (layer.lora_A, layer.lora_B)]
        target_params = [p for layer in target.values() for p in (layer.lora_A, layer.lora_B)]
        for p in target_params:
            p.requires_grad_(False)
        if init is not None:
            with torch.no_grad():
                for name in student:
                    for layers in (student, target):
                        layers[name].lora_A.copy_(init.lora[name].down)
                        layers[name].lora_B.copy_(init.lora[name].up)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        t0, running = time.time(), []
        for step in range(steps):
            if schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = torch.randint(len(data["latents"]), (batch,), generator=g)
            x0, cond = data["latents"][idx], data["embeds"][idx]
            uncond = data["uncond"].expand_as(cond)

            # 1-2. Solver index n, x noised to t_{n+k}, guidance weight w.
            index = torch.randint(0, len(solver.timesteps), (batch,), generator=g)
            start_t = solver.timesteps[index]
            t = (start_t - solver.k).clamp(min=0)
            noise = torch.randn(x0.shape, generator=g)
            x_start = noise_scheduler.add_noise(x0, noise, start_t)
            w = (w_max - w_min) * torch.rand(batch, generator=g)[:, None, None, None] + w_min

            # 3. The student's consistency output at t_{n+k}.
            c_skip_start, c_out_start = scalings_for_boundary_conditions(start_t)
            student_noise = student_unet(x_start, start_t, encoder_hidden_states=cond).sample
            model_pred = c_skip_start * x_start + c_out_start * predicted_x0(student_noise, start_t, x_start, alphas_cumprod)

            with torch.no_grad():
                # 4. The teacher's guided DDIM step t_{n+k} -> t_n (cond and uncond in one call).
                both = teacher(torch.cat([x_start, x_start]), torch.cat([start_t, start_t]),
                               encoder_hidden_states=torch.cat([cond, uncond])).sample
                cond_noise, uncond_noise = both.chunk(2)
                cond_x0 = predicted_x0(cond_noise, start_t, x_start, alphas_cumprod)
                uncond_x0 = predicted_x0(uncond_noise, start_t, x_start, alphas_cumprod)
                x_prev = solver.step(cond_x0 + w * (cond_x0 - uncond_x0), cond_noise + w * (cond_noise - uncond_noise), index)

                # 5. The EMA target's consistency output at t_n.
                c_skip, c_out = scalings_for_boundary_conditions(t)
                target_noise = target_unet(x_prev, t, encoder_hidden_states=cond).sample
                target_pred = c_skip * x_prev + c_out * predicted_x0(target_noise, t, x_prev, alphas_cumprod)

            # 6. Pseudo-Huber loss, the student's step, the target's EMA.
            loss = torch.mean(torch.sqrt((model_pred - target_pred) ** 2 + huber_c**2) - huber_c)
            optimizer_step(opt, loss, params)
            with torch.no_grad():
                torch._foreach_lerp_(target_params, [p.detach() for p in params], 1 - ema_decay)
            running.append(loss.item())
            if (step + 1) % 50 == 0 or step + 1 == steps:
                log(json.dumps({"step": step + 1, "loss": round(float(np.mean(running)), 5),
                                "s": round(time.time() - t0, 1)}))
                running = []
            if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
                snapshot(step + 1, Adapter(lora=lora.to_lora_modules(student)))
        # What ships is the student (diffusers' LoRA script saves the student; its EMA target lags).
        return Adapter(lora=lora.to_lora_modules(student))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--w-min", type=float, default=2.0)
    ap.add_argument("--w-max", type=float, default=4.0)
    ap.add_argument("--dataset-size", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    ap.add_argument("--init", help="an LCM-LoRA file to continue from (a longer run in parts)")
    ap.add_argument("--snapshot-every", type=int, default=0, help="also write <out>-step<N>.safetensors every N steps")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    init = parse_adapter(Path(args.init).read_bytes()) if args.init else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(path: Path, adapter: Adapter) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(export_diffusers_lora(adapter))
        tmp.replace(path)

    adapter = distill(Path(args.model), args.steps, args.batch, args.lr, args.rank, args.w_min, args.w_max,
                      args.dataset_size, args.seed, schedule=args.schedule, init=init, snapshot_every=args.snapshot_every,
                      snapshot=lambda step, a: write(out.with_name(f"{out.stem}-step{step}{out.suffix}"), a))
    write(out, adapter)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads", "model")}
    if args.init:  # the run this one continued
        settings["init"] = {"file": Path(args.init).name,
                            **json.loads(Path(args.init).with_suffix(".json").read_text())}
    out.with_suffix(".json").write_text(json.dumps({"recipe": "latent consistency distillation (LoRA)", **settings},
                                                   indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
