"""BLS: the sampling loop's model calls (`Encode`, `Denoise`, `Decode`) as calls to the shared
text_encoder / unet / vae_decode models, from inside another python-backend model (`generate`,
`edit`). Importable only inside Triton's python backend (triton_python_backend_utils)."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from service.engine.sampling import Decode, Denoise, Encode, StepResult
from service.triton.library import RemoteError, encode_adapters


async def _call(model, inputs, outputs):
    response = await pb_utils.InferenceRequest(
        model_name=model, inputs=inputs, requested_output_names=outputs
    ).async_exec()
    if response.has_error():
        raise RemoteError(response.error().message())
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]


def strings(values):
    return np.array([v if isinstance(v, bytes) else v.encode() for v in values], dtype=np.object_)


async def execute_call(call):
    """One model call of the sampling loop, as a BLS call to the model that computes it."""
    if isinstance(call, Encode):
        (embeds,) = await _call(
            "text_encoder",
            [pb_utils.Tensor("PROMPTS", strings(call.prompts)),
             pb_utils.Tensor("ADAPTERS", strings([encode_adapters(r) for r in call.rows]))],
            ["EMBEDS"],
        )
        return torch.from_numpy(embeds)
    if isinstance(call, Denoise):
        noise, batch, compute_us = await _call(
            "unet",
            [pb_utils.Tensor("LATENTS", call.latents.detach().float().cpu().numpy()),
             pb_utils.Tensor("TIMESTEP", call.timesteps.detach().cpu().numpy().astype(np.int64).reshape(-1, 1)),
             pb_utils.Tensor("EMBEDS", call.embeds.detach().float().cpu().numpy()),
             pb_utils.Tensor("ADAPTERS", strings([encode_adapters(r) for r in call.rows]).reshape(-1, 1))],
            ["NOISE", "BATCH_SIZE", "COMPUTE_US"],
        )
        return StepResult(torch.from_numpy(noise), int(batch[0, 0]), float(compute_us[0, 0]) / 1e6)
    if isinstance(call, Decode):
        (images,) = await _call("vae_decode", [pb_utils.Tensor("LATENTS", call.latents.detach().float().cpu().numpy())], ["IMAGES"])
        return images
    raise TypeError(f"unknown model call {type(call).__name__}")
