"""SQLite connection handling shared by the stores."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


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
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def open_database(path: Path) -> Database:
    return Database(path)
