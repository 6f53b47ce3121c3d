"""What the sync and async clients share, written once: settings and channel set-up, every API call
as a `Call` (its RPC, request, deadline, and how its reply is read), the bookkeeping of retries
and of a watch's reopenings, and the job handle's state. Each client only does its own I/O: a
blocking call and `time.sleep` (client.py), or an awaited one and `asyncio.sleep` (aio.py).
Request messages are built in _requests.py; when a failure is retried is _retry.py's policy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from . import _requests as build
from ._connection import Connection
from ._generated.steerserve.v1 import steerserve_pb2 as pb
from ._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from ._retry import RetryPolicy
from .errors import JobFailed, SteerServeError, Unavailable
from .types import Adapter, EditProgress, EditResult, GenerateResult, Job, JobEvent

_UNSET = object()  # a call's `timeout=` not given: the client's Timeouts decide


@dataclass(frozen=True)
class Timeouts:
    """Default deadlines in seconds, per kind of call (a call's `timeout=` overrides; None = none)."""
    read: float | None = 30.0       # info, get, list, cancel, delete
    generate: float | None = 300.0
    edit: float | None = 1800.0     # DreamSteerer steers an adapter copy first: minutes on a CPU
    upload: float | None = 120.0    # Personalize, ImportAdapter, ExportAdapter (images, adapter files)
    watch: float | None = None      # WatchJob / wait(): as long as training takes, unless given


def _same(reply):
    return reply


@dataclass(frozen=True)
class Call:
    """One API call as both clients make it: `read` turns the reply (each message, for a stream)
    into what the client returns."""
    rpc: str
    request: Any
    timeout: float | None
    read: Callable[[Any], Any] = _same


def _edit_event(event: pb.EditEvent) -> tuple[EditProgress, EditResult | None]:
    """An EditStream message: the progress to report, and the result (on the last one only)."""
    progress = EditProgress(event.phase, event.step, event.total_steps, event.progress)
    return progress, EditResult.from_pb(event.result) if event.HasField("result") else None


def edit_without_result() -> SteerServeError:
    return SteerServeError(grpc.StatusCode.INTERNAL, "the edit stream ended without a result")


class Calls:
    """Every API method as a `Call`, with its deadline from the client's `timeouts` unless given."""

    def __init__(self, client: "ClientBase"):
        self._client = client

    def _within(self, given, kind: str) -> float | None:
        return getattr(self._client.timeouts, kind) if given is _UNSET else given

    def info(self, timeout) -> Call:
        return Call("GetServerInfo", pb.GetServerInfoRequest(), self._within(timeout, "read"))

    def generate(self, prompt: str, adapters, timeout, options: dict) -> Call:
        return Call("Generate", build.generate(prompt, adapters=adapters, **options), self._within(timeout, "generate"),
                    GenerateResult.from_pb)

    def personalize(self, method, name: str, images, timeout, options: dict) -> Call:
        return Call("Personalize", build.personalize(method, name, images, **options), self._within(timeout, "upload"),
                    Job.from_pb)

    def edit(self, source, source_prompt: str, target_prompt: str, adapter_id: str, method, streamed: bool, timeout,
             options: dict) -> Call:
        """Edit, or with `streamed` EditStream (read as (EditProgress, EditResult or None) per event)."""
        request = build.edit(source, source_prompt, target_prompt, adapter_id=adapter_id, method=method, **options)
        timeout = self._within(timeout, "edit")
        if streamed:
            return Call("EditStream", request, timeout, _edit_event)
        return Call("Edit", request, timeout, EditResult.from_pb)

    def get_job(self, job_id: str, timeout) -> Call:
        return Call("GetJob", pb.GetJobRequest(job_id=job_id), self._within(timeout, "read"), Job.from_pb)

    def list_jobs(self, timeout) -> Call:
        return Call("ListJobs", pb.ListJobsRequest(), self._within(timeout, "read"),
                    lambda r: [Job.from_pb(j) for j in r.jobs])

    def cancel_job(self, job_id: str, timeout) -> Call:
        return Call("CancelJob", pb.CancelJobRequest(job_id=job_id), self._within(timeout, "read"), Job.from_pb)

    def watch_job(self, job_id: str, timeout) -> Call:
        return Call("WatchJob", pb.WatchJobRequest(job_id=job_id), self._within(timeout, "watch"), JobEvent.from_pb)

    def list_adapters(self, timeout) -> Call:
        return Call("ListAdapters", pb.ListAdaptersRequest(), self._within(timeout, "read"),
                    lambda r: [Adapter.from_pb(a) for a in r.adapters])

    def get_adapter(self, adapter_id: str, timeout) -> Call:
        return Call("GetAdapter", pb.GetAdapterRequest(adapter_id=adapter_id), self._within(timeout, "read"),
                    Adapter.from_pb)

    def import_adapter(self, name: str, safetensors, token: str, alpha: float, idempotency_key: str | None,
                       timeout) -> Call:
        request = build.import_adapter(name, safetensors, token=token, alpha=alpha, idempotency_key=idempotency_key)
        return Call("ImportAdapter", request, self._within(timeout, "upload"), Adapter.from_pb)

    def create_image_prompt(self, name: str, images, timeout) -> Call:
        return Call("CreateImagePrompt", build.create_image_prompt(name, images), self._within(timeout, "upload"),
                    Adapter.from_pb)

    def export_adapter(self, adapter_id: str, timeout) -> Call:
        return Call("ExportAdapter", pb.ExportAdapterRequest(adapter_id=adapter_id), self._within(timeout, "upload"),
                    lambda r: (Adapter.from_pb(r.adapter), bytes(r.safetensors)))

    def delete_adapter(self, adapter_id: str, timeout) -> Call:
        return Call("DeleteAdapter", pb.DeleteAdapterRequest(adapter_id=adapter_id), self._within(timeout, "read"),
                    lambda r: None)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Tries:
    """One call's attempts, all within its deadline, and whether (after how long) to try again."""

    def __init__(self, call: Call, retry: RetryPolicy):
        self.rpc, self.retry = call.rpc, retry
        self.deadline = _deadline(call.timeout)
        self.attempt = 0

    def next(self) -> float | None:
        """Starts an attempt: the time it has."""
        self.attempt += 1
        return _left(self.deadline)

    def wait(self, error: SteerServeError, *, repeatable: bool = True) -> float:
        """Seconds to wait before the next attempt; raises `error` where the policy (or a stream that
        has begun, which cannot be resumed transparently: `repeatable=False`) says not to retry."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        wait = self.retry.delay(self.rpc, self.attempt, error, left) if repeatable else None
        if wait is None:
            raise error from None
        return wait


class Reopenings:
    """A job watch's streams. Watching is a read: a stream broken by UNAVAILABLE (a replica
    restarting) or ended before the job did is reopened and continues from the current state;
    after `retry.max_attempts` reopenings in a row without an event, or past the deadline, it gives up."""

    def __init__(self, call: Call, retry: RetryPolicy):
        self.call, self.retry = call, retry
        self.deadline = _deadline(call.timeout)
        self.barren = 0  # reopenings in a row that brought no event

    def opening(self) -> Call:
        """The next stream's call, with the time left."""
        return dataclasses.replace(self.call, timeout=_left(self.deadline))

    def event(self) -> None:
        self.barren = 0

    def wait(self, error: Unavailable | None) -> float:
        """Backoff before reopening after a stream ended (with `error`, or cleanly before the job
        did); raises the error (or Unavailable) to give up."""
        self.barren += 1
        r = self.retry
        if self.barren < r.max_attempts:
            wait = min(r.max_backoff_s, r.initial_backoff_s * r.multiplier ** (self.barren - 1))
            if self.deadline is None or time.monotonic() + wait < self.deadline:
                return wait
        if error is not None:
            raise error
        raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                          f"the watch of job {self.call.request.job_id} kept ending before the job")


class ClientBase:
    """Settings, channel and stub; the sync and async clients differ in their channel and I/O."""
    _Adapters: type
    _Jobs: type

    def __init__(self, address: str | None = None, token: str | None = None, *, tls: bool | None = None,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 retry: RetryPolicy | None = None, timeouts: Timeouts | None = None,
                 metadata: Iterable[tuple[str, str]] = ()):
        """Settings not given come from the environment (see _connection.py); `metadata`: extra
        headers on every call (e.g. a `traceparent` or `x-request-id`)."""
        self.connection = Connection.from_env(address, token, tls=tls, ca_file=ca_file, cert_file=cert_file,
                                              key_file=key_file)
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self._metadata = self.connection.metadata() + tuple(metadata)
        self._channel = self._open_channel(self.connection)
        self._stub = pb_grpc.SteerServeStub(self._channel)
        self._calls = Calls(self)
        self.adapters = self._Adapters(self)
        self.jobs = self._Jobs(self)

    def _open_channel(self, connection: Connection):
        raise NotImplementedError

    def _start(self, rpc: str, request, timeout: float | None):
        """One attempt: the stub's call (a reply, an awaitable or a stream, per client and RPC)."""
        return getattr(self._stub, rpc)(request, metadata=self._metadata, timeout=timeout)


class JobHandleBase:
    """A personalization job: its latest state (`.job`), and waiting for it."""

    def __init__(self, client: ClientBase, job: Job):
        self._client = client
        self.job = job

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.job.job_id!r}, {self.job.state})"

    def _outcome(self) -> Job:
        """The job once its watch has ended: the SUCCEEDED job, else JobFailed."""
        if self.job.state != "SUCCEEDED":
            raise JobFailed(self.job)
        return self.job
