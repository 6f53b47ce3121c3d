"""SQLite connection handling shared by the stores."""

from __future__ import annotations

import errno
import sqlite3
import threading
from pathlib import Path

# Out of space, out of quota, or past the process's file-size limit (RLIMIT_FSIZE).
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def is_disk_full(exc: BaseException) -> bool:
    """A write failed for lack of space: the service answers RESOURCE_EXHAUSTED, not INTERNAL."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


class NotFound(KeyError):
    """An id that does not exist for this tenant (another tenant's ids look exactly the same)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "not found"


class Database:
    """One SQLite file in WAL mode, one connection per thread (sqlite3 objects are not shareable)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self.connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")

    def connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss
            self._local.conn = conn
        return conn

    def transaction(self):
        return _Transaction(self.connect())


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if exc_type:
            self.conn.execute("ROLLBACK")
            return False
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error:
            # A failed COMMIT (disk full) may leave the transaction open on this thread's connection.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        return False


def open_database(path: Path) -> Database:
    return Database(path)
