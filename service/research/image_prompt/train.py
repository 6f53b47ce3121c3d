"""Train the embedded model's image-prompt adapter (IP-Adapter, Ye et al. 2023) on world images.

    python -m service.research.image_prompt.train                   # the shipped settings
    python -m service.research.image_prompt.train --steps 50 --out /tmp/ip   # a short run

What it trains, and what stays frozen (the base model, every weight of it):
- an image encoder of our own: a small CLIP vision transformer (transformers'
  CLIPVisionModelWithProjection, 64 px, patch 8) trained from scratch through the diffusion loss.
  IP-Adapter freezes a pretrained CLIP; none exists for this world, and the attribute classifier
  that judges fidelity (service/research/measures) must stay independent of what it judges, so the
  encoder learns here, end to end;
- the base projection (diffusers' ImageProjection: the image embedding -> 4 tokens of the UNet's
  cross-attention width);
- decoupled cross-attention: `to_k_ip` / `to_v_ip` on every cross-attention layer, initialised from
  the layer's text K/V (IP-Adapter's initialisation). The layers run through the served processor
  (service/image_prompt/attention.py) and the served packing, so what trains is what serves.

Each step, for a batch of world scenes: the target is the scene; its image prompt is 1-3 OTHER
photos of the scene's first object (same shape, colour and texture; another position, size and
background), so the adapter learns the object, not the layout. Captions are the full caption or
the caption with the first object's colour and texture taken out ("a star on a blue striped
background": the user's prompt names a class word and the photos carry the rest). IP-Adapter's
conditioning drop: text alone 5%, image alone 5% (its tokens become the unconditional ones, the
projection of a zero embedding, as guidance uses them), both 5%. The loss is the base model's
(epsilon MSE). Seeded: the batch at step s depends only on (seed, s).

Out (the published IP-Adapter layout, so serving loads it like any IP-Adapter file):
`<out>/ip-adapter_steerserve-world-v1.safetensors` (`image_proj.*`, `ip_adapter.{1,3,..}.to_{k,v}_ip.weight`)
and `<out>/image_encoder/` (config.json + model.safetensors, as IP-Adapter repositories ship it).
The training distribution is the base model's: no held-out shape or colour/texture combination is
ever shown, so the held-out concepts the tables report on are new to the adapter too.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.models.embeddings import ImageProjection
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from service.image_prompt.attention import ImagePromptAttnProcessor
from service.image_prompt.files import cross_attention_layers
from service.image_prompt.packing import ImagePromptLayout
from service.image_prompt.served import MAX_IMAGES
from service.personalize.common import optimizer_step
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.basemodel.train import images_to_tensor
from service.research.image_prompt import FILE_NAME, WEIGHTS, unet_digest
from service.research.world.generator import BACKGROUNDS, COLOR_NAMES, Scene, place_objects, render, rng_for, sample_scene

TOKENS = 4  # per photo (the base projection's)
REFERENCES = 3  # photos of the object rendered per training scene (1-3 are used per step)
IP_STREAM = 11  # a world stream of its own: none of the base model's, LCM's or the tests' images
# CLIPImageProcessor's normalization (what serving's encoder.py applies to the photos).
CLIP_MEAN = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
CLIP_STD = torch.tensor(OPENAI_CLIP_STD)[:, None, None]


def encoder_config(image_size: int = 64) -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=96, intermediate_size=384,
                            num_hidden_layers=4, num_attention_heads=4, projection_dim=128)


def clip_pixels(samples) -> torch.Tensor:
    """CLIPImageProcessor's result at 64 px for 64-px images (no resize or crop): [0,1], mean/std."""
    x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


def references(scene: Scene, rng: np.random.Generator, n: int):
    """n photos of the scene's first object alone, placed and sized anew on other backgrounds."""
    obj = scene.objects[0]
    out = []
    for _ in range(n):
        (cx, cy, r), = place_objects(rng, 1)
        bg_color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        while bg_color == obj.color:
            bg_color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        out.append(render(Scene(background, bg_color, (replace(obj, cx=cx, cy=cy, r=r),)), 64))
    return out


def world_dataset(pipe, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Target latents, both captions' text states, and REFERENCES photos' pixels per scene."""
    latents, full, short, pixels = [], [], [], []
    with torch.no_grad():
        for start in range(0, n, 250):
            scenes, refs = [], []
            for i in range(start, min(n, start + 250)):
                rng = rng_for(seed * 1000 + IP_STREAM, i)
                scene = sample_scene(rng)
                scenes.append(scene)
                refs += references(scene, rng, REFERENCES)
            targets = [render(s, 64) for s in scenes]
            latents.append(pipe.vae.encode(images_to_tensor(targets)).latent_dist.mode() * pipe.vae.config.scaling_factor)
            full.append(embed(pipe, [s.caption for s in scenes]))
            bare = [replace(s, objects=(replace(s.objects[0], color="", texture="solid"),) + s.objects[1:]) for s in scenes]
            short.append(embed(pipe, [s.caption for s in bare]))
            pixels.append(clip_pixels(refs).view(len(scenes), REFERENCES, 3, 64, 64))
    return {"latents": torch.cat(latents), "full": torch.cat(full), "short": torch.cat(short),
            "pixels": torch.cat(pixels), "uncond": embed(pipe, [""])[0]}


def embed(pipe, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


class ImagePromptAdapter(torch.nn.Module):
    """The trainable parts: encoder, projection, and each cross-attention layer's K/V for image tokens."""

    def __init__(self, unet, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        width = unet.config.cross_attention_dim
        self.encoder = CLIPVisionModelWithProjection(encoder_config())
        self.projection = ImageProjection(image_embed_dim=self.encoder.config.projection_dim,
                                          cross_attention_dim=width, num_image_text_embeds=TOKENS)
        self.layout = ImagePromptLayout(text_tokens=77, max_tokens=TOKENS * MAX_IMAGES)
        modules = dict(unet.named_modules())
        self.names = cross_attention_layers(unet)  # published key -> attn2 name
        self.kv = torch.nn.ModuleDict()
        for key, name in self.names.items():
            attn = modules[name]
            to_k = torch.nn.Linear(width, attn.to_k.out_features, bias=False)
            to_v = torch.nn.Linear(width, attn.to_v.out_features, bias=False)
            with torch.no_grad():
                to_k.weight.copy_(attn.to_k.weight)
                to_v.weight.copy_(attn.to_v.weight)
            self.kv[str(key)] = torch.nn.ModuleList([to_k, to_v])
            attn.set_processor(ImagePromptAttnProcessor(to_k, to_v, self.layout))

    def tokens(self, pixels: torch.Tensor, count: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """[B, N, D] image tokens of pixels [B, R, 3, H, W] (the first `count` photos of each row),
        the unconditional tokens (projection of a zero embedding) on rows where `drop`."""
        b, r = pixels.shape[:2]
        embeds = self.encoder(pixel_values=pixels.flatten(0, 1)).image_embeds.view(b, r, -1)
        embeds = torch.where(drop[:, None, None], torch.zeros_like(embeds), embeds)
        tokens = self.projection(embeds.flatten(0, 1)).view(b, r * TOKENS, -1)
        valid = torch.arange(r * TOKENS)[None, :] < (count * TOKENS)[:, None]
        tokens = tokens * valid[..., None]
        return F.pad(tokens, (0, 0, 0, self.layout.max_tokens - r * TOKENS))

    def published(self) -> dict[str, torch.Tensor]:
        """The published layout: image_proj.{proj,norm}.*, ip_adapter.{k}.to_{k,v}_ip.weight."""
        state = {}
        for k, v in self.projection.state_dict().items():
            state["image_proj." + k.replace("image_embeds.", "proj.")] = v.detach().clone().contiguous()
        for key, (to_k, to_v) in self.kv.items():
            state[f"ip_adapter.{key}.to_k_ip.weight"] = to_k.weight.detach().clone().contiguous()
            state[f"ip_adapter.{key}.to_v_ip.weight"] = to_v.weight.detach().clone().contiguous()
        return state


def train(model_dir: Path, steps: int, batch: int, lr: float, dataset_size: int, seed: int,
          p_drop: float = 0.05, log=print) -> ImagePromptAdapter:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    t0 = time.time()
    data = world_dataset(pipe, dataset_size, seed)
    log(json.dumps({"dataset": dataset_size, "s": round(time.time() - t0, 1)}))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    adapter = ImagePromptAdapter(pipe.unet, seed)
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    t0, running = time.time(), []
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(data["latents"]), (batch,), generator=g)
        x0 = data["latents"][idx]
        short_caption = torch.rand(batch, generator=g) < 0.5
        text = torch.where(short_caption[:, None, None], data["short"][idx], data["full"][idx])
        mode = torch.rand(batch, generator=g)  # < p: text dropped; < 2p: image dropped; < 3p: both
        drop_text = (mode < p_drop) | ((mode >= 2 * p_drop) & (mode < 3 * p_drop))
        drop_image = (mode >= p_drop) & (mode < 3 * p_drop)
        text = torch.where(drop_text[:, None, None], data["uncond"].expand_as(text), text)
        count = torch.randint(1, REFERENCES + 1, (batch,), generator=g)

        tokens = adapter.tokens(data["pixels"][idx], count, drop_image)
        states = adapter.layout.pack(text, tokens, scale=torch.ones(batch), count=(count * TOKENS).float())
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        pred = pipe.unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred, noise)
        optimizer_step(opt, loss, params)
        running.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(json.dumps({"step": step + 1, "loss": round(float(np.mean(running)), 5), "s": round(time.time() - t0, 1)}))
            running = []
    return adapter


def write(adapter: ImagePromptAdapter, out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (FILE_NAME + ".tmp")
    save_file(adapter.published(), tmp)
    tmp.replace(out / FILE_NAME)
    adapter.encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    (out / "training.json").write_text(json.dumps({"recipe": "IP-Adapter (base projection), encoder trained end to end",
                                                   **settings}, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--dataset-size", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = train(Path(args.model), args.steps, args.batch, args.lr, args.dataset_size, args.seed)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads", "model")}
    # The UNet it was trained on: serving uses the shipped weights only for that model (shipped_for).
    write(adapter, Path(args.out), {**settings, "base_unet_sha256": unet_digest(args.model)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
