"""The workbench: DreamSteerer's model-internal steps (mask.py, guided.py, inputs.py, steering.py) on
a private copy of the base model with the request's adapter applied (applied.py). The steps see it
through protocol.Bench; the package re-exports `Workbench`."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from service.adapters import Adapter
from service.engine.pipeline import flush_denormals
from service.engine.sampling import noise_prediction
from service.personalize.common import FrozenBase

from ..spec import GuidedSamples, Steer, SteeringInputs, SubjectMask
from . import guided, inputs, mask, steering
from .applied import Applied, applied


class Workbench:
    def __init__(self, base: FrozenBase):
        self.base = base

    def execute(self, call, adapter: Adapter, should_stop=lambda: False, progress=None):
        """Runs one call with `adapter` applied; `should_stop` is checked between steps (raises
        GenerationCancelled), `progress(phase, step, total)` hears about each step."""
        flush_denormals()
        report = progress or (lambda phase, step, total: None)
        with self.base.lock, self.applied(adapter, trainable=isinstance(call, Steer)) as on:
            if isinstance(call, SubjectMask):
                return mask.subject_mask(self, call, on)
            if isinstance(call, GuidedSamples):
                return guided.guided_samples(self, call, on, should_stop, report)
            if isinstance(call, SteeringInputs):
                return inputs.steering_inputs(self, call, on, should_stop, report)
            if isinstance(call, Steer):
                return steering.steer(self, call, on, should_stop, report)
        raise TypeError(f"not a workbench call: {type(call).__name__}")

    def applied(self, adapter: Adapter, trainable: bool = False) -> AbstractContextManager[Applied]:
        return applied(self.base.engine, adapter, trainable)

    def edsd_objective(self, call: Steer, adapter: Adapter, samples: int = 8) -> float:
        """What steering lowers, for tests and benchmarks (steering.edsd_objective)."""
        return steering.edsd_objective(self, call, adapter, samples)

    # -- what the steps share -----------------------------------------------------------------------

    def embed(self, prompts: Sequence[str], tokens: dict[str, torch.Tensor],
              size: tuple[int, int] | None = None) -> torch.Tensor:
        """Conditioning of prompts with the applied tokens, for images of size (h, w) (SDXL's
        time_ids; the steps pass their source's, `size_of`)."""
        return self.base.prompt_encoder.embed(list(prompts), [tokens] * len(prompts), size).to(self.base.engine.dtype)

    def size_of(self, latent: torch.Tensor) -> tuple[int, int]:
        """(h, w) in pixels of the image a latent [.., h, w] decodes to."""
        f = self.base.engine.vae_scale_factor
        return int(latent.shape[-2]) * f, int(latent.shape[-1]) * f

    def epsilon(self, prediction: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The noise a prediction implies (service.engine.sampling.noise_prediction)."""
        scheduler = self.base.schedule.scheduler
        return noise_prediction(prediction, x_t, scheduler.alphas_cumprod[int(t)], scheduler.config.prediction_type)

    def unet(self, latents, t, embeds) -> torch.Tensor:
        """One UNet call; `t` one timestep for every row or one per row."""
        t = torch.as_tensor(t, device=self.base.engine.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(latents.shape[0])
        return self.base.unet(latents.to(self.base.engine.dtype), t, encoder_hidden_states=embeds).sample

