"""Delta Denoising Score editing (Hertz, Aberman, Cohen-Or, ICCV 2023), as a loop that yields its
model calls. The reference is the official notebook (google/prompt-to-prompt, DDS_zeroshot.ipynb).

    z = z_source
    repeat `iterations` times:
        t ~ U[t_min, t_max), eps ~ N(0, I)                 one of each, shared by both branches
        eps_src = CFG(eps(z_source_t, source prompt))      noised source
        eps_tgt = CFG(eps(z_t, target prompt, adapter))    noised current edit
        z = z - lr * (eps_tgt - eps_src)                   no backward pass through the UNet

Both branches' conditional and unconditional rows go into ONE UNet call per iteration (four rows),
so the Triton `unet` model batches them with other edits' rows like any other rows. The delta
cancels what both predictions share (the noise, the source's own content) and keeps the direction
from the source prompt to the target prompt; the edit therefore changes what the prompts differ
in and leaves the rest.

With a personalized adapter, plain DDS uses it in both branches (the adapter is part of the model
being edited with). DreamSteerer changes two things here (docs/edit/dreamsteerer.md): the source
branch may come from other rows (the pre-trained model: bias correction), and the update may be
confined to a mask.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from service.engine.sampling import (
    AdapterUse, Decode, Denoise, Encode, EncodeImage, GenerationCancelled, ModelFacts, classifier_free_guidance,
    noise_prediction,
)

from .spec import Edited, EditProgress, EditSpec


def dds_loop(
    facts: ModelFacts,
    z_source: torch.Tensor,
    source_embeds: torch.Tensor,  # [2, L, D]: unconditional, source prompt
    target_embeds: torch.Tensor,  # [2, L, D]: unconditional, target prompt
    source_rows: Sequence[AdapterUse],
    target_rows: Sequence[AdapterUse],
    iterations: int,
    guidance_scale: float,
    learning_rate: float,
    t_min: int,
    t_max: int,
    seed: int,
    mask: torch.Tensor | None = None,  # [1, 1, h, w] in [0, 1]: where the update may land
    should_stop: Callable[[], bool] = lambda: False,
    on_iteration: Callable[[int, int], None] | None = None,
):
    """The DDS iterations from z_source; yields Denoise calls, returns the edited latent."""
    scheduler = facts.new_scheduler(1)  # only its alphas (add_noise) are used
    g = torch.Generator().manual_seed(int(seed))
    z = z_source.clone()
    embeds = torch.cat([source_embeds, target_embeds])
    rows = [tuple(source_rows)] * 2 + [tuple(target_rows)] * 2
    for i in range(iterations):
        if should_stop():
            raise GenerationCancelled(f"stopped before DDS iteration {i + 1} of {iterations}")
        t = torch.randint(t_min, t_max, (1,), generator=g)
        eps = torch.randn(z.shape, generator=g).to(z)
        noisy_source = scheduler.add_noise(z_source, eps, t)
        noisy = scheduler.add_noise(z, eps, t)
        latents = torch.cat([noisy_source, noisy_source, noisy, noisy])
        result = yield Denoise(latents, t.expand(4).to(z.device), embeds, rows)
        # DDS is written for noise predictions: a v-prediction model's velocity is turned into one.
        e = noise_prediction(result.noise.to(z), latents, scheduler.alphas_cumprod[t], scheduler.config.prediction_type)
        delta = classifier_free_guidance(e[2:3], e[3:4], guidance_scale) - classifier_free_guidance(
            e[0:1], e[1:2], guidance_scale)
        if mask is not None:
            delta = delta * mask
        z = z - learning_rate * delta
        if on_iteration is not None:
            on_iteration(i + 1, iterations)
    return z


def dds(spec: EditSpec, facts: ModelFacts, should_stop=lambda: False, progress: EditProgress | None = None):
    """Plain DDS: the target prompt with the user's adapter (if any) in both branches."""
    o = spec.options
    started = time.perf_counter()
    z_source = yield EncodeImage(spec.source)
    uses = (spec.adapter,) if spec.adapter is not None else ()
    prompts = ["", spec.source_prompt, "", spec.target_prompt]
    # An image prompt conditions the target branch only (its guidance row gets the unconditional
    # tokens): the delta then points from the source toward the photos' subject.
    image_prompts = None if spec.image_prompt is None else [None, None, spec.image_prompt.unconditional(),
                                                            spec.image_prompt]
    embeds = yield Encode(prompts, [uses] * 4, (spec.height, spec.width), image_prompts)
    t0 = time.perf_counter()
    z = yield from dds_loop(
        facts, z_source, embeds[:2], embeds[2:], uses, uses, o.iterations, o.guidance_scale, o.learning_rate,
        o.t_min, o.t_max, spec.seed, should_stop=should_stop,
        on_iteration=(lambda i, n: progress("dds", i, n)) if progress else None,
    )
    t_dds = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = (yield Decode(z))[0]
    return Edited(image=image, mask=None, seed=spec.seed, latent=z[0].float().cpu().numpy(), timings=dict(
        dds_seconds=t_dds, decode_seconds=time.perf_counter() - t0, total_seconds=time.perf_counter() - started))
