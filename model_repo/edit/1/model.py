"""Triton python-backend model `edit`: DDS and DreamSteerer edits, many in flight.

Decoupled with `async def execute`, like `generate`. The edit loop is service.edit's (the one the
in-process backend runs); service.triton.parts.EditWorker decides where each model call runs:
stored-adapter rows as BLS calls to the shared text_encoder / unet / vae_decode models (the same
service.triton.bls.execute_call the generate model uses), DreamSteerer's model-internal steps and
the steered copy's rows on this instance. Tensors: service/triton/wire.py.
"""

import asyncio
import time

import triton_python_backend_utils as pb_utils

from service.edit.workbench import Workbench
from service.personalize import FrozenBase
from service.triton import wire
from service.triton.bls import execute_call, request_reader, tensors
from service.triton.parts import EditWorker, instance_device, instance_engine, instance_settings, model_dir

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Rows of one local UNet call: an edit's four DDS rows, or a steered prompt's encodings.
LOCAL_MAX_ROWS = 16


class TritonPythonModel:
    def initialize(self, args):
        settings = instance_settings()
        engine = instance_engine(settings, args, max_rows=LOCAL_MAX_ROWS)
        base = FrozenBase.from_pretrained(model_dir(settings), device=instance_device(args))
        self.worker = EditWorker(engine, Workbench(base))
        self.remote = execute_call

    async def execute(self, requests):
        await asyncio.gather(*(self._edit(r) for r in requests))

    async def _edit(self, request):
        sender = request.get_response_sender()
        try:
            spec, timeout, streamed = wire.read_edit_request(request_reader(request))
            deadline = time.monotonic() + timeout if timeout else None

            def should_stop():
                return request.is_cancelled() or (deadline is not None and time.monotonic() >= deadline)

            def on_progress(phase, step, total):  # already throttled by the worker
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors(wire.edit_progress(phase, step, total))))

            out = await self.worker(spec, self.remote, should_stop, on_progress if streamed else None)
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors(wire.edit_result(out))), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with its status
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(wire.status_message(exc))), flags=FINAL)
