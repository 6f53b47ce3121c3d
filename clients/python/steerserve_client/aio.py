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
from collections.abc import AsyncIterator

import grpc

from ._common import _UNSET, Call, ClientBase, JobHandleBase, Reopenings, Tries, edit_without_result
from ._connection import Connection
from ._generated.steerserve.v1 import steerserve_pb2 as pb
from .errors import SteerServeError, Unavailable, from_rpc_error
from .types import Adapter, EditResult, GenerateResult, Job, JobEvent


async def _report(callback, value) -> None:
    if callback is not None:
        result = callback(value)
        if inspect.isawaitable(result):
            await result


class AsyncClient(ClientBase):
    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _open_channel(self, connection: Connection) -> grpc.aio.Channel:
        return connection.aio_channel()

    # -- calls ---------------------------------------------------------------------------------

    async def _unary(self, call: Call):
        tries = Tries(call, self.retry)
        while True:
            try:
                reply = await self._start(call.rpc, call.request, tries.next())
            except grpc.aio.AioRpcError as err:
                error = from_rpc_error(err)
            else:
                return call.read(reply)
            await asyncio.sleep(tries.wait(error))

    async def _stream(self, call: Call) -> AsyncIterator:
        tries = Tries(call, self.retry)
        while True:
            started = False
            stream = self._start(call.rpc, call.request, tries.next())
            try:
                async for message in stream:
                    started = True
                    yield call.read(message)
                return
            except grpc.aio.AioRpcError as err:
                error = from_rpc_error(err)
            finally:
                stream.cancel()  # the caller stopped early: end the server's stream too
            await asyncio.sleep(tries.wait(error, repeatable=not started))

    # -- API -----------------------------------------------------------------------------------

    async def info(self, *, timeout=_UNSET) -> pb.ServerInfo:
        return await self._unary(self._calls.info(timeout))

    async def generate(self, prompt: str, *, adapters=None, timeout=_UNSET, **options) -> GenerateResult:
        return await self._unary(self._calls.generate(prompt, adapters, timeout, options))

    async def personalize(self, method, name: str, images, *, wait: bool = False, progress=None, timeout=_UNSET,
                          **options):
        handle = AsyncJobHandle(self, await self._unary(self._calls.personalize(method, name, images, timeout, options)))
        return await handle.wait(progress=progress) if wait else handle

    async def edit(self, source, source_prompt: str, target_prompt: str, *, adapter_id: str = "",
                   method="dreamsteerer", progress=None, timeout=_UNSET, **options) -> EditResult:
        call = self._calls.edit(source, source_prompt, target_prompt, adapter_id, method, progress is not None,
                                timeout, options)
        if progress is None:
            return await self._unary(call)
        async with contextlib.aclosing(self._stream(call)) as stream:
            async for report, result in stream:
                await _report(progress, report)
                if result is not None:
                    return result
        raise edit_without_result()


class AsyncJobHandle(JobHandleBase):
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
        return self._outcome()


class AsyncJobs:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def get(self, job_id: str, *, timeout=_UNSET) -> Job:
        return await self._c._unary(self._c._calls.get_job(job_id, timeout))

    async def list(self, *, timeout=_UNSET) -> list[Job]:
        return await self._c._unary(self._c._calls.list_jobs(timeout))

    async def cancel(self, job_id: str, *, timeout=_UNSET) -> Job:
        return await self._c._unary(self._c._calls.cancel_job(job_id, timeout))

    async def handle(self, job_id: str) -> AsyncJobHandle:
        return AsyncJobHandle(self._c, await self.get(job_id))

    async def watch(self, job_id: str, *, timeout=_UNSET) -> AsyncIterator[JobEvent]:
        """As Client.jobs.watch: reopened after UNAVAILABLE or an early end, within the retry policy."""
        watching = Reopenings(self._c._calls.watch_job(job_id, timeout), self._c.retry)
        while True:
            error: SteerServeError | None = None
            try:
                async with contextlib.aclosing(self._c._stream(watching.opening())) as stream:
                    async for event in stream:
                        watching.event()
                        yield event
                        if event.job.finished:
                            return
            except Unavailable as err:
                error = err
            await asyncio.sleep(watching.wait(error))


class AsyncAdapters:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def list(self, *, timeout=_UNSET) -> list[Adapter]:
        return await self._c._unary(self._c._calls.list_adapters(timeout))

    async def get(self, adapter_id: str, *, timeout=_UNSET) -> Adapter:
        return await self._c._unary(self._c._calls.get_adapter(adapter_id, timeout))

    async def import_(self, name: str, safetensors, *, token: str = "", alpha: float = 0.0,
                      idempotency_key: str | None = None, timeout=_UNSET) -> Adapter:
        return await self._c._unary(self._c._calls.import_adapter(name, safetensors, token, alpha, idempotency_key,
                                                                  timeout))

    async def create_image_prompt(self, name: str, images, *, timeout=_UNSET) -> Adapter:
        return await self._c._unary(self._c._calls.create_image_prompt(name, images, timeout))

    async def export(self, adapter_id: str, *, timeout=_UNSET) -> tuple[Adapter, bytes]:
        return await self._c._unary(self._c._calls.export_adapter(adapter_id, timeout))

    async def delete(self, adapter_id: str, *, timeout=_UNSET) -> None:
        await self._c._unary(self._c._calls.delete_adapter(adapter_id, timeout))


AsyncClient._Adapters, AsyncClient._Jobs = AsyncAdapters, AsyncJobs  # what `client.adapters` and `client.jobs` are
