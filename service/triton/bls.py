"""BLS: the edit loops' model calls (`Encode`, `Denoise`, `Decode`) as calls to the shared
text_encoder / unet / vae_decode models, from inside the `edit` python-backend model (`generate`
runs its loops' calls on its own engine, no BLS); and the pb_utils tensor helpers every model uses.
Importable only inside Triton's python backend (triton_python_backend_utils)."""

import triton_python_backend_utils as pb_utils

from service.engine.sampling import Decode, Denoise, Encode
from service.triton import wire


def tensors(message: wire.Tensors) -> list:
    """A wire message as pb_utils tensors."""
    return [pb_utils.Tensor(name, value) for name, value in message.items()]


def request_reader(request) -> wire.Get:
    """wire's `get` over a request's input tensors."""
    def get(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    return get


async def _call(model: str, message: wire.Tensors) -> wire.Get:
    response = await pb_utils.InferenceRequest(
        model_name=model, inputs=tensors(message), requested_output_names=wire.CALL_OUTPUTS[model]
    ).async_exec()
    if response.has_error():
        raise wire.RemoteError(response.error().message())

    def get(name):
        tensor = pb_utils.get_output_tensor_by_name(response, name)
        return None if tensor is None else tensor.as_numpy()

    return get


async def execute_call(call):
    """One model call of an edit loop, as a BLS call to the model that computes it."""
    if isinstance(call, Encode):
        return wire.read_embeds(await _call(wire.TEXT_ENCODER, wire.encode_call(call)))
    if isinstance(call, Denoise):
        return wire.read_noise(await _call(wire.UNET, wire.denoise_call(call)))
    if isinstance(call, Decode):
        return wire.read_images(await _call(wire.VAE_DECODE, wire.decode_call(call)))
    raise TypeError(f"unknown model call {type(call).__name__}")
