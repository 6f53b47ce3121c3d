"""DreamSteerer's subject mask: where the concept's words attend in the noised source."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from service.personalize.attention_maps import recorded_cross_attention

from ..spec import EditRefused, SubjectMask
from .applied import Applied

if TYPE_CHECKING:
    from .protocol import Bench

# Attention read at these (low) noise levels, as service.personalize.attention_maps.
MASK_TIMESTEPS = (50, 150, 300)


@torch.no_grad()
def subject_mask(bench: "Bench", call: SubjectMask, applied: Applied) -> torch.Tensor:
    """[h, w] binary mask: the concept words' cross-attention on the noised source, averaged
    over heads, layers and a few low timesteps (Prompt-to-Prompt's local blend: layer maps
    normalised, a 3x3 max-pool, scaled to [0, 1], threshold)."""
    latent = call.latent
    h, w = latent.shape[-2:]
    embeds = bench.embed([call.prompt], applied.tokens, bench.size_of(latent))
    positions = word_positions(bench.base.prompt_encoder, call.prompt, call.words, applied.tokens)
    if not positions:
        raise EditRefused(f"none of the concept's words {list(call.words)} occurs in the target prompt {call.prompt!r}")
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0)).to(latent)
    total = torch.zeros(h, w)
    with recorded_cross_attention(bench.base.unet) as store:
        for t in MASK_TIMESTEPS:
            store.clear()
            tt = torch.tensor([t])
            bench.unet(bench.base.schedule.scheduler.add_noise(latent.cpu(), noise.cpu(), tt).to(latent), tt, embeds)
            for probs in store:
                lh, lw = _layer_grid(h, w, probs.shape[1])
                layer = probs.float().mean(0).reshape(lh, lw, -1)[..., positions].mean(-1).cpu()
                layer = F.interpolate(layer[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
                total += layer / layer.max().clamp(min=1e-8)
    total = F.max_pool2d(total[None, None], 3, stride=1, padding=1)[0, 0]
    # Scaled to [0, 1] between its own minimum and maximum: every position attends a little to
    # every word, and on our model that floor was about 0.6 of the maximum (measured).
    total = (total - total.min()) / (total.max() - total.min()).clamp(min=1e-8)
    return (total >= call.threshold).float()


def _layer_grid(h: int, w: int, positions: int) -> tuple[int, int]:
    """(rows, columns) of an attention layer's query grid over an h x w latent: the UNet halves it
    (rounding up) per level, so the grid with `positions` cells is found by halving."""
    while h * w > positions:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != positions:
        raise ValueError(f"an attention layer has {positions} positions, no grid of the {h}x{w} latent")
    return h, w


def word_positions(prompt_encoder, prompt: str, words: Sequence[str], tokens: dict) -> list[int]:
    """Positions (in the encoded prompt, start token included) of `words`: a learned token's
    injected positions, or a plain word's token ids where they occur. The first tokenizer's: SDXL's
    second has the same vocabulary (it pads differently, after the end token), so the positions
    are those of both encoders' states."""
    ids, mask, _ = prompt_encoder.tokenize([prompt], [tokens])
    ids, mask = ids[0].tolist(), mask[0]
    out: list[int] = []
    for word in words:
        if word in tokens:
            out += torch.nonzero(mask).reshape(-1).tolist()
            continue
        span = prompt_encoder.tokenizer(word, add_special_tokens=False).input_ids
        for k in range(len(ids) - len(span) + 1):
            if ids[k : k + len(span)] == span:
                out += range(k, k + len(span))
                break
    return sorted(set(out))
