"""Triton python-backend model `personalize`: one training job per request, streamed progress.

Decoupled: execute() hands each request to this instance's training thread and returns; the
thread sends a response per step, per checkpoint, and the adapter at the end. The training itself
is service.triton.parts.Personalize (service.personalize underneath), the same code the
in-process backend runs. Tensors: service/triton/wire.py.
"""

from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from service.triton import wire
from service.triton.bls import request_reader, tensors
from service.triton.parts import Personalize, instance_device, instance_settings, model_dir

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _StreamedProgress:
    """personalize.Progress that answers with responses on the request's stream."""

    def __init__(self, request, sender):
        self.request, self.sender = request, sender

    def step(self, step, total, loss):
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors(wire.training_step(step, loss))))

    def checkpoint(self, step, state):
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors(wire.training_checkpoint(step, state))))

    def should_stop(self):
        return self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        self.personalize = Personalize(model_dir(instance_settings()), instance_device(args))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personalize")

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._train, request)
        return None

    def _train(self, request):
        sender = request.get_response_sender()
        try:
            spec, resume = wire.read_training_request(request_reader(request))
            adapter = self.personalize(spec, resume, _StreamedProgress(request, sender))
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors(wire.training_result(adapter))), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with its status
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(wire.status_message(exc))), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
