"""Tenant isolation for every RPC that takes an id, and per-tenant adapter quotas."""

from __future__ import annotations

import hashlib
import time

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.stores import AdapterStore, QuotaExceeded, blob_path_for, open_database
from tests.adapter_files import lora_file, served_model_dir
from tests.conftest import TOKENS, auth, start_gateway_in_thread, stop_gateway


def png(size: int = 64) -> pb.Image:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buf, format="PNG")
    return pb.Image(data=buf.getvalue(), width=size, height=size, mime_type="image/png")


def _ids_in(message_descriptor, seen=()) -> bool:
    """Whether a request message carries an id field, directly or in a nested message."""
    for field in message_descriptor.fields:
        if field.name.endswith("_id"):
            return True
        if field.message_type is not None and field.message_type not in seen:
            if _ids_in(field.message_type, (*seen, message_descriptor)):
                return True
    return False


def isolation_calls(stub, adapter_id: str, job_id: str) -> dict:
    """How bob could name alice's adapter or job, per RPC."""
    bob = auth("token-bob")
    return {
        "Generate": lambda: stub.Generate(pb.GenerateRequest(prompt="x", steps=1, adapters=[
            pb.AdapterRef(adapter_id=adapter_id)]), metadata=bob),
        "Edit": lambda: stub.Edit(pb.EditRequest(source_image=png(), source_prompt="a", target_prompt="a sks thing",
                                                 adapter_id=adapter_id, steps=1, method=pb.DDS), metadata=bob),
        "EditStream": lambda: list(stub.EditStream(pb.EditRequest(
            source_image=png(), source_prompt="a", target_prompt="a sks thing", adapter_id=adapter_id, steps=1,
            method=pb.DDS),
            metadata=bob)),
        "WatchJob": lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=bob, timeout=10)),
        "GetJob": lambda: stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=bob),
        "CancelJob": lambda: stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=bob),
        "GetAdapter": lambda: stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), metadata=bob),
        "DeleteAdapter": lambda: stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=adapter_id), metadata=bob),
        "ExportAdapter": lambda: stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=adapter_id), metadata=bob),
    }


def test_every_rpc_that_takes_an_id_answers_not_found_for_another_tenants_and_changes_nothing(gateway):
    stub = gateway.stub()
    alice = auth("token-alice")
    adapter = stub.ImportAdapter(pb.ImportAdapterRequest(name="iso-alice", token="sks",
                                                         safetensors=lora_file(served_model_dir(gateway))),
                                 metadata=alice)
    # A job of alice's that some other replica is running (held for an hour): this gateway's own
    # runner, which claims any ready job in the store, leaves it alone. Created and claimed in one
    # transaction, so no poll of the runner can come in between.
    jobs = gateway.gateway.servicer.job_store
    with jobs.db.transaction():
        job = jobs.create("alice", "DREAMBOOTH_LORA", "iso-job", 10, b"")
        jobs.update(job.job_id, state="RUNNING", lease_owner="another-replica", lease_expires_at=time.time() + 3600)
    calls = isolation_calls(stub, adapter.adapter_id, job.job_id)
    service = pb.DESCRIPTOR.services_by_name["SteerServe"]
    with_ids = {m.name for m in service.methods if _ids_in(m.input_type)}
    assert with_ids == set(calls), "an RPC that takes an id is missing from the isolation matrix"
    before = (stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter.adapter_id), metadata=alice),
              stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=adapter.adapter_id), metadata=alice).safetensors,
              stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=alice))
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, (name, err.value.details())
        assert adapter.adapter_id in err.value.details() or job.job_id in err.value.details(), name
    after = (stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter.adapter_id), metadata=alice),
             stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=adapter.adapter_id), metadata=alice).safetensors,
             stub.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=alice))
    assert before == after  # bob's delete and cancel changed nothing


def test_adapter_count_quota_per_tenant(tmp_path, model_cache):
    from service.config import Settings

    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0, api_keys=dict(TOKENS),
                        data_dir=tmp_path, tenant_max_adapters=2)
    running = start_gateway_in_thread(settings)
    try:
        stub = running.stub()
        data = lora_file(served_model_dir(running))
        for i in range(2):
            stub.ImportAdapter(pb.ImportAdapterRequest(name=f"q{i}", safetensors=data), metadata=auth())
        with pytest.raises(grpc.RpcError) as err:
            stub.ImportAdapter(pb.ImportAdapterRequest(name="q2", safetensors=data), metadata=auth())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2" in err.value.details()
        # A personalization job would make a third: refused when it is asked for, not when it ends.
        with pytest.raises(grpc.RpcError) as err:
            stub.Personalize(pb.PersonalizeRequest(method=pb.DREAMBOOTH_LORA, name="q3", class_word="circle",
                                                   images=[png()] * 3), metadata=auth())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "adapter quota" in err.value.details()
        # The quota is per tenant: bob still imports.
        stub.ImportAdapter(pb.ImportAdapterRequest(name="q0", safetensors=data), metadata=auth("token-bob"))
        # Deleting frees a place.
        first = stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters[0]
        stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=first.adapter_id), metadata=auth())
        stub.ImportAdapter(pb.ImportAdapterRequest(name="q2", safetensors=data), metadata=auth())
        registered = [a for token in ("token-alice", "token-bob")
                      for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth(token)).adapters]
    finally:
        stop_gateway(running)
    # Exactly the registered adapters' blobs (identical bytes share one): nothing of the refused
    # imports, no temp file.
    assert len(registered) == 3  # alice's 2 + bob's 1
    files = {p.relative_to(tmp_path / "adapters").as_posix() for p in (tmp_path / "adapters").rglob("*") if p.is_file()}
    assert files == {blob_path_for(a.sha256) for a in registered}


def test_adapter_bytes_quota_refuses_before_writing(tmp_path):
    store = AdapterStore(open_database(tmp_path / "db.sqlite3"), tmp_path / "blobs", max_bytes=1000)
    store.create("alice", "a", "IMPORT", b"a" * 600)
    with pytest.raises(QuotaExceeded, match="would exceed this tenant's 1000 bytes"):
        store.create("alice", "b", "IMPORT", b"b" * 600)
    store.create("bob", "b", "IMPORT", b"c" * 600)
    assert [r.name for r in store.list("alice")] == ["a"]
    stored = sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file())
    assert stored == sorted(f"{hashlib.sha256(b * 600).hexdigest()}.safetensors" for b in (b"a", b"c"))


def test_adapter_count_quota_counts_jobs_in_progress_once(tmp_path):
    """One rule in one place (AdapterStore.check_quota): stored adapters + the tenant's queued or
    running jobs; a job's own adapter takes the place its job held."""
    from service.stores import JobStore

    db = open_database(tmp_path / "db.sqlite3")
    store, jobs = AdapterStore(db, tmp_path / "blobs", max_adapters=2), JobStore(db)
    store.create("alice", "a", "IMPORT", b"a" * 10)
    job = jobs.create("alice", "DREAMBOOTH_LORA", "j", 10, b"")
    jobs.create("bob", "DREAMBOOTH_LORA", "j", 10, b"")  # another tenant's job holds no place of alice's
    with pytest.raises(QuotaExceeded, match="1 adapters and 1 personalization jobs"):
        store.create("alice", "b", "IMPORT", b"b" * 10)
    with db.transaction() as conn, pytest.raises(QuotaExceeded):
        store.check_quota(conn, "alice")  # a second job would not fit either
    store.create("alice", "j", "DREAMBOOTH_LORA", b"j" * 10, for_job=job.job_id)  # the job's own adapter fits
    assert sorted(r.name for r in store.list("alice")) == ["a", "j"]
