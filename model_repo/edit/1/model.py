"""Triton python-backend model `edit`: DDS and DreamSteerer edits, many in flight.

Decoupled with `async def execute`, like `generate`. The edit loop is service.edit's (the one the
in-process backend runs); service.triton.parts.EditWorker decides where each model call runs:
stored-adapter rows as BLS calls to the shared text_encoder / unet / vae_decode models
(service.triton.bls.execute_call; the `generate` model makes no such calls, it runs its UNet
itself), DreamSteerer's model-internal steps on this instance's private model copy, and the
steered copy written to the request-adapter folder for the request, so its rows run in the shared
`unet` model too. Tensors: service/triton/wire.py.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from service.adapters.bank import CONV_LAYERS
from service.adapters.loading import adapter_checker
from service.edit.workbench import Workbench
from service.personalize import FrozenBase
from service.triton import wire
from service.triton.bls import execute_call, request_reader, tensors
from service.triton.parts import EditWorker, instance_device, instance_settings, model_dir

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        settings = instance_settings()
        adapter_dir = settings.adapters_path() if settings.adapter_dir is not None else None
        prepare = adapter_checker(model_dir(settings), settings.adapter_max_rank,
                                  conv_target_modules=CONV_LAYERS[settings.adapter_conv_layers])
        request_dir = settings.request_adapters_path() if adapter_dir is not None else None

        def load():
            # One model copy: the workbench's (DreamSteerer's steps, the source's VAE encoding).
            # Every UNet row, the steered copy's included, runs in the shared models.
            base = FrozenBase.from_pretrained(model_dir(settings), device=instance_device(args))
            return EditWorker(Workbench(base), adapter_dir, request_dir, prepare)

        # Loaded behind readiness (an SD-size copy takes tens of seconds on a CPU): the server is
        # ready without it, and an edit arriving first waits for it.
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="edit-load")
        self.worker = self.loader.submit(load)
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

            worker = await asyncio.wrap_future(self.worker)  # raises what loading the model raised
            out = await worker(spec, self.remote, should_stop, on_progress if streamed else None)
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors(wire.edit_result(out))), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with its status
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(wire.status_message(exc))), flags=FINAL)
