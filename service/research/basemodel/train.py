"""Train steerserve-world-v1, the embedded default model, on the synthetic world.

    python -m service.research.basemodel.train                       # both stages, shipped settings
    python -m service.research.basemodel.train --stage unet --unet-steps 20000   # resume from var/basemodel, longer
    python -m service.research.basemodel.train --stage unet --init-from service/research/basemodel/weights/steerserve-world-v1
                                                            # fresh checkout: continue from the shipped model

Stage 1 trains the AutoencoderKL on freshly generated world images (L1 + MSE reconstruction, a tiny
KL term as in SD). Stage 2 encodes a fixed set of world images once (latents are cheap to reuse),
then trains the UNet and the CLIP text encoder together with the SD epsilon objective, min-SNR(5)
loss weighting with a boost for the low-SNR steps (up to 20x; docs/world.md says why), latent cells on and around objects weighted 3x (shapes are a small part of each
image), 10% caption dropout to "" (so classifier-free guidance works) and an EMA of the weights,
which is what gets exported. `--init-from` may name a model whose UNet lacks attention blocks that
config.py now has (load_grown_unet): they start as the identity and train from there.

Everything is seeded: the batch at step s depends only on (seed, s), so a run resumed from a
checkpoint continues exactly as an uninterrupted one would. Checkpoints and logs live in --workdir
(default var/basemodel, ignored by git); each checkpoint also exports the EMA pipeline to --out, so a
partial run always leaves a usable model behind. Settings of the shipped weights: docs/world.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from service.engine.tokenizer import build_clip_tokenizer
from service.personalize.common import optimizer_step
from service.research.world.generator import generate_batch

from . import DEFAULT_MODEL_DIR
from .config import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG

# World streams: different seeds so the VAE, the UNet data and evaluation never share images.
VAE_STREAM, UNET_STREAM = 1, 2


def log(workdir: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(workdir / "train_log.jsonl", "a") as f:
        f.write(line + "\n")


def images_to_tensor(samples) -> torch.Tensor:
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Stage 1: VAE


def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def train_vae(args, workdir: Path) -> AutoencoderKL:
    ckpt_path = workdir / "vae.pt"
    vae = build_vae(args.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    vae.train()
    t0 = time.time()
    while step < args.vae_steps:
        x = images_to_tensor(generate_batch(args.seed * 1000 + VAE_STREAM, step * args.vae_batch, args.vae_batch))
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        if args.vae_crop:
            # The VAE is convolutional: random crops teach it the same local painting at a
            # fraction of the cost (32x32 crops: a quarter of the pixels).
            top, left = torch.randint(0, x.shape[-1] - args.vae_crop + 1, (2,), generator=g).tolist()
            x = x[..., top : top + args.vae_crop, left : left + args.vae_crop]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=100)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + args.vae_kl * kl
        optimizer_step(opt, loss, vae.parameters())
        step += 1
        if step % 50 == 0 or step == args.vae_steps:
            psnr = -10 * math.log10(F.mse_loss(recon.detach().clamp(-1, 1), x).item() / 4 + 1e-12)
            log(workdir, dict(stage="vae", step=step, loss=round(loss.item(), 5), psnr=round(psnr, 2), s=round(time.time() - t0, 1)))
        if step % args.ckpt_every_vae == 0 or step == args.vae_steps:
            save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)
    vae.eval()
    # SD scales latents to unit variance before diffusion; measure ours on fresh images.
    with torch.no_grad():
        x = images_to_tensor(generate_batch(args.seed * 1000 + VAE_STREAM, 10_000_000, 512))
        std = vae.encode(x).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


# ---------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder


def build_unet_and_text(seed: int) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return unet, text_encoder


def object_regions(samples, latent_size: int) -> torch.Tensor:
    """Where the objects are, at latent resolution: the union of the masks, max-pooled to the latent
    grid and grown by one cell so the band just outside the outline (what tells a star from a
    circle) counts as object too. [N, 1, h, w] in {0, 1}."""
    masks = torch.from_numpy(np.stack([s.masks.any(axis=0) for s in samples])).float()[:, None]
    cells = F.adaptive_max_pool2d(masks, latent_size)
    return F.max_pool2d(cells, 3, stride=1, padding=1)


def encode_dataset(vae: AutoencoderKL, tokenizer, n: int, seed: int, workdir: Path) -> dict:
    """Latents (scaled), object regions and token ids of n world images; cached in workdir, keyed by
    n and seed."""
    path = workdir / f"latents_n{n}_seed{seed}_regions.pt"
    if path.exists():
        return torch.load(path)
    latents, regions, captions = [], [], []
    with torch.no_grad():
        for start in range(0, n, 500):
            samples = generate_batch(seed * 1000 + UNET_STREAM, start, min(500, n - start))
            z = vae.encode(images_to_tensor(samples)).latent_dist.mode() * vae.config.scaling_factor
            latents.append(z)
            regions.append(object_regions(samples, z.shape[-1]).to(torch.uint8))
            captions += [s.caption for s in samples]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    data = {"latents": torch.cat(latents), "regions": torch.cat(regions), "ids": ids}
    save_atomic(data, path)
    return data


def export_pipeline(vae, unet, text_encoder, tokenizer, out_dir: Path, objective: dict | None = None) -> None:
    """Save a diffusers folder, fp16 on disk (loads back as fp32); replaced atomically. `objective`
    (the loss weighting the UNet was trained with) goes to training_objective.json, which the
    personalization trainers read so that fine-tuning keeps the base model's own objective."""
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(),
        text_encoder=copy.deepcopy(text_encoder).half(),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # The weights are stored in fp16 to stay small; the configs declare fp32 so that loading without
    # a torch_dtype gives the fp32 model the CPU engine runs (transformers would otherwise honour it).
    te_cfg = tmp / "text_encoder" / "config.json"
    cfg = json.loads(te_cfg.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    te_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if objective:
        (tmp / "training_objective.json").write_text(json.dumps(objective, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def load_grown_unet(unet: UNet2DConditionModel, old: UNet2DConditionModel) -> None:
    """Load `old` into `unet`, which may have attention blocks `old` lacks (config.py grew one).

    Every weight of `old` must land; a new attention block starts as the identity (its output
    projection zeroed; the block is residual), so the grown UNet computes exactly what `old` did
    and training goes on from there instead of from scratch.
    """
    missing, unexpected = unet.load_state_dict(old.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"--init-from UNet has weights this architecture lacks: {unexpected[:5]}")
    # "up_blocks.2.attentions.0.proj_in.weight" -> "up_blocks.2.attentions.0"
    new_blocks = {".".join(k.split(".")[:4]) for k in missing if k.split(".")[2:3] == ["attentions"]}
    outside = [k for k in missing if ".".join(k.split(".")[:4]) not in new_blocks]
    if outside:
        raise ValueError(f"--init-from UNet lacks weights outside new attention blocks: {outside[:5]}")
    for name in sorted(new_blocks):
        proj_out = unet.get_submodule(name).proj_out
        torch.nn.init.zeros_(proj_out.weight)
        torch.nn.init.zeros_(proj_out.bias)


def train_unet(args, vae: AutoencoderKL, workdir: Path) -> None:
    tokenizer = build_clip_tokenizer()
    data = encode_dataset(vae, tokenizer, args.dataset_size, args.seed, workdir)
    latents, ids = data["latents"], data["ids"]
    # Loss weight per latent cell: objects (and the band around them) count `object_weight` times
    # more. Backgrounds fill most of every image, so with a plain mean the outline that makes a
    # star a star is a sliver of the loss, and the model learned colours long before shapes.
    cell_weight = 1.0 + (args.object_weight - 1.0) * data["regions"].float()
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]

    unet, text_encoder = build_unet_and_text(args.seed)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("steps_offset", "set_alpha_to_one")})
    alphas = noise_scheduler.alphas_cumprod

    ckpt_path = workdir / "unet.pt"
    step = 0
    if args.init_from and not ckpt_path.exists():
        # Continue from an exported model (e.g. the shipped one) when its checkpoint is not at hand;
        # the optimizer and the step counter start afresh.
        src = Path(args.init_from)
        load_grown_unet(unet, UNet2DConditionModel.from_pretrained(src / "unet").float())
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(src / "text_encoder").float().state_dict())
        ema_unet.load_state_dict(unet.state_dict())
        ema_text.load_state_dict(text_encoder.state_dict())
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        step = state["step"]

    def checkpoint():
        save_atomic(
            {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
            },
            ckpt_path,
        )
        objective = {"snr_gamma": 5.0, "low_snr_boost": args.low_snr_boost if args.low_snr_boost > 1 else None}
        export_pipeline(vae, ema_unet, ema_text, tokenizer, Path(args.out), objective)
        log(workdir, dict(stage="unet", event="checkpoint", step=step, out=str(args.out)))

    unet.train()
    text_encoder.train()
    t0, running = time.time(), []
    while step < args.unet_steps:
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            break
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(latents), (args.unet_batch,), generator=g)
        x0, tok, w = latents[idx], ids[idx].clone(), cell_weight[idx]
        tok[torch.rand(args.unet_batch, generator=g) < args.caption_dropout] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.unet_batch,), generator=g)
        noisy = noise_scheduler.add_noise(x0, noise, t)

        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, warmup=args.warmup)
        pred = unet(noisy, t, text_encoder(tok)[0]).sample
        # min-SNR(5): down-weights the easy low-noise steps, which speeds up convergence.
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=5.0) / snr
        # Low-SNR boost: at SNR s the epsilon loss weighs the clean image by s, so where the noise
        # has erased the background colour and the layout (SNR < 0.1), the steps that must take
        # them from the caption barely train. Raise those steps' weight as 0.1/s, at most
        # `low_snr_boost` times.
        weight = weight * torch.clamp(0.1 / snr, min=1.0, max=args.low_snr_boost)
        per_sample = (w * F.mse_loss(pred, noise, reduction="none")).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        optimizer_step(opt, loss, params)
        step += 1
        # EMA warms up (decay grows with the step) so early exports are not dominated by noise.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        running.append(loss.item())
        if step % 50 == 0:
            log(workdir, dict(stage="unet", step=step, loss=round(sum(running) / len(running), 5), lr=opt.param_groups[0]["lr"], s=round(time.time() - t0, 1)))
            running = []
        if step % args.ckpt_every == 0:
            checkpoint()
    if step % args.ckpt_every:  # stopped between checkpoints (end of steps or --max-minutes)
        checkpoint()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("all", "vae", "unet"), default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="var/basemodel")
    p.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vae-steps", type=int, default=1800)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-crop", type=int, default=32, help="train on random crops of this size (0: whole images)")
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--ckpt-every-vae", type=int, default=200)
    p.add_argument("--dataset-size", type=int, default=20_000)
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--low-snr-boost", type=float, default=20.0, help="largest loss weight of low-SNR steps (1: plain min-SNR)")
    p.add_argument("--object-weight", type=float, default=3.0, help="loss weight of latent cells on and around objects (background: 1)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--init-from", help="with --stage unet: start from this exported model folder (VAE, UNet, text encoder)")
    p.add_argument("--max-minutes", type=float, default=0, help="stop the UNet stage (and export) after this long")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "vae"):
        vae = train_vae(args, workdir)
        vae.save_pretrained(workdir / "vae")
    else:
        vae = AutoencoderKL.from_pretrained(Path(args.init_from) / "vae" if args.init_from else workdir / "vae")
    vae.eval().requires_grad_(False)
    if args.stage in ("all", "unet"):
        train_unet(args, vae, workdir)


if __name__ == "__main__":
    main()
