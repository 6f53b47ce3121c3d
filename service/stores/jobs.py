"""The job table: durable records of personalization jobs and their progress.

A job row is written before any work starts, and every state change is a committed update, so a
restarted server finds every job it accepted, none is silently dropped. A finished job's preview
images are committed in the same transaction that marks it SUCCEEDED.

Runners claim jobs (`claim`): one runner at a time holds a job's lease and renews it while it
trains (`heartbeat`). A runner whose process dies stops renewing, and once the lease expires any
runner, on any gateway replica, claims the job again and resumes it from its checkpoint. Writes of a
running job are fenced by the lease (`owner=`): a runner that lost its lease cannot overwrite the
job's new runner. On PostgreSQL the claim is SELECT ... FOR UPDATE SKIP LOCKED, so runners never
wait on one another; SQLite serializes writers anyway. Alone on its database (SQLite, one gateway),
a starting runner re-queues RUNNING jobs at once (`requeue_unfinished`): their runner was its own
previous process.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .db import Database, NotFound

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
    lease_owner: str = ""  # the runner running it ("" when not running)
    lease_expires_at: float = 0.0  # wall-clock time; the lease is lost unless renewed before
    not_before: float = 0.0  # a QUEUED job is not claimed before this time (a retry's pause)
    trace_parent: str = ""  # W3C traceparent of the Personalize call (tracing on), linked from each attempt

    @property
    def progress(self) -> float:
        if self.state == JobState.SUCCEEDED:
            return 1.0
        return self.step / self.total_steps if self.total_steps else 0.0


def _record(row) -> JobRecord:
    d = dict(row)
    d["state"] = JobState(d["state"])
    return JobRecord(**d)


def _clock(conn) -> float:
    """Lease times come from one clock for every replica: the database server's (PostgreSQL), so
    skew between the gateways' clocks cannot shorten or stretch a lease. SQLite: this machine's."""
    if conn.dialect == "postgresql":
        return float(conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp()) AS t").fetchone()["t"])
    return time.time()


class LeaseLost(RuntimeError):
    """The job's lease has passed to another runner (this one was presumed dead)."""


class JobStore:
    def __init__(self, db: Database, clock: Callable[[], float] | None = None):
        self.db = db  # schema: service/stores/migrations.py
        # Lease times (claims, heartbeats, not_before): the database's clock (_clock) unless a
        # clock is given (tests drive time past a lease with one instead of sleeping through it).
        self.clock = clock

    def _now(self, conn) -> float:
        return self.clock() if self.clock is not None else _clock(conn)

    def create(
        self, tenant: str, method: str, name: str, total_steps: int, request: bytes, token: str = "", class_word: str = "",
        trace_parent: str = "",
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
            trace_parent=trace_parent,
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

    def _locked(self, conn, job_id: str, owner: str | None) -> JobRecord:
        row = conn.execute("SELECT * FROM jobs WHERE job_id=?" + conn.for_update, (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} not found")
        current = _record(row)
        if owner is not None and not current.state.finished and current.lease_owner != owner:
            raise LeaseLost(f"job {job_id}: its lease passed to {current.lease_owner or 'the queue'}")
        return current

    def update(self, job_id: str, *, owner: str | None = None, **fields) -> JobRecord:
        """Commits a change; a finished job is never changed again (cancel vs finish races).
        `owner`: the runner writing; LeaseLost if it no longer holds the job's lease."""
        if "state" in fields:
            fields["state"] = JobState(fields["state"]).value
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.db.transaction() as conn:
            current = self._locked(conn, job_id, owner)
            if current.state.finished:
                return current
            conn.execute(f"UPDATE jobs SET {sets} WHERE job_id=?", (*fields.values(), job_id))
            row = conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return _record(row)

    def finish(self, job_id: str, state: str, *, owner: str | None = None, previews: list[bytes] = (),
               **fields) -> JobRecord:
        """Ends a job (SUCCEEDED, FAILED, CANCELLED), with its preview images, in one commit.
        `owner` as in update() (a cancellation comes from any replica and has none)."""
        state = JobState(state)
        if not state.finished:
            raise ValueError(f"{state.value} is not a final state")
        with self.db.transaction() as conn:
            current = self._locked(conn, job_id, owner)
            if current.state.finished:
                return current
            fields.update(state=state.value, updated_at=time.time(), eta_seconds=None, lease_owner="",
                          lease_expires_at=0.0)
            sets = ", ".join(f"{k}=?" for k in fields)
            conn.execute(f"UPDATE jobs SET {sets} WHERE job_id=?", (*fields.values(), job_id))
            conn.executemany(
                "INSERT INTO job_previews (job_id, idx, png) VALUES (?,?,?) "
                "ON CONFLICT (job_id, idx) DO UPDATE SET png=excluded.png",
                [(job_id, i, png) for i, png in enumerate(previews)],
            )
            row = conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return _record(row)

    # -- leases ----------------------------------------------------------------------------------

    def claim(self, owner: str, lease_s: float) -> tuple[JobRecord, str] | None:
        """The oldest job ready to run, now RUNNING under `owner`'s lease with one more attempt:
        a QUEUED one past its not_before, or a RUNNING one whose runner let its lease expire (never
        one `owner` itself holds: a late heartbeat must not make it run a job twice).
        Returns (job, previous owner: "" unless taken over), or None when there is none."""
        with self.db.transaction() as conn:
            now = self._now(conn)
            skip_locked = " SKIP LOCKED" if conn.for_update else ""  # PostgreSQL: never wait on another claim
            row = conn.execute(
                "SELECT * FROM jobs WHERE (state=? AND not_before<=?) "
                "OR (state=? AND lease_expires_at<? AND lease_owner<>?) "
                "ORDER BY created_at LIMIT 1" + conn.for_update + skip_locked,
                (JobState.QUEUED.value, now, JobState.RUNNING.value, now, owner),
            ).fetchone()
            if row is None:
                return None
            job = _record(row)
            previous = job.lease_owner if job.state == JobState.RUNNING else ""
            conn.execute(
                "UPDATE jobs SET state=?, lease_owner=?, lease_expires_at=?, attempts=?, not_before=0, updated_at=? "
                "WHERE job_id=?",
                (JobState.RUNNING.value, owner, now + lease_s, job.attempts + 1, now, job.job_id),
            )
            row = conn.execute("SELECT * FROM jobs WHERE job_id=?", (job.job_id,)).fetchone()
        return _record(row), previous

    def heartbeat(self, owner: str, job_ids: list[str], lease_s: float) -> dict[str, JobRecord]:
        """Renews `owner`'s leases on `job_ids`; returns each job's row, so the runner sees the ones
        it lost (cancelled from another replica, or taken over after it stalled)."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        with self.db.transaction() as conn:
            conn.execute(
                f"UPDATE jobs SET lease_expires_at=? WHERE lease_owner=? AND state=? AND job_id IN ({marks})",
                (self._now(conn) + lease_s, owner, JobState.RUNNING.value, *job_ids),
            )
            rows = conn.execute(f"SELECT * FROM jobs WHERE job_id IN ({marks})", tuple(job_ids)).fetchall()
        return {row["job_id"]: _record(row) for row in rows}

    def release(self, job_id: str, owner: str, *, message: str, retry_in_s: float = 0.0) -> JobRecord:
        """Hands a running job back to the queue (the server stops, the model server is away); not
        claimed again for `retry_in_s` (by the database's clock, like the leases)."""
        with self.db.transaction() as conn:
            not_before = self._now(conn) + retry_in_s if retry_in_s > 0 else 0.0
            return self.update(job_id, owner=owner, state=JobState.QUEUED, lease_owner="", lease_expires_at=0.0,
                               eta_seconds=None, not_before=not_before, message=message)

    def queue_stats(self) -> tuple[int, int, float]:
        """(queued, running, age in seconds of the oldest QUEUED job, 0 if none), store-wide."""
        row = self.db.connect().execute(
            "SELECT SUM(CASE WHEN state=? THEN 1 ELSE 0 END) AS queued, SUM(CASE WHEN state=? THEN 1 ELSE 0 END) "
            "AS running, MIN(CASE WHEN state=? THEN created_at END) AS oldest FROM jobs WHERE state IN (?, ?)",
            (JobState.QUEUED.value, JobState.RUNNING.value, JobState.QUEUED.value,
             JobState.QUEUED.value, JobState.RUNNING.value),
        ).fetchone()
        oldest = row["oldest"]
        return int(row["queued"] or 0), int(row["running"] or 0), max(0.0, time.time() - oldest) if oldest else 0.0

    def previews(self, job_id: str) -> list[bytes]:
        rows = self.db.connect().execute(
            "SELECT png FROM job_previews WHERE job_id=? ORDER BY idx", (job_id,)
        ).fetchall()
        return [bytes(r["png"]) for r in rows]

    def requeue_unfinished(self) -> list[JobRecord]:
        """At startup, on a database no other process uses: jobs that were RUNNING when the last
        process died go back to QUEUED at once (no lease to wait out)."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state=?, updated_at=?, eta_seconds=NULL, message=?, lease_owner='', "
                "lease_expires_at=0 WHERE state=?",
                (JobState.QUEUED.value, time.time(), "interrupted; resuming", JobState.RUNNING.value),
            )
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state=? ORDER BY created_at", (JobState.QUEUED.value,)
            ).fetchall()
        return [_record(r) for r in rows]
