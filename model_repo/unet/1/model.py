"""Triton python-backend model `unet`: one denoising step for a dynamic batch of requests (the
edit loops' steps, as BLS calls from `edit`; `generate` runs its own UNet).

A thin wrapper over service.triton.parts.UNetStep (tensors: service/triton/wire.py); see
config.pbtxt for why one call is one step.
"""

import json
import time

import triton_python_backend_utils as pb_utils
from prometheus_client import CollectorRegistry

from service.compiled.configure import runtime_status
from service.triton import wire
from service.triton.bank_metrics import BankMetrics
from service.triton.bls import request_reader, tensors
from service.triton.parts import UNetStep, instance_engine, instance_settings, instance_share
from service.triton.runtime_metrics import RuntimeInfoMetric


class TritonPythonModel:
    def initialize(self, args):
        max_batch = json.loads(args["model_config"])["max_batch_size"]
        registry = CollectorRegistry()  # this instance's bank series, exported through Triton below
        settings = instance_settings()
        engine = instance_engine(settings, args, max_rows=max_batch, unet_runtime=True, registry=registry)
        self.share = instance_share(settings, args)  # edits' steps: serving first, training in the gaps
        self.step = UNetStep(engine)
        self.bank_metrics = BankMetrics(pb_utils, engine, registry, args) if engine.adapters.manager is not None else None
        self.runtime_info = RuntimeInfoMetric(pb_utils, engine, args)
        pb_utils.Logger.log_info(runtime_status(engine))

    def execute(self, requests):
        with self.share.serving():
            return self._execute(requests)

    def _execute(self, requests):
        try:
            samples = [wire.read_denoise_call(request_reader(r)) for r in requests]
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
        self.runtime_info.update()
        return [self._response(r) for r in results]

    def _alone(self, request):
        try:
            sample = wire.read_denoise_call(request_reader(request))
            started = time.perf_counter()
            (noise,) = self.step([sample])
            return noise, sample.latents.shape[0], time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001
            return exc

    @staticmethod
    def _response(result):
        if isinstance(result, Exception):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(wire.status_message(result)))
        return pb_utils.InferenceResponse(output_tensors=tensors(wire.noise_result(*result)))

    def finalize(self):
        if self.share.state is not None:
            self.share.state.close()
