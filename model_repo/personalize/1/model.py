"""Triton python-backend model `personalize`: one training job per request, streamed progress.

Decoupled: execute() hands each request to this instance's training thread and returns; the
thread sends a response per step, per checkpoint, and the adapter at the end. The training itself
is service.triton.library.Personalize (service.personalize underneath), the same code the
in-process backend runs.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from service.triton.library import (
    Personalize,
    configure_torch,
    instance_device,
    model_dir_from_env,
    status_message,
    training_spec_from_wire,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _bytes(value: bytes) -> np.ndarray:
    return np.array([value], dtype=np.object_)


class _StreamedProgress:
    """personalize.Progress that answers with responses on the request's stream."""

    def __init__(self, request, sender):
        self.request, self.sender = request, sender

    def step(self, step, total, loss):
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("STEP", np.array([step], dtype=np.int32)),
            pb_utils.Tensor("LOSS", np.array([loss], dtype=np.float32)),
        ]))

    def checkpoint(self, step, state):
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("STEP", np.array([step], dtype=np.int32)),
            pb_utils.Tensor("CHECKPOINT", _bytes(state)),
        ]))

    def should_stop(self):
        return self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        configure_torch()
        self.personalize = Personalize(model_dir_from_env(), instance_device(args))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personalize")

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._train, request)
        return None

    def _train(self, request):
        sender = request.get_response_sender()
        try:
            def get(name):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy().reshape(-1)

            spec = training_spec_from_wire(get("SPEC")[0], list(get("IMAGES")))
            resume = get("RESUME")
            adapter = self.personalize(spec, bytes(resume[0]) if resume is not None else None,
                                       _StreamedProgress(request, sender))
            sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("ADAPTER", _bytes(adapter))]),
                        flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with its status
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(status_message(exc))), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
