"""The samplers a Generate request may pick: each is diffusers' own scheduler, made from the model's
scheduler config the way diffusers' docs swap one in (`Scheduler.from_config(pipe.scheduler.config)`,
diffusers issues #1887 and #4167 for the A1111 names), so the betas, spacing and offset are the
checkpoint's and every update is diffusers'.

The one place that knows a sampler's name, its diffusers class and settings, whether Karras sigmas
apply, and which step counts it takes; the sampling loop (sampling.generation) and the gateway's
validation read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: type[SchedulerMixin]
    # Settings on top of the model's scheduler config (what makes e.g. DPM-Solver++ 2M SDE of
    # DPMSolverMultistepScheduler).
    settings: Mapping[str, object] = field(default_factory=dict)
    karras: bool = False  # whether use_karras_sigmas applies
    stochastic: bool = False  # draws noise at each step (from the request's seeds)
    max_steps: int | None = None  # beyond the service's own limit (LCM: its original schedule's)

    def check_steps(self, steps: int) -> str | None:
        """Why this sampler cannot take `steps`, or None."""
        if self.max_steps is not None and steps > self.max_steps:
            return f"sampler {self.name!r} takes 1 to {self.max_steps} steps (got {steps})"
        return None


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        # DDIM (eta 0): the default, and what DDS editing's schedule is.
        Sampler("ddim", DDIMScheduler, {"clip_sample": False}),
        Sampler("euler", EulerDiscreteScheduler, karras=True),
        Sampler("euler_ancestral", EulerAncestralDiscreteScheduler, stochastic=True),
        # A1111's "DPM++ 2M" ("DPM++ 2M Karras" with karras_sigmas).
        Sampler("dpmpp_2m", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2},
                karras=True),
        Sampler("dpmpp_2m_sde", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                karras=True, stochastic=True),
        Sampler("unipc", UniPCMultistepScheduler, karras=True),
        # Latent consistency: for an LCM-distilled model or an LCM-LoRA, 1-8 steps at guidance ~1.
        # Its timesteps are drawn from an original 50-step schedule, so it takes at most 50.
        Sampler("lcm", LCMScheduler, stochastic=True, max_steps=50),
    )
}
DEFAULT_SAMPLER = "ddim"


class UnknownSampler(ValueError):
    pass


def allowed() -> str:
    return ", ".join(SAMPLERS)


def get(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UnknownSampler(f"unknown sampler {name!r}: one of {allowed()}") from None


def check(name: str, steps: int, karras_sigmas: bool) -> tuple[str, str] | None:
    """(the request field at fault, why) when these sampler settings cannot run, else None: the
    gateway's INVALID_ARGUMENT and the Triton model's own check."""
    if name not in SAMPLERS:
        return "sampler", f"unknown sampler {name!r}: one of {allowed()}"
    sampler = SAMPLERS[name]
    if karras_sigmas and not sampler.karras:
        with_karras = ", ".join(s.name for s in SAMPLERS.values() if s.karras)
        return "karras_sigmas", f"does not apply to sampler {name!r}: only to {with_karras}"
    problem = sampler.check_steps(steps)
    return None if problem is None else ("steps", problem)


def new_scheduler(name: str, scheduler_config: Mapping, steps: int, karras_sigmas: bool = False,
                  device: torch.device | str = "cpu") -> SchedulerMixin:
    """A fresh scheduler for one request (set_timesteps and step mutate it: never share one)."""
    sampler = get(name)
    settings = dict(sampler.settings)
    if karras_sigmas:
        if not sampler.karras:
            raise ValueError(f"karras_sigmas does not apply to sampler {name!r}")
        settings["use_karras_sigmas"] = True
    scheduler = sampler.scheduler.from_config(scheduler_config, **settings)
    scheduler.set_timesteps(steps, device=device)
    return scheduler
