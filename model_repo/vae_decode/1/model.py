"""Triton python-backend model `vae_decode`: a thin wrapper over service.triton.library.VaeDecode."""

import triton_python_backend_utils as pb_utils

from service.triton.library import VaeDecode, load_engine_from_env, status_message


class TritonPythonModel:
    def initialize(self, args):
        # The decoder never applies adapters; no bank needed.
        self.decode = VaeDecode(load_engine_from_env(args, max_rows=1, adapters=False))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = self.decode(pb_utils.get_input_tensor_by_name(request, "LATENTS").as_numpy())
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGES", images)]))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(status_message(exc))))
        return responses
