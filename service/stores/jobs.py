"""The job table: durable records of personalization jobs and their progress.

A job row is written before any work starts, and every state change is a committed update, so a
restarted server finds every job it accepted: unfinished ones are re-queued (`requeue_unfinished`),
none is silently dropped. A finished job's preview images are committed in the same transaction
that marks it SUCCEEDED.
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
CREATE TABLE IF NOT EXISTS job_previews (
    job_id TEXT NOT NULL,
    idx    INTEGER NOT NULL,
    png    BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
);
"""
# Columns added after the first release: (name, SQL type and default). Added in place when missing,
# so a database written by an older version keeps its jobs.
_ADDED_COLUMNS = (
    ("token", "TEXT NOT NULL DEFAULT ''"),
    ("class_word", "TEXT NOT NULL DEFAULT ''"),
    ("eta_seconds", "REAL"),
    ("message", "TEXT NOT NULL DEFAULT ''"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("checkpoint_step", "INTEGER NOT NULL DEFAULT 0"),
)


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
    token: str = ""
    class_word: str = ""
    eta_seconds: float | None = None
    message: str = ""  # what the job is doing, or how it ended
    attempts: int = 0  # times it started RUNNING (a restart mid-job starts another attempt)
    checkpoint_step: int = 0  # the step of its latest checkpoint (0: none)

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
        conn = self.db.connect()
        conn.executescript(_SCHEMA)
        have = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
        for name, decl in _ADDED_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

    def create(
        self, tenant: str, method: str, name: str, total_steps: int, request: bytes, token: str = "", class_word: str = ""
    ) -> JobRecord:
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
            token=token,
            class_word=class_word,
        )
        row = {k: v.value if isinstance(v, JobState) else v for k, v in record.__dict__.items()}
        with self.db.transaction() as conn:
            conn.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        return record

    def get(self, tenant: str, job_id: str) -> JobRecord:
        row = self.db.connect().execute(
            "SELECT * FROM jobs WHERE tenant=? AND job_id=?", (tenant, job_id)
        ).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return _record(row)

    def get_by_id(self, job_id: str) -> JobRecord:
        """For the job runner, which acts on jobs already accepted for a tenant."""
        row = self.db.connect().execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        return _record(row)

    def active(self, tenant: str | None = None) -> list[JobRecord]:
        """QUEUED and RUNNING jobs, oldest first; of one tenant, or of all."""
        sql = "SELECT * FROM jobs WHERE state IN (?, ?)"
        args: tuple = (JobState.QUEUED.value, JobState.RUNNING.value)
        if tenant is not None:
            sql, args = sql + " AND tenant=?", args + (tenant,)
        return [_record(r) for r in self.db.connect().execute(sql + " ORDER BY created_at", args).fetchall()]

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

    def finish(self, job_id: str, state: str, *, previews: list[bytes] = (), **fields) -> JobRecord:
        """Ends a job (SUCCEEDED, FAILED, CANCELLED), with its preview images, in one commit."""
        state = JobState(state)
        if not state.finished:
            raise ValueError(f"{state.value} is not a final state")
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            if _record(row).state.finished:
                return _record(row)
            fields.update(state=state.value, updated_at=time.time(), eta_seconds=None)
            sets = ", ".join(f"{k}=?" for k in fields)
            conn.execute(f"UPDATE jobs SET {sets} WHERE job_id=?", (*fields.values(), job_id))
            conn.executemany(
                "INSERT OR REPLACE INTO job_previews VALUES (?,?,?)", [(job_id, i, png) for i, png in enumerate(previews)]
            )
            row = conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return _record(row)

    def previews(self, job_id: str) -> list[bytes]:
        rows = self.db.connect().execute(
            "SELECT png FROM job_previews WHERE job_id=? ORDER BY idx", (job_id,)
        ).fetchall()
        return [bytes(r["png"]) for r in rows]

    def requeue_unfinished(self) -> list[JobRecord]:
        """At startup: jobs that were RUNNING when the last process died go back to QUEUED."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state=?, updated_at=?, eta_seconds=NULL, message=? WHERE state=?",
                (JobState.QUEUED.value, time.time(), "interrupted; resuming", JobState.RUNNING.value),
            )
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state=? ORDER BY created_at", (JobState.QUEUED.value,)
            ).fetchall()
        return [_record(r) for r in rows]
