"""Durable state: the adapter registry (+ safetensors blobs), the job table and training checkpoints.

The embedded default keeps both in one SQLite database (WAL) and a blob directory. The interfaces
(`AdapterStore`, `JobStore`) are small on purpose so a server-grade store can replace them.
"""

from .adapters import AdapterAlreadyExists, AdapterRecord, AdapterStore, BlobCorrupted, QuotaExceeded
from .checkpoints import CheckpointStore
from .db import NotFound, is_disk_full, open_database
from .jobs import JobRecord, JobState, JobStore

__all__ = [
    "AdapterAlreadyExists",
    "AdapterRecord",
    "AdapterStore",
    "BlobCorrupted",
    "CheckpointStore",
    "JobRecord",
    "JobState",
    "JobStore",
    "NotFound",
    "is_disk_full",
    "QuotaExceeded",
    "open_database",
]
