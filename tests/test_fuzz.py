"""Property-based fuzzing of every RPC (a fast subset; the long run is `python -m bench.fuzz_rpcs`):
whatever the request -- NaN/inf, huge or negative numbers, unknown enums, unicode, oversized or
malformed images and safetensors, pickles, wrong or missing tokens -- the answer is a deliberate
status (never INTERNAL or UNKNOWN) and the server keeps serving."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.config import Settings
from tests.adapter_files import lora_file, served_model_dir
from tests.conftest import TOKENS, auth, start_gateway_in_thread, stop_gateway
from tests.rpc_fuzz import SERVICE, call, message_strategy, metadata_for, tokens

EXAMPLES = 20


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A gateway of its own (fuzzed jobs and adapters stay out of other tests' data), its stub and a
    real LoRA file for the byte strategies."""
    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0, api_keys=dict(TOKENS),
                        data_dir=tmp_path_factory.mktemp("fuzz-data"), default_steps=2, max_steps=8, max_size=128,
                        max_edit_iterations=8, max_steer_steps=4)
    running = start_gateway_in_thread(settings)
    yield running, running.stub(), lora_file(served_model_dir(running))
    stop_gateway(running)


def cancel_jobs(stub):
    """A fuzzed Personalize that happened to be valid must not keep the CPU busy for the rest."""
    for token in ("token-alice", "token-bob"):
        for job in stub.ListJobs(pb.ListJobsRequest(), metadata=auth(token)).jobs:
            if job.state in (pb.QUEUED, pb.RUNNING):
                stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=auth(token))


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_any_request_gets_a_deliberate_status(fuzzed, method):
    running, stub, lora = fuzzed
    requests = message_strategy(method.input_type, lora)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(request=requests, token=tokens())
    def check(request, token):
        call(stub, method, request, metadata_for(token), timeout=10.0)

    try:
        check()
    finally:
        cancel_jobs(stub)
    # Still serving.
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=auth(), timeout=30).backend == "inprocess"
