"""Triton python-backend model `text_encoder`: a thin wrapper over service.triton.library.TextEncode."""

import triton_python_backend_utils as pb_utils
from prometheus_client import CollectorRegistry

from service.triton.library import BankMetrics, TextEncode, decode_adapters, load_engine_from_env, status_message


class TritonPythonModel:
    def initialize(self, args):
        registry = CollectorRegistry()  # this instance's bank series, exported through Triton below
        engine = load_engine_from_env(args, max_rows=64, registry=registry)
        self.encode = TextEncode(engine)
        self.bank_metrics = BankMetrics(pb_utils, engine, registry, args) if hasattr(engine.adapters, "manager") else None

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prompts = [p.decode() for p in pb_utils.get_input_tensor_by_name(request, "PROMPTS").as_numpy()]
                rows = [decode_adapters(a) for a in pb_utils.get_input_tensor_by_name(request, "ADAPTERS").as_numpy()]
                embeds = self.encode(prompts, rows)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("EMBEDS", embeds)]))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(status_message(exc))))
        if self.bank_metrics is not None:
            self.bank_metrics.update()
        return responses
