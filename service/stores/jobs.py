"""The job table: durable records of personalization jobs and their progress.

A job row is written before any work starts, and every state change is a committed update, so a
restarted server finds every job it accepted: unfinished ones are re-queued (`requeue_unfinished`),
none is silently dropped.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass

from .db import Database, NotFound

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    method      TEXT NOT NULL,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL,
    step        INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss        REAL,
    adapter_id  TEXT NOT NULL DEFAULT '',
    error       TEXT NOT NULL DEFAULT '',
    request     BLOB NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, created_at);
"""


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    tenant: str
    method: str
    name: str
    state: JobState
    step: int
    total_steps: int
    loss: float | None
    adapter_id: str
    error: str
    request: bytes  # the serialized PersonalizeRequest, so a job can be re-run after a restart
    created_at: float
    updated_at: float

    @property
    def progress(self) -> float:
        if self.state == JobState.SUCCEEDED:
            return 1.0
        return self.step / self.total_steps if self.total_steps else 0.0


def _record(row) -> JobRecord:
    d = dict(row)
    d["state"] = JobState(d["state"])
    return JobRecord(**d)


class JobStore:
    def __init__(self, db: Database):
        self.db = db
        self.db.connect().executescript(_SCHEMA)

    def create(self, tenant: str, method: str, name: str, total_steps: int, request: bytes) -> JobRecord:
        now = time.time()
        record = JobRecord(
            job_id="job-" + uuid.uuid4().hex[:20],
            tenant=tenant,
            method=method,
            name=name,
            state=JobState.QUEUED,
            step=0,
            total_steps=total_steps,
            loss=None,
            adapter_id="",
            error="",
            request=request,
            created_at=now,
            updated_at=now,
        )
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.job_id, tenant, method, name, record.state.value, 0, total_steps, None,
                    "", "", request, now, now,
                ),
            )
        return record

    def get(self, tenant: str, job_id: str) -> JobRecord:
        row = self.db.connect().execute(
            "SELECT * FROM jobs WHERE tenant=? AND job_id=?", (tenant, job_id)
        ).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return _record(row)

    def list(self, tenant: str) -> list[JobRecord]:
        rows = self.db.connect().execute(
            "SELECT * FROM jobs WHERE tenant=? ORDER BY created_at", (tenant,)
        ).fetchall()
        return [_record(r) for r in rows]

    def update(self, job_id: str, **fields) -> JobRecord:
        """Commits a change; a finished job is never changed again (cancel vs finish races)."""
        if "state" in fields:
            fields["state"] = JobState(fields["state"]).value
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            current = _record(row)
            if current.state.finished:
                return current
            conn.execute(f"UPDATE jobs SET {sets} WHERE job_id=?", (*fields.values(), job_id))
            row = conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return _record(row)

    def requeue_unfinished(self) -> list[JobRecord]:
        """At startup: jobs that were RUNNING when the last process died go back to QUEUED."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state=?, updated_at=? WHERE state=?",
                (JobState.QUEUED.value, time.time(), JobState.RUNNING.value),
            )
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state=? ORDER BY created_at", (JobState.QUEUED.value,)
            ).fetchall()
        return [_record(r) for r in rows]
