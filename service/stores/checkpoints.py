"""Training checkpoints: the latest resumable state of each running job, one file per job.

Written atomically (temp file, fsync, rename, fsync the directory), so a crash mid-write leaves the
previous checkpoint intact; removed when the job ends.
"""

from __future__ import annotations

import re
from pathlib import Path

from .adapters import _write_atomically, settled_files

_JOB_ID = re.compile(r"^job-[0-9a-f]{1,40}$")


class CheckpointStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):  # ids are ours, but never let one become a path
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / f"{job_id}.ckpt"

    def write(self, job_id: str, state: bytes) -> None:
        _write_atomically(self._path(job_id), state)

    def read(self, job_id: str) -> bytes | None:
        path = self._path(job_id)
        return path.read_bytes() if path.is_file() else None

    def delete(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)

    def sweep(self, keep: set[str], min_age_s: float = 0.0) -> list[Path]:
        """Removes temp files of interrupted writes and checkpoints of jobs not in `keep` (the
        unfinished ones); run at start. `min_age_s`: younger files are kept (on a volume shared by
        replicas, another runner may be writing one right now)."""
        removed = []
        for path in settled_files(self.root.iterdir(), min_age_s):
            if path.name.endswith(".tmp") or path.name.removesuffix(".ckpt") not in keep:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed
