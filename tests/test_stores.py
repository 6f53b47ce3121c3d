"""The stores on both databases (SQLite and a real PostgreSQL): atomic writes, checksums,
content-addressed blobs, tenancy, durable jobs, leases, migrations."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from service.stores import (
    AdapterAlreadyExists, AdapterStore, BlobCorrupted, JobState, JobStore, LeaseLost, NotFound, open_database,
)
from service.stores.migrations import LATEST, SchemaTooNew, migrate, schema_version


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """The target open_database() takes: a SQLite path, or a fresh database on the real server."""
    if request.param == "sqlite":
        return tmp_path / "db.sqlite3"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def stores(database, tmp_path):
    db = open_database(database)
    return AdapterStore(db, tmp_path / "blobs"), JobStore(db), tmp_path


class Clock:
    """The lease clock a test moves by hand (JobStore(clock=...)): a lease runs out when the test
    says so, not when a sleep hopes it has."""

    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clocked(stores):
    """The job store of `stores` on a hand-driven lease clock, and that clock."""
    clock = Clock()
    return JobStore(stores[1].db, clock=clock), clock


def test_adapter_roundtrip_and_checksum(stores):
    adapters, _, root = stores
    rec = adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"weights", token="<sks>", rank=4)
    assert adapters.get("t1", rec.adapter_id) == rec
    assert adapters.read_blob(rec) == b"weights"
    assert rec.size_bytes == 7 and len(rec.sha256) == 64
    # No temp files are left beside the blob.
    assert [p.name for p in adapters.blob_path(rec).parent.iterdir()] == [f"{rec.sha256}.safetensors"]
    assert rec.blob == f"sha256/{rec.sha256[:2]}/{rec.sha256}.safetensors" and rec.key == rec.sha256
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


def test_jobs_progress_finish_and_requeue(stores, database):
    _, jobs, root = stores
    job = jobs.create("t1", "DREAMBOOTH_LORA", "dog", 100, b"req")
    assert job.state == JobState.QUEUED and job.progress == 0
    job = jobs.update(job.job_id, state="RUNNING", step=25, loss=0.5)
    assert job.progress == 0.25 and job.loss == 0.5
    # A process restart: RUNNING goes back to QUEUED, with its request kept.
    reopened = JobStore(open_database(database))
    queued = reopened.requeue_unfinished()
    assert [j.job_id for j in queued] == [job.job_id] and queued[0].request == b"req"
    done = reopened.update(job.job_id, state="SUCCEEDED", adapter_id="ad-1")
    assert done.progress == 1.0
    # A finished job never changes again (e.g. a late cancel).
    assert reopened.update(job.job_id, state="CANCELLED").state == JobState.SUCCEEDED
    with pytest.raises(NotFound):
        jobs.get("t2", job.job_id)


# -- content-addressed blobs -------------------------------------------------------------------------


def test_same_bytes_share_one_blob_until_the_last_row_goes(stores):
    adapters, _, root = stores
    a = adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"same weights")
    b = adapters.create("t2", "cat", "DREAMBOOTH_LORA", b"same weights")  # another tenant, same bytes
    assert a.blob == b.blob and a.adapter_id != b.adapter_id
    assert len([p for p in (root / "blobs").rglob("*") if p.is_file()]) == 1
    adapters.delete("t1", a.adapter_id)
    assert adapters.read_blob(b) == b"same weights"  # still there for t2
    adapters.delete("t2", b.adapter_id)
    assert [p for p in (root / "blobs").rglob("*") if p.is_file()] == []


def test_a_failed_create_keeps_a_blob_other_rows_use(stores):
    adapters, _, _ = stores
    a = adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"shared")
    with pytest.raises(AdapterAlreadyExists):
        adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"shared")
    assert adapters.read_blob(a) == b"shared"


def test_sweep_keeps_young_files_when_shared(stores):
    adapters, _, root = stores
    orphan = root / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62 + ".safetensors")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"written by another replica, row not committed yet")
    assert adapters.sweep(min_age_s=600) == [] and orphan.exists()
    assert adapters.sweep(min_age_s=0) == [orphan] and not orphan.exists()


def test_legacy_blobs_move_to_their_content_path(tmp_path):
    """A data folder from before content addressing: rows point at <tenant hash>/<id>.safetensors."""
    db = open_database(tmp_path / "db.sqlite3")
    adapters = AdapterStore(db, tmp_path / "blobs")
    rec = adapters.create("t1", "dog", "DREAMBOOTH_LORA", b"old weights")
    legacy = tmp_path / "blobs" / "0123456789abcdef" / f"{rec.adapter_id}.safetensors"
    legacy.parent.mkdir()
    adapters.blob_path(rec).rename(legacy)
    with db.transaction() as conn:
        conn.execute("UPDATE adapters SET blob=? WHERE adapter_id=?", (legacy.relative_to(tmp_path / "blobs").as_posix(),
                                                                    rec.adapter_id))
    reopened = AdapterStore(open_database(tmp_path / "db.sqlite3"), tmp_path / "blobs")
    moved = reopened.get("t1", rec.adapter_id)
    assert moved.blob == rec.blob and reopened.read_blob(moved) == b"old weights" and not legacy.exists()


# -- job leases --------------------------------------------------------------------------------------


def test_each_job_is_claimed_by_one_runner(stores, database):
    """Eight runners (threads with their own connections) race for five jobs: each job once."""
    _, jobs, _ = stores
    ids = {jobs.create("t1", "DREAMBOOTH_LORA", f"n{i}", 10, b"r").job_id for i in range(5)}
    claimed, lock = [], threading.Lock()

    def runner(i):
        store = JobStore(open_database(database))
        while (got := store.claim(f"runner-{i}", lease_s=60)) is not None:
            with lock:
                claimed.append((got[0].job_id, got[0].lease_owner))

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(j for j, _ in claimed) == sorted(ids)
    for job_id, owner in claimed:
        job = jobs.get_by_id(job_id)
        assert job.state == JobState.RUNNING and job.lease_owner == owner and job.attempts == 1


def test_an_expired_lease_is_taken_over_and_fences_the_old_runner(clocked):
    jobs, clock = clocked
    job = jobs.create("t1", "DREAMBOOTH_LORA", "dog", 10, b"r")
    first, previous = jobs.claim("dead-runner", lease_s=10)
    assert previous == "" and jobs.claim("other", lease_s=60) is None  # held: nothing to claim
    clock.advance(9.9)  # dead-runner stops renewing
    assert jobs.claim("other", lease_s=60) is None  # its lease still runs
    clock.advance(0.2)  # and now it is over
    second, previous = jobs.claim("other", lease_s=60)
    assert second.job_id == job.job_id and previous == "dead-runner" and second.attempts == 2
    with pytest.raises(LeaseLost):  # the presumed-dead runner wakes up: its writes are refused
        jobs.update(job.job_id, owner="dead-runner", step=9)
    with pytest.raises(LeaseLost):
        jobs.finish(job.job_id, "SUCCEEDED", owner="dead-runner")
    assert jobs.heartbeat("dead-runner", [job.job_id], 60)[job.job_id].lease_owner == "other"
    assert jobs.update(job.job_id, owner="other", step=3).step == 3
    assert jobs.finish(job.job_id, "SUCCEEDED", owner="other").state == JobState.SUCCEEDED


def test_heartbeat_renews_and_reports_a_cancellation(stores):
    _, jobs, _ = stores
    job = jobs.create("t1", "DREAMBOOTH_LORA", "dog", 10, b"r")
    claimed, _ = jobs.claim("me", lease_s=1)
    seen = jobs.heartbeat("me", [job.job_id], lease_s=60)[job.job_id]
    assert seen.lease_expires_at > claimed.lease_expires_at + 30
    jobs.finish(job.job_id, "CANCELLED", message="cancelled by the client")  # from any replica: no owner
    assert jobs.heartbeat("me", [job.job_id], lease_s=60)[job.job_id].state == JobState.CANCELLED


def test_released_job_waits_for_its_not_before(clocked):
    jobs, clock = clocked
    job = jobs.create("t1", "DREAMBOOTH_LORA", "dog", 10, b"r")
    jobs.claim("me", lease_s=60)
    jobs.release(job.job_id, "me", message="waiting to retry", retry_in_s=30)
    assert jobs.claim("me", lease_s=60) is None
    clock.advance(29.9)
    assert jobs.claim("me", lease_s=60) is None  # not before its time
    clock.advance(0.2)
    assert jobs.claim("me", lease_s=60)[0].attempts == 2


def test_queue_stats_are_store_wide(stores):
    _, jobs, _ = stores
    assert jobs.queue_stats() == (0, 0, 0.0)
    a = jobs.create("t1", "DREAMBOOTH_LORA", "a", 10, b"r")
    jobs.create("t2", "DREAMBOOTH_LORA", "b", 10, b"r")
    jobs.claim("me", lease_s=60)  # the oldest (a) runs
    queued, running, age = jobs.queue_stats()
    assert (queued, running) == (1, 1) and 0 <= age < 5
    jobs.finish(a.job_id, "SUCCEEDED", owner="me")
    assert jobs.queue_stats()[:2] == (1, 0)


# -- migrations --------------------------------------------------------------------------------------


def test_migrations_apply_once_and_refuse_a_newer_schema(database):
    db = open_database(database)
    assert schema_version(db) == LATEST and migrate(db) == []
    with db.transaction() as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (LATEST + 1, "from the future", 0.0))
    with pytest.raises(SchemaTooNew, match="newer than this build"):
        open_database(database)


def test_gateways_starting_together_migrate_once(postgres):
    url = postgres.new_database()
    errors = []

    def start():
        try:
            open_database(url)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    rows = open_database(url).connect().execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [r["version"] for r in rows] == list(range(1, LATEST + 1))


def test_a_database_from_before_migrations_is_adopted(tmp_path):
    """The first release made its tables with CREATE IF NOT EXISTS and no version table."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE jobs (job_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, method TEXT NOT NULL, name TEXT NOT NULL,
            state TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0, loss REAL,
            adapter_id TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '', request BLOB NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, token TEXT NOT NULL DEFAULT '');
        INSERT INTO jobs (job_id, tenant, method, name, state, request, created_at, updated_at)
            VALUES ('job-0123', 't1', 'DREAMBOOTH_LORA', 'dog', 'RUNNING', x'00', 1.0, 1.0);
    """)
    conn.close()
    jobs = JobStore(open_database(path))
    [job] = jobs.requeue_unfinished()
    assert job.job_id == "job-0123" and job.attempts == 0 and job.lease_owner == ""


def test_sweep_rechecks_under_the_lock_before_removing(stores, monkeypatch):
    """The sweep's snapshot of referenced blobs is old by the time it removes a file: a create of
    the same bytes may reuse the orphan file in between. The file must stay."""
    adapters, _, root = stores
    data = b"bytes first orphaned, then imported again"
    first = adapters.create("t1", "dog", "DREAMBOOTH_LORA", data)
    with adapters.db.transaction() as conn:  # a delete interrupted between its row and its file
        conn.execute("DELETE FROM adapters WHERE adapter_id=?", (first.adapter_id,))
    original = AdapterStore._remove_if_unreferenced
    raced = []

    def create_meanwhile(self, sha, path):
        if not raced:  # another replica registers the same bytes after the snapshot
            raced.append(adapters.create("t2", "cat", "DREAMBOOTH_LORA", data))
        return original(self, sha, path)

    monkeypatch.setattr(AdapterStore, "_remove_if_unreferenced", create_meanwhile)
    assert adapters.sweep(min_age_s=0) == []
    assert adapters.read_blob(raced[0]) == data


def test_a_runner_never_reclaims_its_own_expired_job(clocked):
    jobs, clock = clocked
    job = jobs.create("t1", "DREAMBOOTH_LORA", "dog", 10, b"r")
    jobs.claim("me", lease_s=10)
    clock.advance(10.1)  # my heartbeat is late: my lease is over
    assert jobs.claim("me", lease_s=60) is None  # not a second run of my own job
    taken, previous = jobs.claim("other", lease_s=60)
    assert taken.job_id == job.job_id and previous == "me"


def test_nested_transactions_join_the_outer_one(stores):
    adapters, jobs, _ = stores
    with pytest.raises(RuntimeError):
        with jobs.db.transaction() as conn:
            conn.lock("test")
            jobs.create("t1", "DREAMBOOTH_LORA", "inner", 10, b"r")  # its own block joins ours
            raise RuntimeError("the outer block fails")
    assert jobs.list("t1") == []  # rolled back with it
    with jobs.db.transaction():
        jobs.create("t1", "DREAMBOOTH_LORA", "kept", 10, b"r")
    assert [j.name for j in jobs.list("t1")] == ["kept"]


def test_migrations_ignore_tables_of_other_schemas(postgres):
    """A `jobs` table in another schema must not make the migrations think columns exist."""
    import psycopg

    url = postgres.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA other; CREATE TABLE other.jobs (token TEXT, attempts INTEGER, lease_owner TEXT)")
    jobs = JobStore(open_database(url))
    job = jobs.create("t1", "DREAMBOOTH_LORA", "dog", 10, b"r", token="sks")
    assert jobs.get("t1", job.job_id).token == "sks"


def test_a_request_adapter_is_loadable_only_while_its_request_runs(stores):
    """A DreamSteerer edit's steered copy on Triton: a file every model process can load by its
    key while the edit runs, gone after (also when the edit fails), and swept if a crash left it."""
    import pytest as _pytest
    import torch

    from service.adapters import Adapter, AdapterNotFoundError, LoraModule
    from service.adapters.loading import REQUEST_ADAPTERS, blob_loader, request_adapter

    adapters, _, root = stores
    blob_root = root / "blobs"
    copy = Adapter(lora={"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": LoraModule(
        down=torch.ones(2, 8), up=torch.zeros(8, 2), alpha=2.0)})
    load = blob_loader(blob_root)  # the default request folder: <adapter dir>/request
    with request_adapter(copy, blob_root / REQUEST_ADAPTERS) as key:
        assert key.startswith("request-") and torch.equal(next(iter(load(key).lora.values())).down, torch.ones(2, 8))
        path = blob_root / REQUEST_ADAPTERS / f"{key}.safetensors"
        assert path.is_file()
        # No tenant owns it: the gateway's store does not know the key.
        assert adapters.find("t1", key) is None
    assert not path.exists()
    with _pytest.raises(AdapterNotFoundError):
        load(key)
    with _pytest.raises(RuntimeError), request_adapter(copy, blob_root / REQUEST_ADAPTERS) as key:
        raise RuntimeError("the edit failed")
    assert not list((blob_root / REQUEST_ADAPTERS).glob("*"))
    # A folder of its own (deploy/: the Triton pod's /tmp, its data volume being read-only).
    scratch = root / "scratch"
    with request_adapter(copy, scratch) as key:
        assert blob_loader(blob_root, scratch)(key).lora and (scratch / f"{key}.safetensors").is_file()
    assert not list(scratch.glob("*"))
    # A crash leaves one behind: the start-up sweep removes it.
    left = blob_root / REQUEST_ADAPTERS / "request-0123.safetensors"
    left.write_bytes(b"x")
    assert left in adapters.sweep(min_age_s=0) and not left.exists()


def test_concurrent_imports_with_one_idempotency_key_create_one_adapter(stores, monkeypatch):
    """Eight concurrent retries of one import (same key, same request) on either database: one
    adapter, and every call answers with it; an expired key is forgotten."""
    from service.stores import idempotency

    adapters, _, _ = stores
    results = []

    def create():
        results.append(adapters.create("t1", "once", "DREAMBOOTH_LORA", b"w", idempotency=("k1", "digest-a")))

    threads = [threading.Thread(target=create) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len({r.adapter_id for r in results}) == 1 and len(results) == 8
    assert [a.name for a in adapters.list("t1")] == ["once"]
    with pytest.raises(idempotency.IdempotencyMismatch):  # the key with another request
        adapters.create("t1", "other", "DREAMBOOTH_LORA", b"w", idempotency=("k1", "digest-b"))
    monkeypatch.setattr(idempotency, "TTL_S", -1.0)  # 24 h later: the key is free again
    fresh = adapters.create("t1", "other", "DREAMBOOTH_LORA", b"w", idempotency=("k1", "digest-b"))
    assert fresh.adapter_id != results[0].adapter_id
