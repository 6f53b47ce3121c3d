"""Triton python-backend model `edit`: DDS and DreamSteerer edits, many in flight.

Decoupled with `async def execute`, like `generate`. The edit loop is service.edit's (the one the
in-process backend runs); service.triton.library.EditWorker decides where each model call runs:
stored-adapter rows as BLS calls to the shared text_encoder / unet / vae_decode models (the same
service.triton.bls.execute_call the generate model uses), DreamSteerer's model-internal steps and the steered copy's
rows on this instance.
"""

import asyncio
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from service.edit.workbench import Workbench
from service.personalize import FrozenBase
from service.triton.bls import execute_call
from service.triton.library import (
    EditWorker, configure_torch, edit_spec_from_wire, instance_device, load_engine_from_env, model_dir_from_env,
    status_message,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Rows of one local UNet call: an edit's four DDS rows, or a steered prompt's encodings.
LOCAL_MAX_ROWS = 16
PROGRESS_SECONDS = 0.2


class TritonPythonModel:
    def initialize(self, args):
        configure_torch()
        device = instance_device(args)
        engine = load_engine_from_env(args, max_rows=LOCAL_MAX_ROWS)
        self.worker = EditWorker(engine, Workbench(FrozenBase.from_pretrained(model_dir_from_env(), device=device)))
        self.remote = execute_call

    async def execute(self, requests):
        await asyncio.gather(*(self._edit(r) for r in requests))

    async def _edit(self, request):
        sender = request.get_response_sender()
        try:
            def get(name):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            spec = edit_spec_from_wire(get("SPEC").reshape(-1)[0], get("SOURCE"))
            timeout, progress = get("TIMEOUT_S"), get("PROGRESS")
            deadline = time.monotonic() + float(timeout.reshape(-1)[0]) if timeout is not None and timeout.reshape(-1)[0] > 0 else None
            streamed = progress is not None and bool(progress.reshape(-1)[0])

            def should_stop():
                return request.is_cancelled() or (deadline is not None and time.monotonic() >= deadline)

            last = [0.0]

            def on_progress(phase, step, total):
                # At most ~5 responses a second (and the last step of every phase): the gateway
                # throttles EditStream's events the same way.
                now = time.monotonic()
                if streamed and (step >= total or now - last[0] >= PROGRESS_SECONDS):
                    last[0] = now
                    sender.send(pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("PHASE", np.array([phase.encode()], dtype=np.object_)),
                        pb_utils.Tensor("STEP", np.array([step], dtype=np.int32)),
                        pb_utils.Tensor("TOTAL", np.array([total], dtype=np.int32)),
                    ]))

            out = await self.worker(spec, self.remote, should_stop, on_progress)
            mask = out.mask.astype(np.float32) if out.mask is not None else np.zeros((0, 0), np.float32)
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("IMAGE", np.ascontiguousarray(out.image, dtype=np.uint8)),
                pb_utils.Tensor("MASK", mask),
                pb_utils.Tensor("TIMINGS", np.array([json.dumps(out.timings).encode()], dtype=np.object_)),
                pb_utils.Tensor("STEER_LOSSES", np.array([json.dumps(out.steer_losses).encode()], dtype=np.object_)),
            ]), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with its status
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(status_message(exc))), flags=FINAL)
