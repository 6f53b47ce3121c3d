"""What a request weighs, in UNet-row steps (the unit admission measures seconds per)."""

from __future__ import annotations

from service.edit.spec import DREAMSTEERER, EditSpec
from service.engine.sampling import GenerationSpec

# A training step (forward + backward through an adapter) costs about three forwards.
_BACKWARD = 3


# A unit is one UNet row-step at 64x64 pixels; the UNet's cost grows about with the pixel count.
_UNIT_PIXELS = 64 * 64


def generate_cost(spec: GenerationSpec) -> float:
    """steps x UNet rows (2 per image under classifier-free guidance, 3 under style guidance), plus
    one unit per image for the text encoder and the VAE decode, scaled by the pixel count."""
    rows = 3 if spec.uses_style_guidance else 2
    return (spec.steps * rows * spec.num_images + spec.num_images) * spec.width * spec.height / _UNIT_PIXELS


def edit_cost(spec: EditSpec) -> float:
    """DDS: 4 rows an iteration. DreamSteerer adds the inversion and guided samples (2 rows a DDIM
    step), the preliminary DDS, and steering (forward + backward of a few rows per step)."""
    o = spec.options
    cost = 4 * o.iterations + 1
    if spec.method == DREAMSTEERER:
        cost += 2 * o.guided_steps * (1 + o.guided_samples) + 4 * o.preliminary_iterations
        cost += _BACKWARD * (4 + o.guided_samples) * o.steer_steps
    return float(cost) * spec.width * spec.height / _UNIT_PIXELS
