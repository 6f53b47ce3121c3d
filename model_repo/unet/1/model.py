"""Triton python-backend model `unet`: one denoising step for a dynamic batch of requests.

A thin wrapper over service.triton.library.UNetStep; see config.pbtxt for why one call is one step.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils
from prometheus_client import CollectorRegistry

from service.triton.library import BankMetrics, StepSample, UNetStep, decode_adapters, load_engine_from_env, status_message


def _sample(request) -> StepSample:
    def get(name):
        return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

    return StepSample(
        latents=get("LATENTS"),
        timesteps=get("TIMESTEP").reshape(-1),
        embeds=get("EMBEDS"),
        adapters=[decode_adapters(a) for a in get("ADAPTERS").reshape(-1)],
    )


class TritonPythonModel:
    def initialize(self, args):
        max_batch = json.loads(args["model_config"])["max_batch_size"]
        registry = CollectorRegistry()  # this instance's bank series, exported through Triton below
        engine = load_engine_from_env(args, max_rows=max_batch, unet_runtime=True, registry=registry)
        self.step = UNetStep(engine)
        self.bank_metrics = BankMetrics(pb_utils, engine, registry, args) if hasattr(engine.adapters, "manager") else None
        runtime = engine.unet_runtime
        pb_utils.Logger.log_info(
            f"UNet runtime {runtime.name} warmed up in {runtime.stats.warmup_seconds:.1f} s "
            f"(shapes {sorted(runtime.stats.shapes)})")

    def execute(self, requests):
        try:
            samples = [_sample(r) for r in requests]
            started = time.perf_counter()
            noise = self.step(samples)
            seconds = time.perf_counter() - started
            batch_size = sum(s.latents.shape[0] for s in samples)
            results = [(n, batch_size, seconds) for n in noise]
        except Exception:  # noqa: BLE001
            # One bad request (unknown adapter, odd shape) must not fail the others it was batched
            # with: run each alone so the error lands on its own request.
            results = [self._alone(r) for r in requests]
        if self.bank_metrics is not None:
            self.bank_metrics.update()
        return [self._response(r) for r in results]

    def _alone(self, request):
        try:
            sample = _sample(request)
            started = time.perf_counter()
            (noise,) = self.step([sample])
            return noise, sample.latents.shape[0], time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001
            return exc

    @staticmethod
    def _response(result):
        if isinstance(result, Exception):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(status_message(result)))
        noise, batch_size, seconds = result
        n = noise.shape[0]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("NOISE", noise),
            pb_utils.Tensor("BATCH_SIZE", np.full((n, 1), batch_size, dtype=np.int32)),
            pb_utils.Tensor("COMPUTE_US", np.full((n, 1), int(seconds * 1e6), dtype=np.int64)),
        ])
