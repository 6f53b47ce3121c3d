"""The asyncio client: the same calls as `Client`, awaited (grpc.aio underneath).

    async with AsyncClient() as client:
        result = await client.generate("a red circle", seed=1)
        job = await client.personalize("textual-inversion", "my-cat", photos, class_word="cat")
        job = await job.wait(progress=lambda e: print(e.step))

Progress callbacks may be plain functions or coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Iterable

import grpc

from . import _requests as build
from ._connection import Connection
from ._generated.steerserve.v1 import steerserve_pb2 as pb
from ._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from ._retry import RetryPolicy
from .client import _UNSET, Timeouts, _reopen_delay
from .errors import JobFailed, SteerServeError, Unavailable, from_rpc_error
from .types import Adapter, EditProgress, EditResult, GenerateResult, Job, JobEvent


async def _report(callback, value) -> None:
    if callback is not None:
        result = callback(value)
        if inspect.isawaitable(result):
            await result


class AsyncClient:
    def __init__(self, address: str | None = None, token: str | None = None, *, tls: bool | None = None,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 retry: RetryPolicy | None = None, timeouts: Timeouts | None = None,
                 metadata: Iterable[tuple[str, str]] = ()):
        self.connection = Connection.from_env(address, token, tls=tls, ca_file=ca_file, cert_file=cert_file,
                                              key_file=key_file)
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self._metadata = self.connection.metadata() + tuple(metadata)
        self._channel = self.connection.aio_channel()
        self._stub = pb_grpc.SteerServeStub(self._channel)
        self.adapters = AsyncAdapters(self)
        self.jobs = AsyncJobs(self)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, rpc: str, request, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await getattr(self._stub, rpc)(request, metadata=self._metadata, timeout=left)
            except grpc.aio.AioRpcError as err:
                error = from_rpc_error(err)
            left = None if deadline is None else deadline - time.monotonic()
            wait = self.retry.delay(rpc, attempt, error, left)
            if wait is None:
                raise error from None
            await asyncio.sleep(wait)

    async def _stream(self, rpc: str, request, timeout) -> AsyncIterator:
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            started = False
            call = getattr(self._stub, rpc)(request, metadata=self._metadata, timeout=left)
            try:
                async for message in call:
                    started = True
                    yield message
                return
            except grpc.aio.AioRpcError as err:
                error = from_rpc_error(err)
            finally:
                call.cancel()  # the caller stopped early: end the server's stream too
            left = None if deadline is None else deadline - time.monotonic()
            wait = None if started else self.retry.delay(rpc, attempt, error, left)
            if wait is None:
                raise error from None
            await asyncio.sleep(wait)

    def _timeout(self, given, default):
        return default if given is _UNSET else given

    async def info(self, *, timeout=_UNSET) -> pb.ServerInfo:
        return await self._call("GetServerInfo", pb.GetServerInfoRequest(), self._timeout(timeout, self.timeouts.read))

    async def generate(self, prompt: str, *, adapters=None, timeout=_UNSET, **options) -> GenerateResult:
        request = build.generate(prompt, adapters=adapters, **options)
        return GenerateResult.from_pb(await self._call("Generate", request,
                                                       self._timeout(timeout, self.timeouts.generate)))

    async def personalize(self, method, name: str, images, *, wait: bool = False, progress=None, timeout=_UNSET,
                          **options):
        request = build.personalize(method, name, images, **options)
        job = Job.from_pb(await self._call("Personalize", request, self._timeout(timeout, self.timeouts.upload)))
        handle = AsyncJobHandle(self, job)
        return await handle.wait(progress=progress) if wait else handle

    async def edit(self, source, source_prompt: str, target_prompt: str, *, adapter_id: str = "",
                   method="dreamsteerer", progress=None, timeout=_UNSET, **options) -> EditResult:
        request = build.edit(source, source_prompt, target_prompt, adapter_id=adapter_id, method=method, **options)
        timeout = self._timeout(timeout, self.timeouts.edit)
        if progress is None:
            return EditResult.from_pb(await self._call("Edit", request, timeout))
        async with contextlib.aclosing(self._stream("EditStream", request, timeout)) as stream:
            async for event in stream:
                await _report(progress, EditProgress(event.phase, event.step, event.total_steps, event.progress))
                if event.HasField("result"):
                    return EditResult.from_pb(event.result)
        raise SteerServeError(grpc.StatusCode.INTERNAL, "the edit stream ended without a result")


class AsyncJobHandle:
    def __init__(self, client: AsyncClient, job: Job):
        self._client = client
        self.job = job

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def __repr__(self) -> str:
        return f"AsyncJobHandle({self.job.job_id!r}, {self.job.state})"

    async def refresh(self) -> Job:
        self.job = await self._client.jobs.get(self.job_id)
        return self.job

    async def cancel(self) -> Job:
        self.job = await self._client.jobs.cancel(self.job_id)
        return self.job

    async def watch(self, *, timeout=_UNSET) -> AsyncIterator[JobEvent]:
        async for event in self._client.jobs.watch(self.job_id, timeout=timeout):
            self.job = event.job
            yield event

    async def wait(self, progress=None, *, timeout=_UNSET) -> Job:
        async for event in self.watch(timeout=timeout):
            await _report(progress, event)
        if self.job.state != "SUCCEEDED":
            raise JobFailed(self.job)
        return self.job


class AsyncJobs:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def get(self, job_id: str, *, timeout=_UNSET) -> Job:
        c = self._c
        return Job.from_pb(await c._call("GetJob", pb.GetJobRequest(job_id=job_id),
                                         c._timeout(timeout, c.timeouts.read)))

    async def list(self, *, timeout=_UNSET) -> list[Job]:
        c = self._c
        r = await c._call("ListJobs", pb.ListJobsRequest(), c._timeout(timeout, c.timeouts.read))
        return [Job.from_pb(j) for j in r.jobs]

    async def cancel(self, job_id: str, *, timeout=_UNSET) -> Job:
        c = self._c
        return Job.from_pb(await c._call("CancelJob", pb.CancelJobRequest(job_id=job_id),
                                         c._timeout(timeout, c.timeouts.read)))

    async def handle(self, job_id: str) -> AsyncJobHandle:
        return AsyncJobHandle(self._c, await self.get(job_id))

    async def watch(self, job_id: str, *, timeout=_UNSET) -> AsyncIterator[JobEvent]:
        """As Client.jobs.watch: reopened after UNAVAILABLE or an early end, within the retry policy."""
        c = self._c
        timeout = c._timeout(timeout, c.timeouts.watch)
        deadline = None if timeout is None else time.monotonic() + timeout
        barren = 0
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            error: SteerServeError | None = None
            try:
                async with contextlib.aclosing(c._stream("WatchJob", pb.WatchJobRequest(job_id=job_id), left)) as stream:
                    async for message in stream:
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
            await asyncio.sleep(wait)


class AsyncAdapters:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def list(self, *, timeout=_UNSET) -> list[Adapter]:
        c = self._c
        r = await c._call("ListAdapters", pb.ListAdaptersRequest(), c._timeout(timeout, c.timeouts.read))
        return [Adapter.from_pb(a) for a in r.adapters]

    async def get(self, adapter_id: str, *, timeout=_UNSET) -> Adapter:
        c = self._c
        return Adapter.from_pb(await c._call("GetAdapter", pb.GetAdapterRequest(adapter_id=adapter_id),
                                             c._timeout(timeout, c.timeouts.read)))

    async def import_(self, name: str, safetensors, *, token: str = "", alpha: float = 0.0,
                      idempotency_key: str | None = None, timeout=_UNSET) -> Adapter:
        c = self._c
        request = build.import_adapter(name, safetensors, token=token, alpha=alpha, idempotency_key=idempotency_key)
        return Adapter.from_pb(await c._call("ImportAdapter", request, c._timeout(timeout, c.timeouts.upload)))

    async def export(self, adapter_id: str, *, timeout=_UNSET) -> tuple[Adapter, bytes]:
        c = self._c
        r = await c._call("ExportAdapter", pb.ExportAdapterRequest(adapter_id=adapter_id),
                          c._timeout(timeout, c.timeouts.upload))
        return Adapter.from_pb(r.adapter), bytes(r.safetensors)

    async def delete(self, adapter_id: str, *, timeout=_UNSET) -> None:
        c = self._c
        await c._call("DeleteAdapter", pb.DeleteAdapterRequest(adapter_id=adapter_id),
                      c._timeout(timeout, c.timeouts.read))
