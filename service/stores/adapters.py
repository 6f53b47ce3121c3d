"""Adapter registry: metadata rows in SQLite, weights as safetensors files in a blob directory.

A blob is written atomically (temp file in the same directory, fsync, rename, fsync the directory)
and its sha256 recorded, so a crash never leaves a half-written adapter under a registered id, and a
file damaged on disk is detected when it is read.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from service import crashpoints

from .db import Database, NotFound

_SCHEMA = """
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
    created_at     REAL NOT NULL,
    UNIQUE (tenant, name)
);
"""


class AdapterAlreadyExists(ValueError):
    pass


class QuotaExceeded(RuntimeError):
    """The tenant's adapter quota (count or bytes) would be exceeded (RESOURCE_EXHAUSTED)."""


class BlobCorrupted(IOError):
    pass


@dataclass(frozen=True)
class AdapterRecord:
    adapter_id: str
    tenant: str
    name: str
    method: str
    token: str
    class_word: str
    rank: int
    size_bytes: int
    num_parameters: int
    sha256: str
    blob: str  # path relative to the blob root
    source: str
    created_at: float


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crashpoints.reached("atomic_write.temp_written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


class AdapterStore:
    def __init__(self, db: Database, blob_root: Path, *, max_adapters: int | None = None,
                 max_bytes: int | None = None):
        """``max_adapters`` / ``max_bytes``: each tenant's quota (None: unlimited)."""
        self.max_adapters, self.max_bytes = max_adapters, max_bytes
        self.db = db
        self.blob_root = Path(blob_root)
        self.blob_root.mkdir(parents=True, exist_ok=True)
        self.db.connect().executescript(_SCHEMA)

    def create(
        self,
        tenant: str,
        name: str,
        method: str,
        data: bytes,
        *,
        token: str = "",
        class_word: str = "",
        rank: int = 0,
        num_parameters: int = 0,
        source: str = "import",
        adapter_id: str | None = None,
    ) -> AdapterRecord:
        """Stores the blob, then registers it, in one transaction; a failed registration removes
        the blob.

        `adapter_id` lets a caller fix the id in advance (a training job derives it from its job
        id, so a job interrupted after this call finds its adapter instead of training again)."""
        adapter_id = adapter_id or "ad-" + uuid.uuid4().hex[:20]
        # Blobs live under a per-tenant folder named by a hash, so tenant names never reach paths.
        tenant_dir = hashlib.sha256(tenant.encode()).hexdigest()[:16]
        rel = f"{tenant_dir}/{adapter_id}.safetensors"
        path = self.blob_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # The blob is renamed into place inside the transaction; if anything after that fails
        # (the insert, the COMMIT on a full disk) it is removed, so no file outlives a failed create.
        # A SIGKILL in that gap leaves an unreferenced file, which sweep() removes at the next start.
        written = committed = False
        try:
            with self.db.transaction() as conn:
                if conn.execute(
                    "SELECT 1 FROM adapters WHERE tenant=? AND name=?", (tenant, name)
                ).fetchone():
                    raise AdapterAlreadyExists(f"an adapter named {name!r} already exists")
                if conn.execute("SELECT 1 FROM adapters WHERE adapter_id=?", (adapter_id,)).fetchone():
                    # Never overwrite (or, failing, remove) a registered adapter's blob.
                    raise AdapterAlreadyExists(f"adapter {adapter_id!r} already exists")
                # In the same transaction as the insert: two concurrent creates cannot both squeeze in.
                count, used = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM adapters WHERE tenant=?", (tenant,)
                ).fetchone()
                if self.max_adapters is not None and count + 1 > self.max_adapters:
                    raise QuotaExceeded(f"adapter quota: this tenant has {count} adapters, at most {self.max_adapters}; "
                                        "delete one first")
                if self.max_bytes is not None and used + len(data) > self.max_bytes:
                    raise QuotaExceeded(f"adapter quota: {used} bytes stored + {len(data)} would exceed this tenant's "
                                        f"{self.max_bytes} bytes; delete adapters first")
                _write_atomically(path, data)
                written = True
                crashpoints.reached("adapter.blob_written")
                record = AdapterRecord(
                    adapter_id=adapter_id,
                    tenant=tenant,
                    name=name,
                    method=method,
                    token=token,
                    class_word=class_word,
                    rank=rank,
                    size_bytes=len(data),
                    num_parameters=num_parameters,
                    sha256=hashlib.sha256(data).hexdigest(),
                    blob=rel,
                    source=source,
                    created_at=time.time(),
                )
                conn.execute(
                    "INSERT INTO adapters VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        record.adapter_id, record.tenant, record.name, record.method, record.token,
                        record.class_word, record.rank, record.size_bytes, record.num_parameters,
                        record.sha256, record.blob, record.source, record.created_at,
                    ),
                )
                crashpoints.reached("adapter.row_inserted")
            committed = True
        finally:
            if written and not committed:
                path.unlink(missing_ok=True)
        crashpoints.reached("adapter.committed")
        return record

    def sweep(self) -> list[Path]:
        """Removes what a crash can leave behind and no row refers to: temp files of interrupted
        writes, and blobs renamed into place whose registration never committed. Run at start,
        before anything writes (one gateway process per data folder)."""
        referenced = {row["blob"] for row in self.db.connect().execute("SELECT blob FROM adapters")}
        removed = []
        for path in self.blob_root.rglob("*"):
            if not path.is_file():
                continue
            rel = path.relative_to(self.blob_root).as_posix()
            if path.name.endswith(".tmp") or (path.suffix == ".safetensors" and rel not in referenced):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def find(self, tenant: str, adapter_id: str) -> AdapterRecord | None:
        try:
            return self.get(tenant, adapter_id)
        except NotFound:
            return None

    def get(self, tenant: str, adapter_id: str) -> AdapterRecord:
        row = self.db.connect().execute(
            "SELECT * FROM adapters WHERE tenant=? AND adapter_id=?", (tenant, adapter_id)
        ).fetchone()
        if row is None:
            raise NotFound(f"adapter {adapter_id!r} not found")
        return AdapterRecord(**dict(row))

    def list(self, tenant: str) -> list[AdapterRecord]:
        rows = self.db.connect().execute(
            "SELECT * FROM adapters WHERE tenant=? ORDER BY created_at", (tenant,)
        ).fetchall()
        return [AdapterRecord(**dict(r)) for r in rows]

    def delete(self, tenant: str, adapter_id: str) -> AdapterRecord:
        record = self.get(tenant, adapter_id)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM adapters WHERE adapter_id=?", (adapter_id,))
        # The row is gone first: a crash here leaves an orphan file, never a row without its file.
        (self.blob_root / record.blob).unlink(missing_ok=True)
        return record

    def blob_path(self, record: AdapterRecord) -> Path:
        return self.blob_root / record.blob

    def read_blob(self, record: AdapterRecord) -> bytes:
        data = self.blob_path(record).read_bytes()
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise BlobCorrupted(f"adapter {record.adapter_id!r}: stored file fails its checksum")
        return data
