"""DreamSteerer's steering: a few optimizer steps of the applied adapter copy on Editability Driven
Score Distillation (EDSD) and the mode-shifting regularization."""

from __future__ import annotations

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
    from . import Workbench

# Steering learning rates (Adam), per adapter method: about a third to a tenth of each method's
# training rate (docs/personalize/*.md), since steering nudges a trained adapter for a few steps.
STEER_LR = {DREAMBOOTH_LORA: 1e-3, TEXTUAL_INVERSION: 5e-3, CUSTOM_DIFFUSION: 1e-3}
DEFAULT_STEER_LR = 1e-3


def steer(bench: "Workbench", call: Steer, applied: Applied, should_stop=lambda: False,
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
    g = torch.Generator().manual_seed(int(call.seed) + 17)
    with applied.off():
        source_embeds = bench.embed([call.source_prompt], {}).detach()
    eta = o.learning_rate * max(1, o.preliminary_iterations)
    z_src = call.source.to(engine.device)
    losses = []
    for step in range(o.steer_steps):
        if should_stop():
            raise GenerationCancelled(f"stopped before steering step {step + 1} of {o.steer_steps}")
        t = torch.randint(o.t_min, o.t_max, (1,), generator=g)
        eps = torch.randn(z_src.shape, generator=g).to(z_src)
        target_embeds = bench.embed([call.target_prompt], applied.tokens)
        loss = torch.zeros((), device=engine.device)
        record: dict[str, float] = {}
        if call.edited is not None:
            noisy_src = schedule.scheduler.add_noise(z_src.cpu(), eps.cpu(), t).to(z_src)
            noisy_edit = schedule.scheduler.add_noise(call.edited.cpu(), eps.cpu(), t).to(z_src)
            with torch.no_grad(), applied.off():
                eps_pre = bench.epsilon(bench.unet(noisy_src, t, source_embeds), noisy_src, t)
            rows = torch.cat([noisy_edit, noisy_src])
            pred = bench.epsilon(bench.unet(rows, t, target_embeds.expand(2, -1, -1)), rows, t)
            delta = pred[:1] - eps_pre
            alpha = schedule.scheduler.alphas_cumprod[t].to(z_src)
            edsd = 0.5 * delta.pow(2).mean() + eta * alpha.sqrt() * (delta.detach() * pred[1:]).mean()
            loss = loss + edsd
            record["edsd"] = float(0.5 * delta.detach().pow(2).mean())
        if call.guided is not None:
            guided = call.guided.to(engine.device)
            noisy, tg, target = schedule.noise(guided, g)
            pred = bench.unet(noisy, tg, target_embeds.expand(guided.shape[0], -1, -1))
            shift = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                     * schedule.weight(tg)).mean()
            loss = loss + o.mode_shifting_weight * shift
            record["mode_shifting"] = float(shift.detach())
        optimizer_step(optimizer, loss, params)
        losses.append(record)
        report("steer", step + 1, o.steer_steps)
    return applied.to_adapter(), losses


@torch.no_grad()
def edsd_objective(bench: "Workbench", call: Steer, adapter: Adapter, samples: int = 8) -> float:
    """The EDSD distance 1/2 |eps_phi(x~_t, target) - eps_pre(x_src_t, source)|^2 of `adapter`,
    averaged over a fixed set of (t, noise): what steering lowers (tests, benchmarks)."""
    o = call.options
    g = torch.Generator().manual_seed(1234)
    scheduler = bench.base.schedule.scheduler
    with bench.base.lock, bench.applied(adapter) as applied:
        with applied.off():
            source_embeds = bench.embed([call.source_prompt], {})
        target_embeds = bench.embed([call.target_prompt], applied.tokens)
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
