"""Durable state: the adapter registry (+ safetensors blobs), the job table and training checkpoints.

The embedded default keeps both in one SQLite database (WAL) and a blob directory; with
STEERSERVE_DATABASE_URL=postgresql://... every gateway replica shares one PostgreSQL database and
one blob volume. The schema is one list of migrations (migrations.py) applied at start.
"""

from .adapters import AdapterAlreadyExists, AdapterRecord, AdapterStore, BlobCorrupted, QuotaExceeded, blob_path_for
from .checkpoints import CheckpointStore
from .db import Database, NotFound, is_database_unavailable, is_disk_full, open_database
from .jobs import JobRecord, JobState, JobStore, LeaseLost

__all__ = [
    "AdapterAlreadyExists",
    "AdapterRecord",
    "AdapterStore",
    "BlobCorrupted",
    "Database",
    "LeaseLost",
    "blob_path_for",
    "is_database_unavailable",
    "CheckpointStore",
    "JobRecord",
    "JobState",
    "JobStore",
    "NotFound",
    "is_disk_full",
    "QuotaExceeded",
    "open_database",
]
