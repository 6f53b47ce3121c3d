"""FineStyle: a style from ONE image, without its content (Zhang, Sohn, Hahn, Shi, Essa, "FineStyle:
Fine-grained Controllable Style Personalization for Text-to-image Models", NeurIPS 2024), brought
from Muse to the Stable Diffusion architecture. docs/personalize/finestyle.md says what the paper
says, what we chose where it is silent, and why.

    one style image, its concepts ("a yellow star", "a pink circle"), "in zwx style"
        -> concept-oriented data scaling: many (crop, "<phrase> <style_phrase>") pairs
        -> LoRA on attn2.to_k / attn2.to_v only, marked as a style adapter

A plain style adapter trained on one picture with one caption also learns the picture's objects,
and they turn up in outputs that never asked for them (content leakage). FineStyle's answer is in
the data: every concept of the image gets pairs of its own, a crop around it captioned with its own
phrase, so the concept's appearance is bound to the concept's words while only what every pair
shares (background, rendering) is left for the style phrase. Only the key and value projections of
cross-attention learn: they are the layers that read the text, so the adapter changes what words
mean to the image, not how the image is drawn from itself.

At sampling, `service.engine.sampling.style_guidance` separates the style's pull from the
prompt's: two scales, three predictions per step.

On SDXL the same K/V adapters (attn2 reads both text encoders' states, 2048 wide), and every pair
is conditioned on where it was cut from (`time_ids`: the style image's original size, the crop's
top-left in the image resized so the crop is the training size, the training size), as SDXL was
trained on crops: a concept crop is, to SDXL, a crop of a larger picture, and a sample drawn with
SDXL's uncropped (0, 0) asks for a whole picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.adapters import DEFAULT_UNET_TARGETS, Adapter

from . import lora
from .attention_maps import concept_regions, cross_attention_maps
from .common import (
    FrozenBase,
    Posteriors,
    TrainingRun,
    adamw,
    centre_crop,
    denoising_loss,
    encode_text,
    step_generator,
    to_pixels,
    with_time_ids,
)
from .spec import Concept, NoProgress, Progress, TrainingSpec

# A style is invoked by its phrase, not a learned word. Defaults: service/profiles.py.
LEARNS_TOKEN = False
KV_TARGETS = ("attn2.to_k", "attn2.to_v")
ALL_ATTENTION_TARGETS = DEFAULT_UNET_TARGETS  # the plain style LoRA baseline's wider variant

# Concept-oriented data scaling (docs/personalize/finestyle.md has the measurements).
CROPS_PER_CONCEPT = 8  # crops around each concept, captioned with its phrase + the style phrase
BACKGROUND_CROPS = 4  # crops of the background, captioned with the style phrase alone
# A crop's side, in multiples of the concept box's longer side. 2-3x, not the tighter 1.2-2x first
# chosen: on the dev styles the tight crops drew the concepts big and alone, and prompts then asking
# for other objects got them less (prompt -14 points [-27, -2]) and the style's objects more
# (bench/results/quality_finestyle_dev.md, ablation "narrow crops").
CROP_MARGIN = (2.0, 3.0)
# A background crop may cover at most this share of concept regions; those cells are masked out.
BACKGROUND_MAX_OVERLAP = 0.5

# Sampling: the style scale (l1 of `service.engine.sampling.style_guidance`) the job previews use
# and the docs recommend, measured in the scale sweep (docs/personalize/finestyle.md).
STYLE_GUIDANCE_SCALE = 2.0


@dataclass
class Pairs:
    """The training pairs of one style image, at the training resolution."""

    pixels: torch.Tensor  # [M, 3, size, size] in [-1, 1]
    # [M, 1, size, size]: 1 where the pair's loss counts. A concept crop masks out the other
    # concepts' regions in it, a background crop every concept's: no caption is asked to explain
    # an object it does not name.
    masks: torch.Tensor
    captions: list[str]
    boxes: list[tuple[int, int, int, int]]  # the region of the training image each pair was cut from
    kinds: list[str]  # "concept", "background" or "whole"
    concept_boxes: list[tuple[int, int, int, int] | None]  # each concept's region (given or located)
    # [M, 6]: each pair's size and crop conditioning (SDXL's time_ids; `box_time_ids`)
    time_ids: torch.Tensor | None = None


def train(base: FrozenBase, spec: TrainingSpec, progress: Progress = NoProgress(), resume: bytes | None = None) -> Adapter:
    # 1. Data: the one style image scaled into many concept-focused pairs, encoded once.
    pairs = build_pairs(
        base, spec.images[0], spec.concepts, spec.style_phrase, seed=spec.seed,
        data_scaling=spec.extra.get("data_scaling", True),
        crops_per_concept=spec.extra.get("crops_per_concept", CROPS_PER_CONCEPT),
        background_crops=spec.extra.get("background_crops", BACKGROUND_CROPS),
        crop_margin=tuple(spec.extra.get("crop_margin", CROP_MARGIN)),
        concept_phrases=spec.extra.get("concept_phrases", True),
    )
    latents = Posteriors.of_pixels(base, pairs.pixels, pairs.time_ids)
    cells = latents.mean.shape[-1]
    # A latent cell counts only if all of its pixels do.
    masks = -torch.nn.functional.adaptive_max_pool2d(-pairs.masks, cells)
    with torch.no_grad():  # the text encoder is frozen: the captions' embeddings are fixed
        text = with_time_ids(base, encode_text(base, pairs.captions).to(base.engine.dtype), latents.time_ids)
    # The whole image weighs as much as one concept's set of crops: it is the one pair that shows
    # the concepts in their places in the style, and with data scaling off it is every pair.
    cut = sum(r is not None for r in pairs.concept_boxes)
    whole_weight = max(1.0, pairs.kinds.count("concept") / max(1, cut))
    weights = torch.tensor([whole_weight if k == "whole" else 1.0 for k in pairs.kinds])

    # 2. Trainable: low-rank updates of the cross-attention keys and values (the layers that read text).
    targets = tuple(spec.extra.get("targets", KV_TARGETS))
    use_masks = spec.extra.get("masks", True)
    with lora.lora_layers(base.unet, "unet", targets, spec.rank, spec.seed) as layers:
        params = lora.parameters(layers)
        run = TrainingRun(spec, progress, params, adamw(list(params.values()), spec.learning_rate), resume)

        # 3. The loop: the ordinary denoising loss on a weighted draw of pairs.
        for step in run.steps():
            g = step_generator(spec.seed, step)
            index = torch.multinomial(weights, spec.batch_size, replacement=True, generator=g)
            noisy, t, target = base.schedule.noise(latents.sample(index, g), g)
            pred = base.unet(noisy, t, encoder_hidden_states=text[index]).sample
            losses = denoising_loss(pred, target, masks[index].to(pred.device) if use_masks else None)
            run.update((losses * base.schedule.weight(t)).mean())

        # 4. The adapter: K/V updates, marked as a style adapter.
        return Adapter(lora=lora.to_lora_modules(layers), kind="style")


def whole_caption(concepts: list[Concept], style_phrase: str) -> str:
    """The style image's own caption: its concepts' phrases, then the style phrase."""
    return " ".join([" and ".join(c.phrase for c in concepts), style_phrase]).strip()


def build_pairs(
    base: FrozenBase,
    image,
    concepts: list[Concept],
    style_phrase: str,
    seed: int = 0,
    data_scaling: bool = True,
    crops_per_concept: int = CROPS_PER_CONCEPT,
    background_crops: int = BACKGROUND_CROPS,
    crop_margin: tuple[float, float] = CROP_MARGIN,
    concept_phrases: bool = True,
) -> Pairs:
    """Concept-oriented data scaling of one style image.

    Each concept's region is its given box (mapped to the training image) or, without one, the
    box of its phrase's thresholded cross-attention map on the noised image (attention_maps.py).
    Around it, `crops_per_concept` square crops, each side a random CROP_MARGIN multiple of the
    region's longer side, placed at random so that the region is inside (as far as the image
    allows), resized to the training size and captioned "<phrase> <style_phrase>", with the other
    concepts' regions masked out of their loss. Then background crops captioned with the style
    phrase alone, every concept region masked out (the background and rendering, with nothing to
    leak), and the whole image with the whole caption. Without data scaling: the whole image alone
    (the plain style LoRA's data). `concept_phrases` off (an ablation): concept crops are captioned
    with the style phrase alone, like background crops.
    """
    size = base.size
    whole = to_pixels([image], size)[0]
    caption = whole_caption(concepts, style_phrase)
    pixels, masks, captions, boxes, kinds = [whole], [torch.ones(1, size, size)], [caption], [(0, 0, size, size)], ["whole"]
    regions = [map_box(c.box, image.size, size) if c.box is not None else None for c in concepts]
    missing = [i for i, r in enumerate(regions) if r is None]
    if data_scaling and missing:
        maps = cross_attention_maps(base, image, caption, [concepts[i].phrase for i in missing], seed=seed)
        for i, box in zip(missing, concept_regions(maps)):
            regions[i] = box

    def done() -> Pairs:
        ids = torch.stack([box_time_ids(image.size, box, size) for box in boxes])
        return Pairs(torch.stack(pixels), torch.stack(masks), captions, boxes, kinds, regions, ids)

    if not data_scaling:
        return done()

    def add(box, text, kind, hidden, keep=None):
        pixels.append(resized_crop(whole, box, size))
        masks.append(crop_mask(box, hidden, size, keep))
        captions.append(text)
        boxes.append(box)
        kinds.append(kind)

    rng = np.random.default_rng(seed)
    located = [r for r in regions if r is not None]
    for concept, region in zip(concepts, regions):
        if region is None:  # its phrase attends nowhere in particular: no crop can be centred on it
            continue
        others = [r for r in located if r is not region]
        for _ in range(crops_per_concept):
            caption = f"{concept.phrase} {style_phrase}".strip() if concept_phrases else style_phrase
            add(crop_around(region, size, rng, crop_margin), caption, "concept", others, region)
    for box in background_boxes(located, size, background_crops, rng):
        add(box, style_phrase, "background", located)
    return done()


def box_time_ids(image_size: tuple[int, int], box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """[6] SDXL time ids of a square crop `box` of the training image (`to_pixels`' centre crop of an
    image of (w, h) pixels), resized to `size`: the same pixels are the original image resized so the
    crop is size wide, cropped at the box's top-left there. (original h, w, top, left, size, size);
    the whole training image gives what `common.crop_time_ids` does."""
    w, h = image_size
    _, _, left, top = centre_crop(image_size, size)
    x0, y0, x1, _ = box
    scale = size / (x1 - x0)
    return torch.tensor([h, w, round((top + y0) * scale), round((left + x0) * scale), size, size], dtype=torch.float32)


def crop_mask(box, hidden, size: int, keep=None) -> torch.Tensor:
    """[1, size, size] of a crop resized to `size`: 0 over the parts of the `hidden` regions in it,
    except inside `keep` (a concept's own region stays counted where another's box overlaps it)."""
    x0, y0, x1, y1 = box
    sx, sy = size / (x1 - x0), size / (y1 - y0)

    def cells(region):
        rx0, ry0, rx1, ry1 = region
        cx0, cy0 = max(0, int(np.floor((rx0 - x0) * sx))), max(0, int(np.floor((ry0 - y0) * sy)))
        cx1, cy1 = min(size, int(np.ceil((rx1 - x0) * sx))), min(size, int(np.ceil((ry1 - y0) * sy)))
        return slice(cy0, max(cy0, cy1)), slice(cx0, max(cx0, cx1))

    mask = torch.ones(1, size, size)
    for region in hidden:
        mask[(slice(None), *cells(region))] = 0.0
    if keep is not None:
        mask[(slice(None), *cells(keep))] = 1.0
    return mask


MIN_REGION = 2  # pixels (at the training size) a mapped box must keep on each side


def map_box(box, image_size: tuple[int, int], size: int) -> tuple[int, int, int, int] | None:
    """A box in the caller's image pixels -> the training image's (resized, centre-cropped as
    `to_pixels` does), clipped to it; None when too little of it is left in the crop (the concept
    is then located by cross-attention, as if no box was given)."""
    w, h = image_size
    scale = size / min(w, h)
    _, _, left, top = centre_crop(image_size, size)
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    x0, x1 = (int(v) for v in np.clip([x0 - left, x1 - left], 0, size))
    y0, y1 = (int(v) for v in np.clip([y0 - top, y1 - top], 0, size))
    if x1 - x0 < MIN_REGION or y1 - y0 < MIN_REGION:
        return None
    return x0, y0, x1, y1


def crop_around(
    region: tuple[int, int, int, int], size: int, rng: np.random.Generator, margin: tuple[float, float] = CROP_MARGIN
) -> tuple[int, int, int, int]:
    """A random square crop holding `region`, its side `margin` (a range) x the region's longer side."""
    x0, y0, x1, y1 = region
    longest = max(x1 - x0, y1 - y0)
    # At least a quarter of the image: a tiny region is not blown up from a few pixels.
    side = int(np.clip(round(longest * rng.uniform(*margin)), min(max(longest, size // 4), size), size))
    # Left edge such that the region is inside: between x1 - side and x0, within the image.
    lo_x, hi_x = max(0, x1 - side), min(x0, size - side)
    lo_y, hi_y = max(0, y1 - side), min(y0, size - side)
    left = int(rng.integers(min(lo_x, hi_x), max(lo_x, hi_x) + 1))
    top = int(rng.integers(min(lo_y, hi_y), max(lo_y, hi_y) + 1))
    return left, top, left + side, top + side


def background_boxes(regions, size: int, count: int, rng: np.random.Generator, tries: int = 400):
    """Up to `count` square crops (a third to a half of the image side) of which concept regions
    cover at most BACKGROUND_MAX_OVERLAP (their cells are masked out of the loss)."""
    out = []
    for _ in range(tries):
        if len(out) == count:
            break
        side = int(rng.integers(size // 3, size // 2 + 1))
        left, top = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = (left, top, left + side, top + side)
        covered = 1.0 - crop_mask(box, regions, size).mean().item()
        if covered <= BACKGROUND_MAX_OVERLAP:
            out.append(box)
    return out


def resized_crop(pixels: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    x0, y0, x1, y1 = box
    crop = pixels[:, y0:y1, x0:x1][None]
    return torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False,
                                           antialias=True)[0].clamp(-1, 1)
