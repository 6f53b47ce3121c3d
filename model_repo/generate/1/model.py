"""Triton python-backend model `generate`: the sampling loop over BLS calls, many requests in flight.

Decoupled with `async def execute`: the stub runs each call as a coroutine on its event loop and
returns at once, so one instance holds many requests, each awaiting its own unet step. The loop
itself is service.engine.sampling.generation, the same one the in-process engine runs; here each
of its model calls is a BLS call (service.triton.bls.execute_call).
"""

import asyncio
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from service.engine.sampling import GenerationSpec, ModelFacts, generation, run_async
from service.triton.bls import execute_call, strings
from service.triton.library import configure_torch, decode_adapters, model_dir_from_env, status_message

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _spec(request) -> tuple[GenerationSpec, float, bool]:
    def get(name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy().reshape(-1)[0]

    spec = GenerationSpec(
        prompt=get("PROMPT").decode(),
        negative_prompt=get("NEGATIVE_PROMPT").decode(),
        steps=int(get("STEPS")),
        guidance_scale=float(get("GUIDANCE_SCALE")),
        width=int(get("WIDTH")),
        height=int(get("HEIGHT")),
        seed=int(get("SEED")),
        num_images=int(get("NUM_IMAGES")),
        adapters=decode_adapters(get("ADAPTERS")),
        style_guidance_scale=float(get("STYLE_GUIDANCE_SCALE") or 0.0),
    )
    if spec.steps < 1 or spec.num_images < 1 or spec.width < 1 or spec.height < 1:
        raise ValueError("STEPS, NUM_IMAGES, WIDTH and HEIGHT must be positive")
    timeout, progress = get("TIMEOUT_S"), get("PROGRESS")
    return spec, float(timeout) if timeout else 0.0, bool(progress)


class TritonPythonModel:
    def initialize(self, args):
        configure_torch()
        self.facts = ModelFacts.from_dir(model_dir_from_env())

    async def execute(self, requests):
        await asyncio.gather(*(self._generate(r) for r in requests))

    async def _generate(self, request):
        sender = request.get_response_sender()
        try:
            spec, timeout, progress = _spec(request)
            deadline = time.monotonic() + timeout if timeout else None

            def should_stop():
                return request.is_cancelled() or (deadline is not None and time.monotonic() >= deadline)

            def on_step(info):
                if progress:
                    sender.send(pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("STEP", np.array([info.step], dtype=np.int32)),
                        pb_utils.Tensor("BATCH_SIZE", np.array([info.batch_size], dtype=np.int32)),
                        pb_utils.Tensor("QUEUE_US", np.array([int(info.queue_seconds * 1e6)], dtype=np.int64)),
                    ]))

            out = await run_async(generation(spec, self.facts, should_stop, on_step), execute_call)
            steps = out.steps
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("IMAGES", out.images),
                pb_utils.Tensor("SEEDS", np.array(out.seeds, dtype=np.int64)),
                pb_utils.Tensor("TIMINGS", strings([json.dumps(out.timings)])),
                pb_utils.Tensor("STEP_BATCH_SIZES", np.array([s.batch_size for s in steps], dtype=np.int32)),
                pb_utils.Tensor("STEP_QUEUE_US", np.array([int(s.queue_seconds * 1e6) for s in steps], dtype=np.int64)),
            ]), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - every failure ends this request's stream with its status
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(status_message(exc))), flags=FINAL)
