"""Where the base model puts a phrase in an image: its cross-attention maps.

    maps = cross_attention_maps(base, image, "a yellow star and a pink circle", ["a yellow star", "a pink circle"])
    boxes = concept_regions(maps)   # per phrase (x0, y0, x1, y1) in training pixels, or None

The image is encoded, noised at a few timesteps (one fixed noise), and run once per timestep
through the frozen UNet with its prompt; every cross-attention layer (attn2) records its attention
probabilities. A phrase's map is the attention its words (articles left out) receive from each
spatial position, averaged over heads, upsampled from each layer's resolution to the image's,
normalised per layer so low- and high-resolution layers count alike, and averaged over layers and
timesteps (the aggregation of Prompt-to-Prompt and DAAM). FineStyle uses it to locate the concepts
of a style image the caller gave no box for; the editing methods use it for the subject mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image
from scipy import ndimage

from .common import FrozenBase, Posteriors, with_time_ids

ARTICLES = frozenset({"a", "an", "the", "and", "of", "on", "in"})
# Low noise levels locate objects best on the world model (mean box IoU 0.60 over 9 objects of 5
# two-object images at (50, 150, 300) with threshold 0.6, against 0.46 at (200, 400, 600) and 0.5).
DEFAULT_TIMESTEPS = (50, 150, 300)
DEFAULT_THRESHOLD = 0.6


class _Recording(AttnProcessor):
    """The plain attention processor, keeping each call's attention probabilities."""

    def __init__(self, store: list[torch.Tensor]):
        super().__init__()
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        compute = attn.get_attention_scores

        def recorded(query, key, mask=None):
            probs = compute(query, key, mask)
            self.store.append(probs.detach())  # [batch * heads, HW, L]
            return probs

        attn.get_attention_scores = recorded  # shadows the method for this one call
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn.get_attention_scores


@contextmanager
def recorded_cross_attention(unet) -> Iterator[list[torch.Tensor]]:
    """Within the context, every cross-attention (attn2) call of `unet` appends its attention
    probabilities [batch * heads, HW, L] to the yielded list (clear it between forwards); the
    UNet's own processors are back afterwards. The one recorder: FineStyle's concept maps here and
    DreamSteerer's subject mask (service/edit/workbench.py) both read it."""
    saved = unet.attn_processors
    store: list[torch.Tensor] = []
    unet.set_attn_processor({name: _Recording(store) if ".attn2." in name else proc for name, proc in saved.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(saved)


def phrase_token_positions(tokenizer, prompt: str, phrases: Sequence[str]) -> list[list[int]]:
    """For each phrase, the positions (in the prompt's token ids, start token included) of its
    content words. Phrases are found in order, each after the previous one, so "a yellow star and a
    pink star" gives the second phrase the second "star"."""
    prompt_ids = tokenizer(prompt).input_ids
    out, cursor = [], 0
    for phrase in phrases:
        words = phrase.lower().split()
        word_ids = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
        span = [i for ids in word_ids for i in ids]
        start = next((k for k in range(cursor, len(prompt_ids) - len(span) + 1) if prompt_ids[k : k + len(span)] == span), None)
        if start is None:
            raise ValueError(f"phrase {phrase!r} does not occur in prompt {prompt!r}")
        content = [w not in ARTICLES for w in words] if any(w not in ARTICLES for w in words) else [True] * len(words)
        positions, offset = [], start
        for ids, keep in zip(word_ids, content):
            if keep:
                positions += range(offset, offset + len(ids))
            offset += len(ids)
        out.append(positions)
        cursor = start + len(span)
    return out


@torch.no_grad()
def cross_attention_maps(
    base: FrozenBase,
    image: Image.Image,
    prompt: str,
    phrases: Sequence[str],
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
) -> np.ndarray:
    """[len(phrases), size, size] maps in [0, 1] (1 = where the phrase is attended most), at the
    training resolution `base.size` (the image resized and centre-cropped like training data).
    The phrases must occur in the prompt in this order."""
    engine = base.engine
    posterior = Posteriors.of_images(base, [image])
    latent = posterior.mean  # [1, C, h, w]
    # SDXL: conditioned on the image's own size and crop, as its training pairs are.
    embeds = with_time_ids(base, engine.encode_prompts([prompt], size=(base.size, base.size)), posterior.time_ids)
    # Token positions are the first tokenizer's; SDXL's second tokenizes alike (same vocabulary).
    positions = phrase_token_positions(engine.tokenizer, prompt, phrases)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed)).to(latent)

    unet = base.unet
    total = torch.zeros(len(phrases), base.size, base.size)
    with recorded_cross_attention(unet) as store:
        for t in timesteps:
            store.clear()
            tt = torch.tensor([int(t)])
            noisy = base.schedule.scheduler.add_noise(latent.cpu(), noise.cpu(), tt).to(latent)
            unet(noisy.to(engine.dtype), tt.to(engine.device), encoder_hidden_states=embeds).sample
            for probs in store:
                hw = probs.shape[1]
                side = int(round(hw ** 0.5))
                per_token = probs.float().mean(0).reshape(side, side, -1)  # heads averaged: [side, side, L]
                layer = torch.stack([per_token[..., pos].mean(-1) for pos in positions])  # [P, side, side]
                layer = F.interpolate(layer[None], size=(base.size, base.size), mode="bilinear", align_corners=False)[0]
                total += layer.cpu() / layer.amax(dim=(1, 2), keepdim=True).clamp(min=1e-8).cpu()
    low = total.amin(dim=(1, 2), keepdim=True)
    high = total.amax(dim=(1, 2), keepdim=True)
    return ((total - low) / (high - low).clamp(min=1e-8)).numpy()


def concept_regions(maps: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int, int, int] | None]:
    """One box per phrase map: each pixel belongs to the phrase that attends it most (phrases of
    one caption compete, so two objects' regions do not swallow each other), then `region_of`."""
    winner = maps.argmax(0)
    return [region_of(np.where(winner == i, m, 0.0), threshold) for i, m in enumerate(maps)]


def region_of(attention: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1; x1/y1 exclusive) of the largest connected region where the map
    is at least `threshold`, or None if there is none."""
    labels, n = ndimage.label(attention >= threshold)
    if n == 0:
        return None
    sizes = ndimage.sum(np.ones_like(attention), labels, index=range(1, n + 1))
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
