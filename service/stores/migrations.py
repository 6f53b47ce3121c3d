"""The schema, as an ordered list of migrations, applied when a database is opened.

Each migration runs once, in one transaction with its row in `schema_migrations`, under a lock every
replica takes first (two gateways starting together on one PostgreSQL never both migrate). A
database written by a newer build is refused rather than misread. SQLite databases from before
migrations existed (tables made by CREATE IF NOT EXISTS, columns added in place) are adopted:
version 1 finds its tables, version 2 adds only the columns they lack.

To change the schema, append a migration; never edit one that has shipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol


# What the migrations use of service.stores.db's Connection and Database. Not imported from there:
# db.py imports this module (open_database migrates), and the two must not import each other.
class Connection(Protocol):
    def execute(self, sql: str, params: Any = ()) -> Any: ...

    def executescript(self, sql: str) -> None: ...

    def columns(self, table: str) -> set[str]: ...

    def lock(self, key: str) -> None: ...


class Database(Protocol):
    dialect: str

    def connect(self) -> Connection: ...

    def transaction(self) -> ContextManager[Connection]: ...

    def type(self, name: str) -> str: ...


_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id     TEXT PRIMARY KEY,
    tenant         TEXT NOT NULL,
    name           TEXT NOT NULL,
    method         TEXT NOT NULL,
    token          TEXT NOT NULL DEFAULT '',
    class_word     TEXT NOT NULL DEFAULT '',
    rank           INTEGER NOT NULL DEFAULT 0,
    size_bytes     INTEGER NOT NULL,
    num_parameters INTEGER NOT NULL DEFAULT 0,
    sha256         TEXT NOT NULL,
    blob           TEXT NOT NULL,
    source         TEXT NOT NULL,
    created_at     {real} NOT NULL,
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    method      TEXT NOT NULL,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL,
    step        INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    loss        {real},
    adapter_id  TEXT NOT NULL DEFAULT '',
    error       TEXT NOT NULL DEFAULT '',
    request     {blob} NOT NULL,
    created_at  {real} NOT NULL,
    updated_at  {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, created_at);
CREATE TABLE IF NOT EXISTS job_previews (
    job_id TEXT NOT NULL,
    idx    INTEGER NOT NULL,
    png    {blob} NOT NULL,
    PRIMARY KEY (job_id, idx)
)
"""


def _add_columns(table: str, columns: tuple[tuple[str, str], ...]) -> Callable[[Connection, Database], None]:
    def apply(conn: Connection, db: Database) -> None:
        have = conn.columns(table)
        for name, decl in columns:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl.format(real=db.type('real'))}")

    return apply


def _script(sql: str) -> Callable[[Connection, Database], None]:
    def apply(conn: Connection, db: Database) -> None:
        conn.executescript(sql.format(real=db.type("real"), blob=db.type("blob")))

    return apply


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection, Database], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "adapters, jobs and job previews", _script(_SCHEMA_V1)),
    Migration(2, "job progress: token, class word, ETA, message, attempts, checkpoint step", _add_columns("jobs", (
        ("token", "TEXT NOT NULL DEFAULT ''"),
        ("class_word", "TEXT NOT NULL DEFAULT ''"),
        ("eta_seconds", "{real}"),
        ("message", "TEXT NOT NULL DEFAULT ''"),
        ("attempts", "INTEGER NOT NULL DEFAULT 0"),
        ("checkpoint_step", "INTEGER NOT NULL DEFAULT 0"),
    ))),
    # A job is run by the runner holding its lease; a runner that stops renewing it (its process
    # died) loses the job to another replica. not_before: a job waiting to retry is not claimed early.
    Migration(3, "job leases: owner, expiry, not-before", _add_columns("jobs", (
        ("lease_owner", "TEXT NOT NULL DEFAULT ''"),
        ("lease_expires_at", "{real} NOT NULL DEFAULT 0"),
        ("not_before", "{real} NOT NULL DEFAULT 0"),
    ))),
    Migration(4, "index for claiming jobs", _script("CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at)")),
    Migration(5, "index for content-addressed blobs", _script("CREATE INDEX IF NOT EXISTS adapters_sha256 ON adapters (sha256)")),
    Migration(6, "64-bit adapter sizes (PostgreSQL's INTEGER is 32-bit; SQLite's already 64)", lambda conn, db: (
        conn.execute("ALTER TABLE adapters ALTER COLUMN size_bytes TYPE BIGINT") if db.dialect == "postgresql" else None)),
    # service/stores/idempotency.py: what a Personalize / ImportAdapter idempotency key created.
    Migration(7, "idempotency keys", _script("""
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result_id   TEXT NOT NULL,
    created_at  {real} NOT NULL,
    PRIMARY KEY (tenant, kind, idem_key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at)""")),
    # The W3C traceparent of the Personalize call that queued the job: each attempt's trace links to it.
    Migration(8, "job trace parent", _add_columns("jobs", (("trace_parent", "TEXT NOT NULL DEFAULT ''"),))),
)
LATEST = MIGRATIONS[-1].version


class SchemaTooNew(RuntimeError):
    pass


def migrate(db: Database) -> list[int]:
    """Applies the migrations this database lacks; returns their versions."""
    applied = []
    with db.transaction() as conn:
        conn.lock("steerserve:migrations")
        conn.execute(f"CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                     f"description TEXT NOT NULL, applied_at {db.type('real')} NOT NULL)")
        done = {int(row["version"]) for row in conn.execute("SELECT version FROM schema_migrations").fetchall()}
        if done and max(done) > LATEST:
            raise SchemaTooNew(f"the database's schema is version {max(done)}, newer than this build's {LATEST}; "
                               "run a build at least as new")
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            migration.apply(conn, db)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                         (migration.version, migration.description, time.time()))
            applied.append(migration.version)
    return applied


def schema_version(db: Database) -> int:
    row = db.connect().execute("SELECT MAX(version) AS v FROM schema_migrations").fetchone()
    return int(row["v"] or 0)
