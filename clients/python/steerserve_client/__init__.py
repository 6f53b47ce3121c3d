"""SteerServe's Python client: generate, personalize, edit, adapters and jobs over gRPC.

    pip install ./clients/python            # from a checkout (no torch, no service code)

    from steerserve_client import Client
    with Client("127.0.0.1:50051", token="...") as client:
        client.generate("a red dotted star", seed=0).images[0].save("star.png")

See docs/clients.md for errors, retries, deadlines and TLS.
"""

from ._common import Timeouts
from ._connection import ConfigError, Connection
from ._generated.steerserve.v1 import steerserve_pb2 as pb
from ._retry import NO_RETRY, SAFE_TO_RETRY, RetryPolicy
from .aio import AsyncClient, AsyncJobHandle
from .client import Client, JobHandle
from .errors import (
    AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, JobFailed, NotFound,
    PermissionDenied, ResourceExhausted, SteerServeError, Unauthenticated, Unavailable,
)
from .types import Adapter, AdapterContents, ComponentContents, EditProgress, EditResult, GenerateResult, ImageData, Job, JobEvent, Timings

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterContents", "AlreadyExists", "AsyncClient", "AsyncJobHandle", "Cancelled", "Client", "ComponentContents", "ConfigError", "Connection",
    "DeadlineExceeded", "EditProgress", "EditResult", "FailedPrecondition", "GenerateResult", "ImageData", "Internal",
    "InvalidArgument", "Job", "JobEvent", "JobFailed", "JobHandle", "NO_RETRY", "NotFound", "PermissionDenied",
    "ResourceExhausted", "RetryPolicy", "SAFE_TO_RETRY", "SteerServeError", "Timeouts", "Timings", "Unauthenticated",
    "Unavailable", "pb",
]
