"""DreamSteerer's spatial-feature-guided samples: DDIM-invert the source, then sample the
personalized model from the inverted noise with the source trajectory's features injected
(plug-and-play, Tumanyan et al., CVPR 2023). Written as a loop that yields its UNet calls (`Rows`),
so that it runs alone (`guided_samples`) or side by side with the preliminary edit
(inputs.steering_inputs) in shared calls (rows.run_side_by_side)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from service.engine.pipeline import GenerationCancelled, classifier_free_guidance

from ..spec import GuidedSamples
from .applied import Applied
from .rows import Rows, run_side_by_side

if TYPE_CHECKING:
    from .protocol import Bench

# Plug-and-play feature injection mapped onto a diffusers UNet (rows._FeatureInjection): the
# decoder's second-level ResNet output for the first `feature_fraction` of the steps (pnp-diffusers:
# 80%), the self-attention queries and keys of the decoder's later attention layers for the first
# `attention_fraction` (50%).


@torch.no_grad()
def guided_samples(bench: "Bench", call: GuidedSamples, applied: Applied, should_stop=lambda: False,
                   report=lambda phase, step, total: None) -> torch.Tensor:
    """Invert the source with DDIM (pre-trained model, source prompt), then sample `n` images
    of the prompt with the personalized model from the inverted noise while the source
    trajectory's decoder features are injected (plug-and-play); [n, C, h, w] latents."""
    return run_side_by_side(bench, applied, [guided_loop(bench, call, applied, should_stop, report)])[0]


def guided_loop(bench: "Bench", call: GuidedSamples, applied: Applied, should_stop=lambda: False,
                report=lambda phase, step, total: None):
    """The guided samples as a loop: yields its UNet calls (`Rows`: 2 x `steps` of them), returns
    the samples' latents [n, C, h, w]. Run it with rows.run_side_by_side (no gradients)."""
    engine = bench.base.engine
    scheduler = engine.facts.new_scheduler(call.steps, engine.device)
    timesteps = scheduler.timesteps  # descending
    alphas = scheduler.alphas_cumprod.to(engine.device)

    # DDIM inversion: x_t from x_{t-1} with the noise predicted at x_{t-1}.
    size = bench.size_of(call.latent)  # SDXL's time_ids: the source's own size
    with applied.off():
        source_embeds = bench.embed([call.source_prompt], {}, size)
    trajectory: dict[int, torch.Tensor] = {}
    x = call.latent.to(engine.device, engine.dtype)
    alpha_prev = torch.tensor(1.0, device=engine.device)
    t_prev = int(timesteps[-1])
    for t in reversed(timesteps.tolist()):
        if should_stop():
            raise GenerationCancelled(f"stopped at guided-sample inversion step {len(trajectory) + 1} of {len(timesteps)}")
        eps = bench.epsilon((yield Rows(x, t_prev, source_embeds, adapter=False)), x, t_prev)
        x0 = (x - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
        x = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
        trajectory[t] = x
        alpha_prev, t_prev = alphas[t], t

    # Sampling with injection: row 0 the source trajectory (its features are recorded), then
    # n unconditional and n conditional rows of the samples (features replaced by row 0's). All
    # rows are one part of a UNet call, so row 0 runs through the personalized model too: the
    # injected features are those of the model the samples are drawn with (the inversion above
    # used the pre-trained one, whose score of the source is unbiased).
    n = call.n
    g = torch.Generator().manual_seed(int(call.seed))
    x_T = trajectory[int(timesteps[0])]
    starts = [x_T[0]]
    for _ in range(n - 1):  # further samples: the inverted noise partly renewed
        fresh = torch.randn(x_T.shape[1:], generator=g).to(x_T)
        starts.append(math.sqrt(0.75) * x_T[0] + math.sqrt(0.25) * fresh)
    latents = torch.stack(starts)
    prompt_embeds = bench.embed(["", call.prompt], applied.tokens, size)
    with applied.off():
        source_row = bench.embed([call.source_prompt], {}, size)
    embeds = torch.cat([source_row, prompt_embeds[:1].expand(n, -1, -1), prompt_embeds[1:].expand(n, -1, -1)])
    for i, t in enumerate(timesteps.tolist()):
        if should_stop():
            raise GenerationCancelled(f"stopped at guided-sampling step {i + 1} of {len(timesteps)}")
        rows = torch.cat([trajectory[t], latents, latents])
        noise = yield Rows(rows, t, embeds, adapter=True, inject=True,
                           features=call.inject and i < call.feature_fraction * len(timesteps),
                           attention=call.inject and i < call.attention_fraction * len(timesteps))
        guided = classifier_free_guidance(noise[1 : 1 + n], noise[1 + n :], call.guidance_scale)
        latents = scheduler.step(guided, t, latents).prev_sample
        report("guided", i + 1, len(timesteps))
    return latents.float()
