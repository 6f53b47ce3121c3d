"""DreamSteerer's steering: a few optimizer steps of the applied adapter copy on Editability Driven
Score Distillation (EDSD) and the mode-shifting regularization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from service.adapters import Adapter
from service.engine.pipeline import GenerationCancelled
from service.personalize.common import adamw, optimizer_step
from service.personalize.spec import CUSTOM_DIFFUSION, DREAMBOOTH_LORA, TEXTUAL_INVERSION

from ..spec import EditRefused, Steer
from .applied import Applied

if TYPE_CHECKING:
    from .protocol import Bench

# Steering learning rates (Adam), per adapter method: about a third to a tenth of each method's
# training rate (docs/personalize/*.md), since steering nudges a trained adapter for a few steps.
STEER_LR = {DREAMBOOTH_LORA: 1e-3, TEXTUAL_INVERSION: 5e-3, CUSTOM_DIFFUSION: 1e-3}
DEFAULT_STEER_LR = 1e-3


def steer(bench: "Bench", call: Steer, applied: Applied, should_stop=lambda: False,
          report=lambda phase, step, total: None):
    """Tunes the applied copy for `steer_steps` steps; returns (steered Adapter, losses).

    EDSD, per step, with one t and one noise for the source and the slightly edited image x~:
        delta = eps_phi(x~_t, target) - eps_pre(x_src_t, source)        (pre-trained: frozen)
        L_edsd = 1/2 |delta|^2 + eta_eff sqrt(abar_t) <sg(delta), eps_phi(x_src_t, target)>
    The first term pulls the personalized prediction on the edit toward the pre-trained score of
    the source; the second is the path through the edit x~(phi) = x_src - eta DDS(phi) with the
    UNet Jacobian d eps / d x replaced by -I (the sign that adapts to the source's layout;
    +I destroys it). eta_eff = DDS step x preliminary iterations (how far x~ moved).
    Mode shifting: weight * the ordinary denoising loss of the guided samples with the target
    prompt, under the model's own training weights.
    """
    o = call.options
    engine = bench.base.engine
    schedule = bench.base.schedule
    params = applied.parameters()
    if not params:
        raise EditRefused("the adapter has no LoRA or token tensors to steer")
    lr = o.steer_learning_rate or STEER_LR.get(call.adapter_method, DEFAULT_STEER_LR)
    optimizer = adamw(params, lr)
    eta = o.learning_rate * max(1, o.preliminary_iterations)
    z_src = call.source.to(engine.device)
    guided = call.guided.to(engine.device) if call.guided is not None else None
    draws = _draws(schedule, o, call, z_src, guided)
    # The frozen pre-trained model's score of the noised source at each step's (t, noise) does not
    # change while the copy learns: all of them in a few batched calls before the loop, instead of
    # a one-row call per step (on CPU a 1-row UNet call costs half a 4-row one).
    eps_pre = _pretrained_scores(bench, applied, call, draws) if call.edited is not None else []
    losses = []
    size = bench.size_of(z_src)  # SDXL's time_ids: the source's own size
    # The target prompt's conditioning changes while steering only through learned tokens or
    # text-encoder LoRA layers; without them it is the same every step: encoded once.
    steered_text = bool(applied.tokens) or any(not name.startswith("unet.") for name in applied.layers)
    fixed_embeds = None if steered_text else bench.embed([call.target_prompt], applied.tokens, size)
    for step, d in enumerate(draws):
        if should_stop():
            raise GenerationCancelled(f"stopped before steering step {step + 1} of {o.steer_steps}")
        target_embeds = fixed_embeds if fixed_embeds is not None else bench.embed([call.target_prompt], applied.tokens, size)
        # Every row that needs a gradient in ONE forward and backward: the EDSD pair (noised edit,
        # noised source) at t, then the guided samples at their own timesteps.
        rows, timesteps = [], []
        if call.edited is not None:
            rows += [d.noisy_edit, d.noisy_src]
            timesteps += [d.t, d.t]
        if guided is not None:
            rows.append(d.noisy_guided)
            timesteps.append(d.t_guided)
        latents, timesteps = torch.cat(rows), torch.cat(timesteps)
        pred = bench.unet(latents, timesteps, target_embeds.expand(latents.shape[0], -1, -1))
        loss = torch.zeros((), device=engine.device)
        record: dict[str, float] = {}
        if call.edited is not None:
            eps = bench.epsilon(pred[:2], latents[:2], int(d.t))
            delta = eps[:1] - eps_pre[step]
            alpha = schedule.scheduler.alphas_cumprod[d.t].to(z_src)
            loss = loss + 0.5 * delta.pow(2).mean() + eta * alpha.sqrt() * (delta.detach() * eps[1:]).mean()
            record["edsd"] = float(0.5 * delta.detach().pow(2).mean())
        if guided is not None:
            shifted = pred[-guided.shape[0]:]
            shift = (F.mse_loss(shifted.float(), d.target_guided.float(), reduction="none").mean(dim=(1, 2, 3))
                     * schedule.weight(d.t_guided)).mean()
            loss = loss + o.mode_shifting_weight * shift
            record["mode_shifting"] = float(shift.detach())
        optimizer_step(optimizer, loss, params)
        losses.append(record)
        report("steer", step + 1, o.steer_steps)
    return applied.to_adapter(), losses


@dataclass
class _Draw:
    """One steering step's randomness: EDSD's timestep and noise (shared by source and edit), the
    guided samples' timesteps, noised latents and denoising targets."""

    t: torch.Tensor | None = None  # [1]
    noisy_src: torch.Tensor | None = None
    noisy_edit: torch.Tensor | None = None
    t_guided: torch.Tensor | None = None  # [n]
    noisy_guided: torch.Tensor | None = None
    target_guided: torch.Tensor | None = None


def _draws(schedule, o, call: Steer, z_src: torch.Tensor, guided: torch.Tensor | None) -> list[_Draw]:
    """Every step's draws, in the order a step-by-step loop makes them (EDSD's t and noise, then the
    guided samples' noise and t), from one generator seeded by the request."""
    g = torch.Generator().manual_seed(int(call.seed) + 17)
    scheduler = schedule.scheduler
    out = []
    for _ in range(o.steer_steps):
        d = _Draw()
        t = torch.randint(o.t_min, o.t_max, (1,), generator=g)
        eps = torch.randn(z_src.shape, generator=g).to(z_src)
        if call.edited is not None:
            d.t = t
            d.noisy_src = scheduler.add_noise(z_src.cpu(), eps.cpu(), t).to(z_src)
            d.noisy_edit = scheduler.add_noise(call.edited.cpu(), eps.cpu(), t).to(z_src)
        if guided is not None:
            d.noisy_guided, d.t_guided, d.target_guided = schedule.noise(guided, g)
        out.append(d)
    return out


@torch.no_grad()
def _pretrained_scores(bench: "Bench", applied: Applied, call: Steer, draws: list[_Draw],
                       chunk: int = 16) -> list[torch.Tensor]:
    """eps_pre(x_src_t, source prompt) of every step, the adapter off, `chunk` rows per UNet call."""
    with applied.off():
        source_embeds = bench.embed([call.source_prompt], {}, bench.size_of(call.source))
    out: list[torch.Tensor] = []
    for start in range(0, len(draws), chunk):
        part = draws[start : start + chunk]
        latents = torch.cat([d.noisy_src for d in part])
        timesteps = torch.cat([d.t for d in part])
        with applied.off():
            pred = bench.unet(latents, timesteps, source_embeds.expand(len(part), -1, -1))
        for k, d in enumerate(part):
            out.append(bench.epsilon(pred[k : k + 1], latents[k : k + 1], int(d.t)))
    return out


@torch.no_grad()
def edsd_objective(bench: "Bench", call: Steer, adapter: Adapter, samples: int = 8) -> float:
    """The EDSD distance 1/2 |eps_phi(x~_t, target) - eps_pre(x_src_t, source)|^2 of `adapter`,
    averaged over a fixed set of (t, noise): what steering lowers (tests, benchmarks)."""
    o = call.options
    g = torch.Generator().manual_seed(1234)
    scheduler = bench.base.schedule.scheduler
    with bench.base.lock, bench.applied(adapter) as applied:
        size = bench.size_of(call.source)
        with applied.off():
            source_embeds = bench.embed([call.source_prompt], {}, size)
        target_embeds = bench.embed([call.target_prompt], applied.tokens, size)
        total = 0.0
        for _ in range(samples):
            t = torch.randint(o.t_min, o.t_max, (1,), generator=g)
            eps = torch.randn(call.source.shape, generator=g)
            noisy_src = scheduler.add_noise(call.source.cpu(), eps, t)
            noisy_edit = scheduler.add_noise(call.edited.cpu(), eps, t)
            with applied.off():
                eps_pre = bench.epsilon(bench.unet(noisy_src, t, source_embeds), noisy_src, t)
            pred = bench.epsilon(bench.unet(noisy_edit, t, target_embeds), noisy_edit, t)
            total += float(0.5 * (pred - eps_pre).pow(2).mean())
    return total / samples
