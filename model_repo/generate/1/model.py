"""Triton python-backend model `generate`: the sampling loop over BLS calls, many requests in flight.

Decoupled with `async def execute`: the stub runs each call as a coroutine on its event loop and
returns at once, so one instance holds many requests, each awaiting its own unet step. The loop
itself is service.engine.sampling.generation, the same one the in-process engine runs; here each
of its model calls is a BLS call (service.triton.bls.execute_call). Tensors: service/triton/wire.py.
"""

import asyncio
import time

import triton_python_backend_utils as pb_utils

from service.engine.sampling import ModelFacts, generation, run_async
from service.triton import wire
from service.triton.bls import execute_call, request_reader, tensors
from service.triton.parts import instance_settings, model_dir

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.facts = ModelFacts.from_dir(model_dir(instance_settings()))

    async def execute(self, requests):
        await asyncio.gather(*(self._generate(r) for r in requests))

    async def _generate(self, request):
        sender = request.get_response_sender()
        try:
            spec, timeout, progress = wire.read_generate_request(request_reader(request))
            deadline = time.monotonic() + timeout if timeout else None

            def should_stop():
                return request.is_cancelled() or (deadline is not None and time.monotonic() >= deadline)

            def on_step(info):
                if progress:
                    message = wire.generate_progress(info.step, info.batch_size, info.queue_seconds)
                    sender.send(pb_utils.InferenceResponse(output_tensors=tensors(message)))

            out = await run_async(generation(spec, self.facts, should_stop, on_step), execute_call)
            message = wire.generate_result(out.images, out.seeds, out.timings, out.steps)
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors(message)), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with its status
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(wire.status_message(exc))), flags=FINAL)
