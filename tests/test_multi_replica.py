"""Two gateway replicas on one real PostgreSQL and one shared data folder (the stand-in for a
ReadWriteMany volume), each its own process (`python -m service serve`):

- an adapter imported through one replica is listed, used by Generate, and deleted through the other,
  and stays invisible to another tenant on both;
- a Personalize job whose runner is killed (SIGKILL, mid-training, after a checkpoint) is taken over
  by the other replica once its lease expires, resumes from the checkpoint and succeeds; its adapter
  is served by the survivor.
"""

from __future__ import annotations

import hashlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.engine.default_model import default_model_dir
from service.stores import open_database
from tests.adapter_files import lora_file
from tests.conftest import auth
from tests.postgres_server import wait_until
from tests.test_crash_safety import GatewayProcess, personalize_request, wait_finished

pytestmark = pytest.mark.slow

LEASE_S = 3.0


@pytest.fixture(scope="module")
def model_dir(model_cache):
    return default_model_dir(model_cache)


@pytest.fixture
def replicas(postgres, tmp_path, model_dir):
    url = postgres.new_database()
    env = {"STEERSERVE_DATABASE_URL": url, "STEERSERVE_JOB_LEASE_S": str(LEASE_S),
           "STEERSERVE_JOB_POLL_INTERVAL_S": "0.5"}
    shared = tmp_path / "shared-volume"
    with ThreadPoolExecutor(2) as pool:  # both start at once: they migrate the schema together
        started = list(pool.map(lambda _: GatewayProcess(shared, model_dir, env=env), range(2)))
    try:
        yield url, shared, started
    finally:
        for gateway in started:
            gateway.stop()


def test_replicas_share_adapters(replicas, model_dir):
    url, shared, (a, b) = replicas
    blob = lora_file(model_dir, rank=4, seed=3)
    imported = a.stub.ImportAdapter(pb.ImportAdapterRequest(name="shared-dog", safetensors=blob), metadata=auth())
    # B sees it, and serves it (B loads the blob from the shared folder by its content hash).
    assert [x.adapter_id for x in b.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters] == [
        imported.adapter_id]
    out = b.stub.Generate(pb.GenerateRequest(prompt="a photo", steps=2, seed=1,
                                             adapters=[pb.AdapterRef(adapter_id=imported.adapter_id)]),
                          metadata=auth(), timeout=120)
    assert len(out.images) == 1
    # Another tenant: NOT_FOUND on both replicas.
    for gateway in (a, b):
        with pytest.raises(grpc.RpcError) as err:
            gateway.stub.GetAdapter(pb.GetAdapterRequest(adapter_id=imported.adapter_id), metadata=auth("token-bob"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The name is taken on both: a second import of it through B is refused.
    with pytest.raises(grpc.RpcError) as err:
        b.stub.ImportAdapter(pb.ImportAdapterRequest(name="shared-dog", safetensors=blob), metadata=auth())
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Deleted through B: gone for A, and its file gone from the shared folder.
    b.stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=imported.adapter_id), metadata=auth())
    with pytest.raises(grpc.RpcError) as err:
        a.stub.GetAdapter(pb.GetAdapterRequest(adapter_id=imported.adapter_id), metadata=auth())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    sha = hashlib.sha256(blob).hexdigest()
    assert not list((shared / "adapters").rglob(f"{sha}*"))


def _row(url: str, job_id: str):
    return open_database(url).connect().execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()


def test_a_killed_runners_job_is_taken_over_and_finishes(replicas):
    url, shared, gateways = replicas
    job = gateways[0].stub.Personalize(personalize_request("taken-over", steps=60), metadata=auth())
    # Whichever replica claimed it (normally the one that accepted it) is killed once a checkpoint
    # is on the shared volume, mid-training.
    row = wait_until(lambda: (r := _row(url, job.job_id)) is not None and r["checkpoint_step"] >= 2 and r,
                     timeout=180, interval=0.05, what="a checkpoint of the running job")
    assert row["state"] == "RUNNING" and row["step"] < 60, dict(row)
    first_owner = row["lease_owner"]
    pid = int(first_owner.split(":")[1])
    [victim] = [g for g in gateways if g.proc.pid == pid]
    [survivor] = [g for g in gateways if g is not victim]
    os.kill(pid, signal.SIGKILL)
    assert victim.killed()

    finished = wait_finished(survivor.stub, job.job_id, timeout=300)
    assert finished.state == pb.SUCCEEDED, finished
    assert "resumed from step" in finished.message, finished.message
    resumed_from = int(finished.message.split("resumed from step ")[1].split(";")[0])
    assert resumed_from >= 2
    row = _row(url, job.job_id)
    # One more attempt, by the survivor, after the dead runner's lease ran out (not before).
    assert row["attempts"] == 2 and row["lease_owner"] == ""
    survivor_log = survivor.log.read_text()
    assert f"taken over from runner {first_owner}" in survivor_log
    # The adapter is registered once, its blob on the shared volume, and the survivor serves it.
    [adapter] = survivor.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters
    assert adapter.adapter_id == finished.adapter_id
    out = survivor.stub.Generate(pb.GenerateRequest(prompt=f"a {finished.token} circle", steps=2, seed=0,
                                                    adapters=[pb.AdapterRef(adapter_id=adapter.adapter_id)]),
                                 metadata=auth(), timeout=120)
    assert len(out.images) == 1
    blobs = [p for p in (shared / "adapters").rglob("*") if p.is_file()]
    assert [p.name for p in blobs] == [f"{adapter.sha256}.safetensors"]
    assert hashlib.sha256(blobs[0].read_bytes()).hexdigest() == adapter.sha256
    # Its checkpoint is gone with the job.
    assert not list((shared / "checkpoints").glob(f"{job.job_id}*"))


def test_a_job_survives_the_database_dropping_every_connection(replicas):
    """PostgreSQL restarts or a proxy cuts idle connections mid-training: the runner reconnects, the
    job is not failed for it."""
    import psycopg

    url, _, gateways = replicas
    job = gateways[0].stub.Personalize(personalize_request("db-blip", steps=60), metadata=auth())
    wait_until(lambda: (r := _row(url, job.job_id)) is not None and r["state"] == "RUNNING" and r["step"] >= 2,
               timeout=180, interval=0.05, what="the job training")
    with psycopg.connect(url, autocommit=True) as conn:
        killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    assert len(killed) >= 2  # both gateways' connections
    finished = wait_finished(gateways[0].stub, job.job_id, timeout=300)
    assert finished.state == pb.SUCCEEDED, finished
