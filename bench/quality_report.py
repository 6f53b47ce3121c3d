"""Quality report of the embedded default model (steerserve-world-v1).

    python -m bench.quality_report                 # the figures in docs/world.md and the README
    python -m bench.quality_report --model DIR --prompts 32

Generates one image per fixed held-in prompt (fixed seeds, DDIM, classifier-free guidance), reads
them with the attribute classifier and reports prompt alignment per attribute. The same prompts
rendered by the world generator itself are read too: that is the ceiling the classifier allows. The
VAE's reconstruction PSNR (held-in images, held-out concepts and styles) bounds any image drawn
through the model. Writes bench/results/quality_base_model.json, bench/results/quality_base_model.md and the sample
grid docs/images/base_model_samples.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw, ImageFont

from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.measures import Judge
from service.research.world.generator import render, rng_for, sample_scene
from service.research.world.heldout import CONCEPTS, STYLES
from service.research.world.vocab import SHAPES

ROOT = Path(__file__).resolve().parent.parent
PROMPT_STREAM = 4242  # a world stream no training script draws from
ATTRIBUTES = ("shape", "color", "texture", "background", "bg_color", "all")


def held_in_scenes(n: int, stream: int = PROMPT_STREAM):
    """n single-object scenes of the base distribution, shapes cycled so each is equally tested
    (another `stream`: another set of prompts, e.g. a dev set to tune on)."""
    scenes = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        scene = sample_scene(rng_for(stream, i), shapes=(shape,), p_two_objects=0.0)
        scenes.append(scene)
    return scenes


def load_pipeline(model_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], steps: int, guidance: float, batch: int = 32) -> list[np.ndarray]:
    """One image per prompt; prompt i always uses seed i, whatever the batching."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(start + j) for j in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np")
        images += [np.rint(im * 255).astype(np.uint8) for im in out.images]
    return images


@torch.no_grad()
def vae_psnr(vae, images: list[np.ndarray]) -> float:
    """Reconstruction PSNR (dB) of the VAE alone: the ceiling of anything drawn through it."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((recon - x) ** 2).mean().item() / 4  # on the [0, 1] scale
    return round(-10 * float(np.log10(mse)), 2)


def sample_grid(images, prompts, path: Path, cols: int = 7, scale: int = 3) -> None:
    """Tiles of generated images with their prompts underneath."""
    tile = images[0].shape[0] * scale
    font = ImageFont.load_default(size=11)
    text_h = 30
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, prompt) in enumerate(zip(images, prompts)):
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        grid.paste(Image.fromarray(im).resize((tile, tile), Image.NEAREST), (x, y))
        head, _, bg = prompt.partition(" on ")
        draw.text((x + 3, y + tile + 2), head, fill="black", font=font)
        draw.text((x + 3, y + tile + 15), "on " + bg.replace(" background", ""), fill="dimgray", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Prompt alignment of steerserve-world-v1 on {s['prompts']} held-in single-object prompts "
        f"(DDIM {s['steps']} steps, guidance {s['guidance']}, seeds 0..{s['prompts'] - 1}), read by the attribute classifier:",
        "",
        "| attribute | model | world renders (classifier ceiling) |",
        "|---|---|---|",
    ]
    for a in ATTRIBUTES:
        lines.append(f"| {a} | {report['model'][a]:.1%} | {report['world_renders'][a]:.1%} |")
    psnr = report["vae_psnr_db"]
    lines += [
        "",
        f"VAE reconstruction PSNR: {psnr['held_in']} dB on held-in images, {psnr['held_out_concepts']} dB on the "
        f"held-out concepts' references, {psnr['held_out_styles']} dB on the style images.",
    ]
    lines += ["", f"Reproduce: `{s['command']}` ({report['seconds']:.0f} s on {report['machine']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--prompts", type=int, default=70)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=int, default=28, help="how many samples go into the PNG grid")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--grid-path", default=str(ROOT / "docs" / "images" / "base_model_samples.png"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.time()
    scenes = held_in_scenes(args.prompts)
    prompts = [s.caption for s in scenes]
    pipe = load_pipeline(Path(args.model))
    images = generate(pipe, prompts, args.steps, args.guidance)
    judge = Judge()
    report = {
        "settings": {
            "model": Path(args.model).name,
            "prompts": args.prompts,
            "steps": args.steps,
            "guidance": args.guidance,
            "command": "python -m bench.quality_report",
        },
        "model": judge.prompt_alignment(images, prompts),
        "world_renders": judge.prompt_alignment([render(s).image for s in scenes], prompts),
        "vae_psnr_db": {
            "held_in": vae_psnr(pipe.vae, [render(s).image for s in scenes[:32]]),
            "held_out_concepts": vae_psnr(pipe.vae, [r.image for c in CONCEPTS.values() for r in c.references(n=8)]),
            "held_out_styles": vae_psnr(pipe.vae, [s.reference().image for s in STYLES.values()]),
        },
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {args.threads} CPU threads",
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality_base_model.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "quality_base_model.md").write_text(markdown(report))
    sample_grid(images[: args.grid], prompts[: args.grid], Path(args.grid_path))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
