"""Authentication and tenant isolation."""

from __future__ import annotations

import grpc
import pytest

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from tests.adapter_files import lora_file, served_model_dir
from tests.conftest import auth


@pytest.mark.parametrize(
    "metadata, needle",
    [
        ([], "missing"),
        ([("authorization", "Bearer nope")], "unknown"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "Bearer"),
        ([("authorization", "Bearer ")], "Bearer"),
    ],
)
def test_missing_or_unknown_token_is_unauthenticated(gateway, metadata, needle):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub().ListAdapters(pb.ListAdaptersRequest(), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert needle in err.value.details()


def test_tenant_sees_only_its_own_adapters(gateway):
    stub = gateway.stub()
    alice = stub.ImportAdapter(
        pb.ImportAdapterRequest(name="alice-style", safetensors=lora_file(served_model_dir(gateway))), metadata=auth("token-alice")
    )
    ids_alice = [a.adapter_id for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth("token-alice")).adapters]
    ids_bob = [a.adapter_id for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth("token-bob")).adapters]
    assert alice.adapter_id in ids_alice
    assert alice.adapter_id not in ids_bob

    # Every way bob could reach alice's adapter answers NOT_FOUND, exactly like a made-up id.
    calls = [
        lambda: stub.GetAdapter(pb.GetAdapterRequest(adapter_id=alice.adapter_id), metadata=auth("token-bob")),
        lambda: stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=alice.adapter_id), metadata=auth("token-bob")),
        lambda: stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=alice.adapter_id), metadata=auth("token-bob")),
        lambda: stub.Generate(
            pb.GenerateRequest(prompt="x", steps=1, adapters=[pb.AdapterRef(adapter_id=alice.adapter_id)]),
            metadata=auth("token-bob"),
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert alice.adapter_id in err.value.details()
    # ... and alice's adapter survived bob's delete attempt.
    assert stub.GetAdapter(pb.GetAdapterRequest(adapter_id=alice.adapter_id), metadata=auth("token-alice")).name == "alice-style"


def test_jobs_are_tenant_scoped(gateway):
    store = gateway.gateway.servicer.job_store
    job = store.create("alice", "DREAMBOOTH_LORA", "j", 10, b"")
    stub = gateway.stub()
    assert stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=auth("token-alice")).job_id == job.job_id
    for call in (stub.GetJob, stub.CancelJob):
        req = pb.GetJobRequest(job_id=job.job_id) if call is stub.GetJob else pb.CancelJobRequest(job_id=job.job_id)
        with pytest.raises(grpc.RpcError) as err:
            call(req, metadata=auth("token-bob"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert job.job_id not in [j.job_id for j in stub.ListJobs(pb.ListJobsRequest(), metadata=auth("token-bob")).jobs]
