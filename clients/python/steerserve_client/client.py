"""The synchronous client.

    from steerserve_client import Client

    with Client() as client:                                   # STEERSERVE_ADDRESS / STEERSERVE_TOKEN
        image = client.generate("a red circle", seed=1).images[0]
        job = client.personalize("dreambooth-lora", "my-dog", ["a.png", "b.png", "c.png"], class_word="dog")
        job = job.wait(progress=lambda e: print(e.step, e.total_steps))
        edited = client.edit("photo.png", "a dog on grass", f"a {job.token} dog on grass", adapter_id=job.adapter_id)

Every call has a deadline (Timeouts) and is retried only where that is safe (see _retry.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc

from . import _requests as build
from ._connection import Connection
from ._generated.steerserve.v1 import steerserve_pb2 as pb
from ._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from ._retry import RetryPolicy
from .errors import JobFailed, SteerServeError, Unavailable, from_rpc_error
from .types import Adapter, EditProgress, EditResult, GenerateResult, Job, JobEvent

_UNSET = object()


@dataclass(frozen=True)
class Timeouts:
    """Default deadlines in seconds, per kind of call (a call's `timeout=` overrides; None = none)."""
    read: float | None = 30.0       # info, get, list, cancel, delete
    generate: float | None = 300.0
    edit: float | None = 1800.0     # DreamSteerer steers an adapter copy first: minutes on a CPU
    upload: float | None = 120.0    # Personalize, ImportAdapter, ExportAdapter (images, adapter files)
    watch: float | None = None      # WatchJob / wait(): as long as training takes, unless given


class Client:
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
        self._channel = self.connection.channel()
        self._stub = pb_grpc.SteerServeStub(self._channel)
        self.adapters = Adapters(self)
        self.jobs = Jobs(self)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls ---------------------------------------------------------------------------------

    def _call(self, rpc: str, request, timeout):
        """One unary RPC with the retry policy, all attempts within one deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return getattr(self._stub, rpc)(request, metadata=self._metadata, timeout=left)
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            left = None if deadline is None else deadline - time.monotonic()
            wait = self.retry.delay(rpc, attempt, error, left)
            if wait is None:
                raise error from None
            time.sleep(wait)

    def _stream(self, rpc: str, request, timeout) -> Iterator:
        """A server-streaming RPC; retried (per the policy) only until its first message, since a
        stream that has begun cannot be resumed transparently."""
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            started = False
            call = getattr(self._stub, rpc)(request, metadata=self._metadata, timeout=left)
            try:
                for message in call:
                    started = True
                    yield message
                return
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            finally:
                call.cancel()  # the caller stopped early (or it ended): end the server's stream too
            left = None if deadline is None else deadline - time.monotonic()
            wait = None if started else self.retry.delay(rpc, attempt, error, left)
            if wait is None:
                raise error from None
            time.sleep(wait)

    def _timeout(self, given, default):
        return default if given is _UNSET else given

    # -- API -----------------------------------------------------------------------------------

    def info(self, *, timeout=_UNSET) -> pb.ServerInfo:
        """The server's version, limits and model profile (the API's ServerInfo message)."""
        return self._call("GetServerInfo", pb.GetServerInfoRequest(), self._timeout(timeout, self.timeouts.read))

    def generate(self, prompt: str, *, adapters=None, timeout=_UNSET, **options) -> GenerateResult:
        """Text to image. `adapters`: ids, (id, weight) pairs or {id: weight}; `options`: steps,
        guidance_scale, width, height, seed, num_images, negative_prompt, style_guidance_scale."""
        request = build.generate(prompt, adapters=adapters, **options)
        return GenerateResult.from_pb(self._call("Generate", request, self._timeout(timeout, self.timeouts.generate)))

    def personalize(self, method, name: str, images, *, wait: bool = False,
                    progress: Callable[[JobEvent], None] | None = None, timeout=_UNSET, **options):
        """Starts a training job and returns its JobHandle (or, with wait=True, the finished Job:
        JobFailed if it failed). `options`: class_word, token, concepts, style_phrase, steps, rank,
        learning_rate, batch_size, seed, prior_loss_weight, train_text_encoder, num_class_images,
        idempotency_key (default: a fresh one, so our own retries are safe)."""
        request = build.personalize(method, name, images, **options)
        job = Job.from_pb(self._call("Personalize", request, self._timeout(timeout, self.timeouts.upload)))
        handle = JobHandle(self, job)
        return handle.wait(progress=progress) if wait else handle

    def edit(self, source, source_prompt: str, target_prompt: str, *, adapter_id: str = "", method="dreamsteerer",
             progress: Callable[[EditProgress], None] | None = None, timeout=_UNSET, **options) -> EditResult:
        """Edits `source` toward the adapter's concept. With `progress`, streams (EditStream) and
        calls it per phase/step. `options`: steps, guidance_scale, seed, options={EditOptions fields}."""
        request = build.edit(source, source_prompt, target_prompt, adapter_id=adapter_id, method=method, **options)
        timeout = self._timeout(timeout, self.timeouts.edit)
        if progress is None:
            return EditResult.from_pb(self._call("Edit", request, timeout))
        for event in self._stream("EditStream", request, timeout):
            progress(EditProgress(event.phase, event.step, event.total_steps, event.progress))
            if event.HasField("result"):
                return EditResult.from_pb(event.result)
        raise SteerServeError(grpc.StatusCode.INTERNAL, "the edit stream ended without a result")


class JobHandle:
    """A personalization job: its latest state (`.job`), and waiting for it."""

    def __init__(self, client: Client, job: Job):
        self._client = client
        self.job = job

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.job.job_id!r}, {self.job.state})"

    def refresh(self) -> Job:
        self.job = self._client.jobs.get(self.job_id)
        return self.job

    def cancel(self) -> Job:
        self.job = self._client.jobs.cancel(self.job_id)
        return self.job

    def watch(self, *, timeout=_UNSET) -> Iterator[JobEvent]:
        for event in self._client.jobs.watch(self.job_id, timeout=timeout):
            self.job = event.job
            yield event

    def wait(self, progress: Callable[[JobEvent], None] | None = None, *, timeout=_UNSET) -> Job:
        """Follows the job until it ends; `progress(event)` per change (step, loss, ETA, state).
        Returns the SUCCEEDED job (with previews); raises JobFailed if it FAILED or was CANCELLED."""
        for event in self.watch(timeout=timeout):  # ends when the job does (or raises)
            if progress is not None:
                progress(event)
        if self.job.state != "SUCCEEDED":
            raise JobFailed(self.job)
        return self.job


class Jobs:
    def __init__(self, client: Client):
        self._c = client

    def get(self, job_id: str, *, timeout=_UNSET) -> Job:
        c = self._c
        return Job.from_pb(c._call("GetJob", pb.GetJobRequest(job_id=job_id), c._timeout(timeout, c.timeouts.read)))

    def list(self, *, timeout=_UNSET) -> list[Job]:
        c = self._c
        return [Job.from_pb(j) for j in c._call("ListJobs", pb.ListJobsRequest(),
                                                c._timeout(timeout, c.timeouts.read)).jobs]

    def cancel(self, job_id: str, *, timeout=_UNSET) -> Job:
        c = self._c
        return Job.from_pb(c._call("CancelJob", pb.CancelJobRequest(job_id=job_id),
                                   c._timeout(timeout, c.timeouts.read)))

    def handle(self, job_id: str) -> JobHandle:
        return JobHandle(self._c, self.get(job_id))

    def watch(self, job_id: str, *, timeout=_UNSET) -> Iterator[JobEvent]:
        """The job's events until it ends. Watching is a read: a stream broken by UNAVAILABLE (a
        replica restarting) or ended before the job did is reopened and continues from the current
        state; after `retry.max_attempts` reopenings in a row without an event, the error is raised."""
        c = self._c
        timeout = c._timeout(timeout, c.timeouts.watch)
        deadline = None if timeout is None else time.monotonic() + timeout
        barren = 0  # reopenings in a row that brought no event
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            error: SteerServeError | None = None
            try:
                for message in c._stream("WatchJob", pb.WatchJobRequest(job_id=job_id), left):
                    barren = 0
                    event = JobEvent.from_pb(message)
                    yield event
                    if event.job.finished:
                        return
            except Unavailable as err:
                error = err
            barren += 1
            wait = _reopen_delay(c.retry, barren, deadline)
            if wait is None:
                if error is not None:
                    raise error
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"the watch of job {job_id} kept ending before the job")
            time.sleep(wait)


def _reopen_delay(retry: RetryPolicy, barren: int, deadline: float | None) -> float | None:
    """Backoff before reopening a watch, or None to give up (too many barren tries, or past the deadline)."""
    if barren >= retry.max_attempts:
        return None
    wait = min(retry.max_backoff_s, retry.initial_backoff_s * retry.multiplier ** (barren - 1))
    if deadline is not None and time.monotonic() + wait >= deadline:
        return None
    return wait


class Adapters:
    def __init__(self, client: Client):
        self._c = client

    def list(self, *, timeout=_UNSET) -> list[Adapter]:
        c = self._c
        return [Adapter.from_pb(a) for a in c._call("ListAdapters", pb.ListAdaptersRequest(),
                                                    c._timeout(timeout, c.timeouts.read)).adapters]

    def get(self, adapter_id: str, *, timeout=_UNSET) -> Adapter:
        c = self._c
        return Adapter.from_pb(c._call("GetAdapter", pb.GetAdapterRequest(adapter_id=adapter_id),
                                       c._timeout(timeout, c.timeouts.read)))

    def import_(self, name: str, safetensors, *, token: str = "", alpha: float = 0.0,
                idempotency_key: str | None = None, timeout=_UNSET) -> Adapter:
        """Registers a diffusers/peft LoRA safetensors file (bytes or a path)."""
        c = self._c
        request = build.import_adapter(name, safetensors, token=token, alpha=alpha, idempotency_key=idempotency_key)
        return Adapter.from_pb(c._call("ImportAdapter", request, c._timeout(timeout, c.timeouts.upload)))

    def export(self, adapter_id: str, *, timeout=_UNSET) -> tuple[Adapter, bytes]:
        """The adapter and its diffusers-format LoRA safetensors bytes."""
        c = self._c
        r = c._call("ExportAdapter", pb.ExportAdapterRequest(adapter_id=adapter_id),
                    c._timeout(timeout, c.timeouts.upload))
        return Adapter.from_pb(r.adapter), bytes(r.safetensors)

    def delete(self, adapter_id: str, *, timeout=_UNSET) -> None:
        c = self._c
        c._call("DeleteAdapter", pb.DeleteAdapterRequest(adapter_id=adapter_id), c._timeout(timeout, c.timeouts.read))
