"""Triton python-backend model `vae_decode`: a thin wrapper over service.triton.parts.VaeDecode."""

import triton_python_backend_utils as pb_utils

from service.triton import wire
from service.triton.bls import request_reader, tensors
from service.triton.parts import VaeDecode, instance_engine, instance_settings


class TritonPythonModel:
    def initialize(self, args):
        # The decoder never applies adapters; no bank needed.
        self.decode = VaeDecode(instance_engine(instance_settings(), args, max_rows=1, adapters=False,
                                                    components=("vae",)))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = self.decode(wire.read_decode_call(request_reader(request)))
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors(wire.images_result(images))))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(wire.status_message(exc))))
        return responses
