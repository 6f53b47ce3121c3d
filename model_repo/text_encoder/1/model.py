"""Triton python-backend model `text_encoder`: a thin wrapper over service.triton.parts.TextEncode."""

import triton_python_backend_utils as pb_utils
from prometheus_client import CollectorRegistry

from service.triton import wire
from service.triton.bank_metrics import BankMetrics
from service.triton.bls import request_reader, tensors
from service.triton.parts import TextEncode, instance_engine, instance_settings


class TritonPythonModel:
    def initialize(self, args):
        registry = CollectorRegistry()  # this instance's bank series, exported through Triton below
        engine = instance_engine(instance_settings(), args, max_rows=64, registry=registry,
                                 components=("text_encoder",))
        self.encode = TextEncode(engine)
        self.bank_metrics = BankMetrics(pb_utils, engine, registry, args) if engine.adapters.manager is not None else None

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                embeds = self.encode(*wire.read_encode_call(request_reader(request)))
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors(wire.embeds_result(embeds))))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(wire.status_message(exc))))
        if self.bank_metrics is not None:
            self.bank_metrics.update()
        return responses
