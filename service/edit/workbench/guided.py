"""DreamSteerer's spatial-feature-guided samples: DDIM-invert the source, then sample the
personalized model from the inverted noise with the source trajectory's features injected
(plug-and-play, Tumanyan et al., CVPR 2023)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import AttnProcessor

from service.engine.pipeline import GenerationCancelled, classifier_free_guidance

from ..spec import GuidedSamples
from .applied import Applied

if TYPE_CHECKING:
    from .protocol import Bench

# Plug-and-play feature injection mapped onto a diffusers UNet: the decoder's second-level ResNet
# output for the first `feature_fraction` of the steps (pnp-diffusers: 80%), the self-attention
# queries and keys of the decoder's later attention layers for the first `attention_fraction` (50%).


@torch.no_grad()
def guided_samples(bench: "Bench", call: GuidedSamples, applied: Applied, should_stop=lambda: False,
                   report=lambda phase, step, total: None) -> torch.Tensor:
    """Invert the source with DDIM (pre-trained model, source prompt), then sample `n` images
    of the prompt with the personalized model from the inverted noise while the source
    trajectory's decoder features are injected (plug-and-play); [n, C, h, w] latents."""
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
    with applied.off():
        for t in reversed(timesteps.tolist()):
            eps = bench.epsilon(bench.unet(x, t_prev, source_embeds), x, t_prev)
            x0 = (x - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
            x = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps
            trajectory[t] = x
            alpha_prev, t_prev = alphas[t], t

    # Sampling with injection: row 0 the source trajectory (its features are recorded), then
    # n unconditional and n conditional rows of the samples (features replaced by row 0's). All
    # rows are one UNet call, so row 0 runs through the personalized model too: the injected
    # features are those of the model the samples are drawn with (the inversion above used the
    # pre-trained one, whose score of the source is unbiased).
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
    with _FeatureInjection(bench.base.unet) as inject:
        for i, t in enumerate(timesteps.tolist()):
            if should_stop():
                raise GenerationCancelled(f"stopped at guided-sampling step {i + 1} of {len(timesteps)}")
            inject.features = call.inject and i < call.feature_fraction * len(timesteps)
            inject.attention = call.inject and i < call.attention_fraction * len(timesteps)
            rows = torch.cat([trajectory[t], latents, latents])
            noise = bench.unet(rows, t, embeds)
            guided = classifier_free_guidance(noise[1 : 1 + n], noise[1 + n :], call.guidance_scale)
            latents = scheduler.step(guided, t, latents).prev_sample
            report("guided", i + 1, len(timesteps))
    return latents.float()


class _InjectedSelfAttention(AttnProcessor):
    """Self-attention whose queries and keys, for every row but the first, are the first row's
    (the source trajectory's) while `switch.attention` is on: the rows keep their own values, so
    they take the source's layout with their own appearance."""

    def __init__(self, switch: "_FeatureInjection"):
        super().__init__()
        self.switch = switch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self.switch.attention or encoder_hidden_states is not None or hidden_states.ndim != 3:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query[:1].expand_as(query)
        key = key[:1].expand_as(key)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), None)
        out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(value)))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _FeatureInjection:
    """Installs plug-and-play injection on a diffusers UNet for the block: the decoder's second
    up block's last ResNet output, and self-attention q/k in the decoder's last two up blocks."""

    def __init__(self, unet):
        self.unet = unet
        self.features = False
        self.attention = False

    def __enter__(self) -> "_FeatureInjection":
        ups = self.unet.up_blocks
        level = min(1, len(ups) - 1)
        resnet = ups[level].resnets[-1]

        def replace_output(module, args, output):
            if not self.features:
                return output
            return torch.cat([output[:1], output[:1].expand(output.shape[0] - 1, *output.shape[1:])])

        self._hook = resnet.register_forward_hook(replace_output)
        self._saved = self.unet.attn_processors
        injected = tuple(f"up_blocks.{i}." for i in range(level, len(ups)))
        self.unet.set_attn_processor({
            name: _InjectedSelfAttention(self) if name.startswith(injected) and ".attn1." in name else proc
            for name, proc in self._saved.items()
        })
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        self.unet.set_attn_processor(self._saved)
