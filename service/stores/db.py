"""The database under the stores: SQLite (embedded default) or PostgreSQL (many gateway replicas).

    open_database("var/steerserve.sqlite3")             # one file, WAL; one gateway per data folder
    open_database("postgresql://user:pw@host/db")       # shared by every gateway replica

The stores write their SQL once, in the dialect both accept (`?` placeholders, ON CONFLICT upserts);
this module translates the little that differs (placeholders, BEGIN, row objects, row locks) and
applies the schema's migrations (service/stores/migrations.py) when a database is opened.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

# Out of space, out of quota, or past the process's file-size limit (RLIMIT_FSIZE).
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_PG_DISK_FULL = "53100"  # SQLSTATE disk_full
SHARED_FILES_MIN_AGE_S = 600.0  # see Database.files_min_age_s


def is_disk_full(exc: BaseException) -> bool:
    """A write failed for lack of space: the service answers RESOURCE_EXHAUSTED, not INTERNAL."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return getattr(exc, "sqlstate", None) == _PG_DISK_FULL


def is_database_unavailable(exc: BaseException) -> bool:
    """The database server cannot be reached or went away (UNAVAILABLE: a retry may succeed)."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.OperationalError)


class NotFound(KeyError):
    """An id that does not exist for this tenant (another tenant's ids look exactly the same)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "not found"


class Row(Sequence):
    """A result row read by position or by column name, like sqlite3.Row (dict(row) works)."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: tuple[str, ...], values: tuple):
        self._names, self._values = names, values

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return self._values[self._names.index(key)]
            except ValueError:
                raise IndexError(f"no column {key!r}") from None
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> tuple[str, ...]:
        return self._names


class Connection:
    """One connection of either dialect, with the stores' SQL translated for it."""

    def __init__(self, raw, dialect: str, reconnect=None):
        self.raw, self.dialect = raw, dialect
        self.depth = 0  # open transaction blocks on this connection (inner ones join the outer)
        self._reconnect = reconnect  # -> a new driver connection (PostgreSQL)

    def execute(self, sql: str, params: Sequence = ()):
        if self.dialect != "postgresql":
            return self.raw.execute(sql, tuple(params))
        sql, args = sql.replace("?", "%s"), tuple(params) or None
        try:
            return self.raw.execute(sql, args)
        except Exception:
            # The server closed this connection while it sat idle (a restart, a failover, a proxy's
            # idle timeout). Outside a transaction nothing ran on the dead connection (a BEGIN, or
            # a read): run it once more on a fresh one. Inside one, the caller's block fails.
            if self.depth > 0 or self._reconnect is None or not (self.raw.closed or self.raw.broken):
                raise
            self.raw = self._reconnect()
            return self.raw.execute(sql, args)

    def executemany(self, sql: str, rows) -> None:
        if self.dialect == "postgresql":
            self.raw.cursor().executemany(sql.replace("?", "%s"), list(rows))
        else:
            self.raw.executemany(sql, rows)

    def executescript(self, sql: str) -> None:
        if self.dialect == "postgresql":
            self.raw.execute(sql)  # several statements, no parameters: one simple query
        else:
            for statement in filter(str.strip, sql.split(";")):  # executescript would COMMIT our transaction
                self.raw.execute(statement)

    def columns(self, table: str) -> set[str]:
        if self.dialect == "postgresql":
            rows = self.execute("SELECT column_name FROM information_schema.columns "
                                "WHERE table_schema=current_schema() AND table_name=?", (table,))
            return {row["column_name"] for row in rows.fetchall()}
        return {row["name"] for row in self.raw.execute(f"PRAGMA table_info({table})")}

    def lock(self, key: str) -> None:
        """Serializes this transaction with every other one that takes the same key, on any
        replica (PostgreSQL: an advisory lock held until COMMIT). SQLite's BEGIN IMMEDIATE already
        serializes all writers, so nothing more is needed there."""
        if self.dialect == "postgresql":
            self.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (key,))

    @property
    def for_update(self) -> str:
        """Appended to a SELECT of rows the transaction will change (PostgreSQL row locks)."""
        return " FOR UPDATE" if self.dialect == "postgresql" else ""

    @property
    def in_transaction(self) -> bool:
        if self.dialect == "postgresql":
            from psycopg.pq import TransactionStatus

            return self.raw.info.transaction_status != TransactionStatus.IDLE
        return self.raw.in_transaction


class Database:
    """Connections (one per thread: neither driver's connection is shared across threads) and
    transactions. `shared`: several gateway processes use this database at once, so nothing may
    assume it is alone (start-up sweeps keep young files; running jobs are taken over only when
    their lease expires)."""

    dialect = "sqlite"
    shared = False

    def __init__(self):
        self._local = threading.local()

    @property
    def files_min_age_s(self) -> float:
        """How old an unreferenced file (blob, checkpoint, temp file) must be before a start-up
        sweep removes it: on a shared database another replica may be between writing one and
        committing its row; alone, every such file is a crash's leftover."""
        return SHARED_FILES_MIN_AGE_S if self.shared else 0.0

    def _new_connection(self):  # -> the driver's connection
        raise NotImplementedError

    def connect(self) -> Connection:
        """This thread's connection (a dead PostgreSQL one is replaced by Connection.execute)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = Connection(self._new_connection(), self.dialect, reconnect=self._new_connection)
            self._local.conn = conn
        return conn

    def transaction(self) -> "_Transaction":
        return _Transaction(self.connect(), "BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")

    def type(self, name: str) -> str:
        """The column type for `name` in ("real", "blob")."""
        return {"real": "REAL", "blob": "BLOB"}[name]


class SQLiteDatabase(Database):
    """One SQLite file in WAL mode."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.connect().execute("PRAGMA journal_mode=WAL")

    def _new_connection(self):
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss
        return conn

    def __repr__(self) -> str:
        return f"SQLiteDatabase({str(self.path)!r})"


class PostgresDatabase(Database):
    """A PostgreSQL database shared by every gateway replica."""

    dialect = "postgresql"
    shared = True

    def __init__(self, url: str, connect_timeout: float = 10.0):
        super().__init__()
        self.url, self.connect_timeout = url, connect_timeout
        self.connect()  # fail at start, with the server's message, rather than at the first RPC

    def _new_connection(self):
        import psycopg

        def rows(cursor):
            names = tuple(c.name for c in cursor.description or ())
            return lambda values: Row(names, tuple(values))

        # autocommit: our transactions are explicit BEGIN ... COMMIT blocks, as with SQLite.
        # Bounded waits: a lock held by a stalled replica, a transaction left open by one, or a dead
        # peer on the network fail the call (UNAVAILABLE / the job is retried) instead of hanging.
        # prepare_threshold=None: no server-side prepared statements (pgbouncer in transaction mode).
        return psycopg.connect(self.url, autocommit=True, row_factory=rows,
                               connect_timeout=max(1, int(self.connect_timeout)),
                               application_name="steerserve", prepare_threshold=None,
                               keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                               options="-c lock_timeout=15000 -c idle_in_transaction_session_timeout=60000")

    def type(self, name: str) -> str:
        return {"real": "DOUBLE PRECISION", "blob": "BYTEA"}[name]

    def __repr__(self) -> str:
        host = self.url.split("@")[-1]  # never the password
        return f"PostgresDatabase({host!r})"


class _Transaction:
    """BEGIN ... COMMIT (ROLLBACK on an exception). A block opened inside another on the same
    connection joins it: one transaction, committed or rolled back by the outermost block."""

    def __init__(self, conn: Connection, begin: str):
        self.conn, self.begin = conn, begin

    def __enter__(self) -> Connection:
        if self.conn.depth == 0:
            self.conn.execute(self.begin)
        self.conn.depth += 1
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        self.conn.depth -= 1
        if self.conn.depth > 0:
            return False  # the outer block decides
        if exc_type:
            with contextlib.suppress(Exception):  # a broken connection cannot roll back; its server does
                self.conn.execute("ROLLBACK")
            return False
        try:
            self.conn.execute("COMMIT")
        except Exception:
            # A failed COMMIT (disk full) may leave the transaction open on this thread's connection.
            with contextlib.suppress(Exception):
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
            raise
        return False


def is_database_url(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def open_database(target: str | Path) -> Database:
    """A SQLite file path or a postgresql:// URL, migrated to this build's schema."""
    from .migrations import migrate

    db = PostgresDatabase(str(target)) if is_database_url(target) else SQLiteDatabase(Path(target))
    migrate(db)
    return db
