"""Custom Diffusion: update only the cross-attention key and value projections, plus a new modifier
token (Kumari et al., "Multi-Concept Customization of Text-to-Image Diffusion", CVPR 2023;
diffusers' examples/custom_diffusion/train_custom_diffusion.py). docs/personalize/custom_diffusion.md
says what we chose and why.

    a few photos of the subject, "a <token> <class_word>"  ->  LoRA on attn2.to_k / attn2.to_v
                                                              + the token's vector

K and V are the only weights that read the text, so changing them (and the word that feeds them)
binds the concept to the prompt while the image pathways stay the base model's. The paper updates
K/V in full; we learn them as low-rank updates so one adapter is small and the adapter bank serves
it like any other. The token starts from a rare word's embedding, as the reference does ("ktn").

Data, as in the paper when `augment` is on: each photo is also shown rescaled: shrunk onto a blank
canvas (prompt "a far away" / "very small" when under 0.6x) or enlarged and cropped ("zoomed in" /
"close up"), and the loss counts only the latent cells that hold the image, not the padding. With
prior preservation (prior_loss_weight > 0) the base model's own "a <class_word>" images regularise, as DreamBooth's do
(the paper retrieves real images of the class; none can be downloaded here).

On SDXL (no published Custom Diffusion recipe; diffusers' script is SD 1.x/2.x only) the same: K/V
of every attn2 read the 2048-wide concatenation of both text encoders' states, the token has a
vector in each encoder (common.token_init), and each view is conditioned on its photo's original
size and crop (`time_ids`; an enlarged view's crop offset grows with it, a shrunk one keeps its
photo's: SDXL's conditioning has no term for a photo pasted small on a canvas).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from service.adapters import Adapter

from . import lora
from .common import (
    FrozenBase,
    Posteriors,
    TrainingRun,
    adamw,
    batch_indices,
    crop_time_ids,
    denoising_loss,
    encode_text,
    step_generator,
    to_pixels,
    token_init,
    with_time_ids,
)
from .spec import NoProgress, Progress, TrainingSpec

# A new placeholder word ("<sks>") is learned with K/V. Defaults: service/profiles.py.
LEARNS_TOKEN = True
KV_TARGETS = ("attn2.to_k", "attn2.to_v")
INITIALIZER_WORD = "ktn"  # the reference implementation's rare initializer token
# The scale augmentation is the paper's, but off by default: its prompt words ("far away", "zoomed
# in", ...) mean nothing to the world model's text encoder, and with it on the held-out concepts'
# colour was not learned at all (docs/personalize/custom_diffusion.md). On SD checkpoints, turn it on.
AUGMENT = False


def train(base: FrozenBase, spec: TrainingSpec, progress: Progress = NoProgress(), resume: bytes | None = None) -> Adapter:
    # 1. Data: each photo at several scales with the mask of where the image is, encoded once.
    views = scale_augmented(spec.images, base.size, base.engine.vae_scale_factor,
                            per_image=spec.extra.get("augmentations", 8), seed=spec.seed,
                            enabled=spec.extra.get("augment", AUGMENT))
    subject = Posteriors.of_pixels(base, views.pixels, views.time_ids)
    prompts = [_prompt(spec, modifier) for modifier in views.modifiers]
    prior = base.class_images(spec.class_word, spec.num_class_images, spec.seed) if spec.prior_loss_weight > 0 else None
    class_prompt = f"a {spec.class_word}"

    # 2. Trainable: low-rank K/V updates of every cross-attention layer, and the token's vector.
    with lora.lora_layers(base.unet, "unet", KV_TARGETS, spec.rank, spec.seed) as layers:
        vector = nn.Parameter(token_init(base, spec.extra.get("initializer_word") or INITIALIZER_WORD))
        params = lora.parameters(layers) | {"token": vector}
        run = TrainingRun(spec, progress, params, adamw(list(params.values()), spec.learning_rate), resume)

        # 3. The loop.
        for step in run.steps():
            g = step_generator(spec.seed, step)
            index = batch_indices(len(subject), spec.batch_size, g)
            latents, masks, time_ids = subject.sample(index, g), views.masks[index], subject.time_ids[index]
            texts = [prompts[i] for i in index.tolist()]
            n = latents.shape[0]
            if prior is not None:
                prior_index = batch_indices(len(prior), n, g)
                latents = torch.cat([latents, prior.sample(prior_index, g)])
                masks = torch.cat([masks, torch.ones_like(masks)])
                time_ids = torch.cat([time_ids, prior.time_ids[prior_index]])
                texts += [class_prompt] * n
            noisy, t, target = base.schedule.noise(latents, g)
            embeds = encode_text(base, texts, {spec.token: vector}).to(base.engine.dtype)
            embeds = with_time_ids(base, embeds, time_ids)
            pred = base.unet(noisy, t, encoder_hidden_states=embeds).sample
            losses = denoising_loss(pred, target, masks.to(pred.device)) * base.schedule.weight(t)
            loss = losses[:n].mean()
            if prior is not None:
                loss = loss + spec.prior_loss_weight * losses[n:].mean()
            run.update(loss)

        # 4. The adapter: K/V updates and the token.
        return Adapter(lora=lora.to_lora_modules(layers), token_embeddings={spec.token: vector.detach().cpu().clone()})


def _prompt(spec: TrainingSpec, modifier: str) -> str:
    return f"a {modifier} {spec.token} {spec.class_word}" if modifier else spec.prompt


class ScaledViews:
    def __init__(self, pixels: torch.Tensor, masks: torch.Tensor, modifiers: list[str], time_ids: torch.Tensor):
        self.pixels = pixels  # [M, 3, size, size]
        self.masks = masks  # [M, 1, size / f, size / f]: 1 where the latent cell holds image
        self.modifiers = modifiers  # the words the prompt gains for each view ("" for none)
        self.time_ids = time_ids  # [M, 6]: each view's size and crop conditioning (SDXL)


def scale_augmented(
    images: list[Image.Image], size: int, factor: int, per_image: int, seed: int, enabled: bool = True
) -> ScaledViews:
    """Each photo as is, plus `per_image - 1` rescaled views (the reference's random scale: 2/3 of
    the time shrunk to size/3..size and pasted at a random place on a blank canvas, else enlarged to
    1.2..1.4 x size and randomly cropped back), with their loss masks and prompt words."""
    base_pixels = to_pixels(images, size)
    base_ids = crop_time_ids(images, size)
    cells = size // factor
    rng = np.random.default_rng(seed)
    pixels, masks, modifiers, time_ids = [], [], [], []
    for image, ids in zip(base_pixels, base_ids):
        pixels.append(image)
        masks.append(torch.ones(1, cells, cells))
        modifiers.append("")
        time_ids.append(ids)
        for _ in range(per_image - 1 if enabled else 0):
            if rng.uniform() < 0.66:
                scale = int(rng.integers(size // 3, size + 1))
            else:
                scale = int(rng.integers(int(1.2 * size), int(1.4 * size)))
            scale += scale % 2
            resized = torch.nn.functional.interpolate(image[None], size=(scale, scale), mode="bicubic",
                                                      align_corners=False, antialias=True)[0].clamp(-1, 1)
            mask = torch.zeros(1, cells, cells)
            view_ids = ids.clone()
            if scale > size:
                top, left = (int(v) for v in rng.integers(0, scale - size + 1, 2))
                view = resized[:, top : top + size, left : left + size]
                mask[:] = 1.0
                modifier = str(rng.choice(["zoomed in", "close up"]))
                # The photo resized scale/size times larger, cropped at (top, left) of that.
                view_ids[2:4] = torch.round(ids[2:4] * scale / size) + torch.tensor([top, left])
            else:
                top, left = (int(v) for v in rng.integers(0, size - scale + 1, 2))
                view = torch.zeros(3, size, size)  # blank (mid-grey) canvas
                view[:, top : top + scale, left : left + scale] = resized
                # The cells wholly inside the pasted image (one cell in from each edge, as the reference).
                mask[:, top // factor + 1 : (top + scale) // factor - 1, left // factor + 1 : (left + scale) // factor - 1] = 1.0
                modifier = str(rng.choice(["far away", "very small"])) if scale < 0.6 * size else ""
            pixels.append(view)
            masks.append(mask)
            modifiers.append(modifier)
            time_ids.append(view_ids)
    return ScaledViews(torch.stack(pixels), torch.stack(masks), modifiers, torch.stack(time_ids))
