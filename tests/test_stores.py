"""The SQLite + blob stores: atomic writes, checksums, tenancy, durable jobs."""

from __future__ import annotations

import threading

import pytest

from service.stores import AdapterAlreadyExists, AdapterStore, BlobCorrupted, JobState, JobStore, NotFound, open_database


@pytest.fixture
def stores(tmp_path):
    db = open_database(tmp_path / "db.sqlite3")
    return AdapterStore(db, tmp_path / "blobs"), JobStore(db), tmp_path


def test_adapter_roundtrip_and_checksum(stores):
    adapters, _, root = stores
    rec = adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"weights", token="<sks>", rank=4)
    assert adapters.get("t1", rec.adapter_id) == rec
    assert adapters.read_blob(rec) == b"weights"
    assert rec.size_bytes == 7 and len(rec.sha256) == 64
    # No temp files are left beside the blob.
    assert [p.name for p in adapters.blob_path(rec).parent.iterdir()] == [f"{rec.adapter_id}.safetensors"]
    adapters.blob_path(rec).write_bytes(b"weightz")  # bit rot on disk
    with pytest.raises(BlobCorrupted):
        adapters.read_blob(rec)


def test_adapter_tenancy_and_names(stores):
    adapters, _, _ = stores
    rec = adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"x")
    with pytest.raises(NotFound):
        adapters.get("t2", rec.adapter_id)
    with pytest.raises(NotFound):
        adapters.delete("t2", rec.adapter_id)
    assert adapters.list("t2") == []
    with pytest.raises(AdapterAlreadyExists):
        adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"y")
    adapters.create("t2", "dog", "DREAMBOOTH_LORA", b"y")  # names are per tenant
    adapters.delete("t1", rec.adapter_id)
    assert not adapters.blob_path(rec).exists()
    with pytest.raises(NotFound):
        adapters.get("t1", rec.adapter_id)


def test_failed_registration_leaves_no_blob(stores, monkeypatch):
    adapters, _, root = stores
    adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"x")
    before = sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())
    with pytest.raises(AdapterAlreadyExists):
        adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"second")
    assert sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file()) == before


def test_concurrent_creates_with_one_name_register_once(stores):
    adapters, _, _ = stores
    errors, done = [], []

    def create(i):
        try:
            done.append(adapters.create("t1", "same", "DREAMBOOTH_LORA", bytes([i])))
        except AdapterAlreadyExists as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(done) == 1 and len(errors) == 7
    assert len(adapters.list("t1")) == 1


def test_jobs_progress_finish_and_requeue(stores, tmp_path):
    _, jobs, root = stores
    job = jobs.create("t1", "DREAMBOOTH_LORA", "dog", 100, b"req")
    assert job.state == JobState.QUEUED and job.progress == 0
    job = jobs.update(job.job_id, state="RUNNING", step=25, loss=0.5)
    assert job.progress == 0.25 and job.loss == 0.5
    # A process restart: RUNNING goes back to QUEUED, with its request kept.
    reopened = JobStore(open_database(root / "db.sqlite3"))
    queued = reopened.requeue_unfinished()
    assert [j.job_id for j in queued] == [job.job_id] and queued[0].request == b"req"
    done = reopened.update(job.job_id, state="SUCCEEDED", adapter_id="ad-1")
    assert done.progress == 1.0
    # A finished job never changes again (e.g. a late cancel).
    assert reopened.update(job.job_id, state="CANCELLED").state == JobState.SUCCEEDED
    with pytest.raises(NotFound):
        jobs.get("t2", job.job_id)
