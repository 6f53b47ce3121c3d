"""Adapter registry: metadata rows in the database, weights as safetensors files in a blob folder.

Blobs are addressed by content: `sha256/<2 hex>/<sha256>.safetensors`. The folder can be one volume
shared by every gateway replica and every Triton replica (ReadWriteMany): a model server loads an
adapter by its content key alone, without the database, and checks the bytes against the key. Two
adapters with the same bytes (one tenant's import of another's export) share one file, which is
removed when its last row is.

A blob is written atomically (temp file in the same directory, fsync, rename, fsync the directory),
so a crash never leaves a half-written adapter under a registered id, and a file damaged on disk is
detected when it is read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from service import crashpoints

from . import idempotency as idempotency_keys
from .db import Database, NotFound

log = logging.getLogger("steerserve.stores")

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

    @property
    def key(self) -> str:
        """What the serving layers (adapter banks, Triton) know the adapter by: its content hash,
        so any replica finds its file without the database. Tenancy is checked before a key is
        handed out; a key names bytes, not an owner."""
        return self.sha256


def blob_path_for(sha256: str) -> str:
    """The blob's path under the blob root, from its content hash alone."""
    return f"sha256/{sha256[:2]}/{sha256}.safetensors"


def settled_files(paths, min_age_s: float):
    """The files among `paths` last written at least `min_age_s` ago (for start-up sweeps; a file
    gone meanwhile, removed by another replica, is skipped)."""
    now = time.time()
    for path in paths:
        try:
            if path.is_file() and now - path.stat().st_mtime >= min_age_s:
                yield path
        except FileNotFoundError:
            continue


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
        self._adopt_legacy_blobs()

    def check_quota(self, conn, tenant: str, new_bytes: int = 0, for_job: str | None = None) -> None:
        """The one place the adapter quota is decided: one more adapter (of `new_bytes`) for `tenant`
        fits, counting the adapters stored and the personalization jobs queued or running (each
        holds its future adapter's place; `for_job` is the job whose own adapter this is). Call it
        inside the transaction that inserts, holding the tenant's lock; raises QuotaExceeded."""
        conn.lock(f"steerserve:tenant:{tenant}")
        count, used = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM adapters WHERE tenant=?", (tenant,)
        ).fetchone()
        (jobs,) = conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE tenant=? AND state IN ('QUEUED', 'RUNNING') AND job_id<>?",
            (tenant, for_job or ""),
        ).fetchone()
        if self.max_adapters is not None and count + jobs + 1 > self.max_adapters:
            raise QuotaExceeded(f"adapter quota: this tenant has {count} adapters and {jobs} personalization jobs in "
                                f"progress, at most {self.max_adapters} in all; delete an adapter first")
        if self.max_bytes is not None and used + new_bytes > self.max_bytes:
            raise QuotaExceeded(f"adapter quota: {used} bytes stored + {new_bytes} would exceed this tenant's "
                                f"{self.max_bytes} bytes; delete adapters first")

    def _adopt_legacy_blobs(self) -> None:
        """Moves blobs stored by builds before content addressing (`<tenant hash>/<adapter id>`)
        to their content path. Idempotent, and safe to interrupt: the row moves only once the
        content file is in place, the old file goes only after the row has moved."""
        rows = self.db.connect().execute("SELECT adapter_id, sha256, blob FROM adapters WHERE blob NOT LIKE 'sha256/%'")
        for row in rows.fetchall():
            old, rel = self.blob_root / row["blob"], blob_path_for(row["sha256"])
            with self.db.transaction() as conn:
                conn.lock(f"steerserve:blob:{row['sha256']}")
                new = self.blob_root / rel
                if not new.is_file() and old.is_file():
                    new.parent.mkdir(parents=True, exist_ok=True)
                    _write_atomically(new, old.read_bytes())
                conn.execute("UPDATE adapters SET blob=? WHERE adapter_id=?", (rel, row["adapter_id"]))
            old.unlink(missing_ok=True)

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
        for_job: str | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> AdapterRecord:
        """Stores the blob, then registers it, in one transaction; a failed registration removes
        the blob. Within the tenant's quota (check_quota), or QuotaExceeded.

        `adapter_id` lets a caller fix the id in advance (a training job derives it from its job
        id, so a job interrupted after this call finds its adapter instead of training again);
        `for_job`: the job this adapter is the result of (its place in the quota is this adapter's).
        `idempotency`: (key, request fingerprint) of an import: the adapter this key created before
        is returned instead (service/stores/idempotency.py)."""
        adapter_id = adapter_id or "ad-" + uuid.uuid4().hex[:20]
        sha = hashlib.sha256(data).hexdigest()
        # Paths come from the content hash only: no tenant name or client string reaches a path.
        rel = blob_path_for(sha)
        path = self.blob_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # The blob is renamed into place inside the transaction; if anything after that fails
        # (the insert, the COMMIT on a full disk) a file this call created is removed, so no file
        # outlives a failed create. A SIGKILL in that gap leaves an unreferenced file, which sweep()
        # removes at the next start. A file that was already there belongs to another row: kept.
        written = committed = False
        if idempotency is not None:
            idempotency_keys.sweep(self.db)
        try:
            with self.db.transaction() as conn:
                # Serializes this tenant's creates (the quota check and the insert), and every
                # create and delete of these bytes (a delete cannot remove the file under us), on
                # every replica.
                conn.lock(f"steerserve:tenant:{tenant}")  # check_quota takes it too: re-entrant
                conn.lock(f"steerserve:blob:{sha}")
                if idempotency is not None:
                    earlier = idempotency_keys.recall(conn, tenant, "import", *idempotency)
                    record = self.find(tenant, earlier) if earlier else None
                    if record is not None:
                        return record  # nothing written: `written` is False
                if conn.execute(
                    "SELECT 1 FROM adapters WHERE tenant=? AND name=?", (tenant, name)
                ).fetchone():
                    raise AdapterAlreadyExists(f"an adapter named {name!r} already exists")
                if conn.execute("SELECT 1 FROM adapters WHERE adapter_id=?", (adapter_id,)).fetchone():
                    # Never overwrite (or, failing, remove) a registered adapter's blob.
                    raise AdapterAlreadyExists(f"adapter {adapter_id!r} already exists")
                # In the same transaction as the insert: two concurrent creates cannot both squeeze in.
                self.check_quota(conn, tenant, new_bytes=len(data), for_job=for_job)
                if not path.is_file():
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
                    sha256=sha,
                    blob=rel,
                    source=source,
                    created_at=time.time(),
                )
                conn.execute(
                    "INSERT INTO adapters (adapter_id, tenant, name, method, token, class_word, rank, size_bytes, "
                    "num_parameters, sha256, blob, source, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        record.adapter_id, record.tenant, record.name, record.method, record.token,
                        record.class_word, record.rank, record.size_bytes, record.num_parameters,
                        record.sha256, record.blob, record.source, record.created_at,
                    ),
                )
                if idempotency is not None:
                    idempotency_keys.remember(conn, tenant, "import", *idempotency, adapter_id)
                crashpoints.reached("adapter.row_inserted")
            committed = True
        finally:
            if written and not committed:
                # After the rollback, under the lock again: another create of these bytes may have
                # registered them meanwhile, or our COMMIT may have landed before the connection
                # failed. The file goes only if no row refers to it.
                self._remove_if_unreferenced(sha, path)
        crashpoints.reached("adapter.committed")
        return record

    def _remove_if_unreferenced(self, sha: str, path: Path) -> bool:
        """Removes a blob file unless a row refers to its bytes, under the lock every create and
        delete of those bytes takes."""
        try:
            with self.db.transaction() as conn:
                conn.lock(f"steerserve:blob:{sha}")
                if conn.execute("SELECT 1 FROM adapters WHERE sha256=?", (sha,)).fetchone() is None:
                    path.unlink(missing_ok=True)
                    return True
        except Exception:  # noqa: BLE001 - the database is away: leave the file to the next sweep
            log.warning("could not check whether blob %s is still used; left for the next sweep", sha[:12])
        return False

    def sweep(self, min_age_s: float | None = None) -> list[Path]:
        """Removes what a crash can leave behind and no row refers to: temp files of interrupted
        writes, and blobs renamed into place whose registration never committed. Run at start.
        `min_age_s`: younger files are kept (default: the database's files_min_age_s)."""
        min_age_s = self.db.files_min_age_s if min_age_s is None else min_age_s
        referenced = {row["blob"] for row in self.db.connect().execute("SELECT blob FROM adapters").fetchall()}
        removed = []
        for path in settled_files(self.blob_root.rglob("*"), min_age_s):
            rel = path.relative_to(self.blob_root).as_posix()
            temp = path.name.endswith(".tmp")
            if not temp and (path.suffix != ".safetensors" or rel in referenced):
                continue
            sha = path.name.removesuffix(".safetensors")
            if rel == blob_path_for(sha):
                # Checked again under the blob's lock: a create of the same bytes may have just
                # registered this very file (it reuses a file already in place).
                if not self._remove_if_unreferenced(sha, path):
                    continue
            else:  # a temp file, or not a content path: nothing can use it
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
            conn.execute("DELETE FROM adapters WHERE adapter_id=? AND tenant=?", (adapter_id, tenant))
        # The row is gone first: a crash here leaves an orphan file, never a row without its file.
        # The file goes with its last row (identical bytes of other rows share it).
        self._remove_if_unreferenced(record.sha256, self.blob_root / record.blob)
        return record

    def blob_path(self, record: AdapterRecord) -> Path:
        return self.blob_root / record.blob

    def read_blob(self, record: AdapterRecord) -> bytes:
        data = self.blob_path(record).read_bytes()
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise BlobCorrupted(f"adapter {record.adapter_id!r}: stored file fails its checksum")
        return data
