"""Errors: one exception class per gRPC status the service answers (docs/clients.md lists when).

Every failed call raises a `SteerServeError` subclass carrying the status code, the server's message
(which names the field or limit at fault) and, for RESOURCE_EXHAUSTED, the server's estimate of when
a retry may be admitted.
"""

from __future__ import annotations

import grpc


class SteerServeError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, details: str, *, retry_after_s: float | None = None,
                 request_id: str | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s
        self.request_id = request_id


class InvalidArgument(SteerServeError): ...
class NotFound(SteerServeError): ...
class AlreadyExists(SteerServeError): ...
class PermissionDenied(SteerServeError): ...
class Unauthenticated(SteerServeError): ...
class ResourceExhausted(SteerServeError): ...
class FailedPrecondition(SteerServeError): ...
class DeadlineExceeded(SteerServeError): ...
class Unavailable(SteerServeError): ...
class Cancelled(SteerServeError): ...
class Internal(SteerServeError): ...


class JobFailed(Exception):
    """`wait()` on a job that ended FAILED or CANCELLED; `.job` is the job as it ended."""

    def __init__(self, job):
        super().__init__(f"job {job.job_id} {job.state}: {job.error or job.message}")
        self.job = job


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}


def _trailers(err) -> dict[str, str]:
    try:
        return {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}
    except Exception:  # noqa: BLE001 - some errors (client-side) have no trailers
        return {}


def pushback_s(trailers: dict[str, str]) -> float | None:
    """gRPC's standard retry pushback (`grpc-retry-pushback-ms`), in seconds; None if absent.
    A negative value means "do not retry" (gRPC's convention)."""
    value = trailers.get("grpc-retry-pushback-ms")
    if value is None:
        return None
    try:
        return int(value) / 1000.0
    except ValueError:
        return None


def from_rpc_error(err: grpc.RpcError, trailers: dict[str, str] | None = None) -> SteerServeError:
    """The typed error for a grpc.RpcError (sync) or grpc.aio.AioRpcError."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (err.details() if callable(getattr(err, "details", None)) else None) or str(err)
    trailers = _trailers(err) if trailers is None else trailers
    cls = _BY_CODE.get(code, SteerServeError)
    return cls(code, details, retry_after_s=pushback_s(trailers), request_id=trailers.get("x-request-id"))
