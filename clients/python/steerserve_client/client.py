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
from collections.abc import Callable, Iterator

import grpc

from ._common import _UNSET, Call, ClientBase, JobHandleBase, Reopenings, Tries, edit_without_result
from ._common import Timeouts  # noqa: F401 - its home before _common; still importable from here
from ._connection import Connection
from ._generated.steerserve.v1 import steerserve_pb2 as pb
from .errors import SteerServeError, Unavailable, from_rpc_error
from .types import Adapter, EditProgress, EditResult, GenerateResult, Job, JobEvent

class Client(ClientBase):
    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _open_channel(self, connection: Connection) -> grpc.Channel:
        return connection.channel()

    # -- calls ---------------------------------------------------------------------------------

    def _unary(self, call: Call):
        """One unary RPC with the retry policy, all attempts within one deadline."""
        tries = Tries(call, self.retry)
        while True:
            try:
                reply = self._start(call.rpc, call.request, tries.next())
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            else:
                return call.read(reply)
            time.sleep(tries.wait(error))

    def _stream(self, call: Call) -> Iterator:
        """A server-streaming RPC; retried (per the policy) only until its first message."""
        tries = Tries(call, self.retry)
        while True:
            started = False
            stream = self._start(call.rpc, call.request, tries.next())
            try:
                for message in stream:
                    started = True
                    yield call.read(message)
                return
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            finally:
                stream.cancel()  # the caller stopped early (or it ended): end the server's stream too
            time.sleep(tries.wait(error, repeatable=not started))

    # -- API -----------------------------------------------------------------------------------

    def info(self, *, timeout=_UNSET) -> pb.ServerInfo:
        """The server's version, limits and model profile (the API's ServerInfo message)."""
        return self._unary(self._calls.info(timeout))

    def generate(self, prompt: str, *, adapters=None, timeout=_UNSET, **options) -> GenerateResult:
        """Text to image. `adapters`: ids, (id, weight) pairs or {id: weight} (an image prompt's
        weight is its scale); `options`: steps, guidance_scale, width, height, seed, num_images,
        negative_prompt, style_guidance_scale, sampler, karras_sigmas, reference_images (1-5 photos:
        an image prompt for this request), image_prompt_scale."""
        return self._unary(self._calls.generate(prompt, adapters, timeout, options))

    def personalize(self, method, name: str, images, *, wait: bool = False,
                    progress: Callable[[JobEvent], None] | None = None, timeout=_UNSET, **options):
        """Starts a training job and returns its JobHandle (or, with wait=True, the finished Job:
        JobFailed if it failed). `options`: class_word, token, concepts, style_phrase, steps, rank,
        learning_rate, batch_size, seed, prior_loss_weight, train_text_encoder, num_class_images,
        idempotency_key (default: a fresh one, so our own retries are safe)."""
        handle = JobHandle(self, self._unary(self._calls.personalize(method, name, images, timeout, options)))
        return handle.wait(progress=progress) if wait else handle

    def edit(self, source, source_prompt: str, target_prompt: str, *, adapter_id: str = "", method="dreamsteerer",
             progress: Callable[[EditProgress], None] | None = None, timeout=_UNSET, **options) -> EditResult:
        """Edits `source` toward the adapter's concept. With `progress`, streams (EditStream) and
        calls it per phase/step. `options`: steps, guidance_scale, seed, options={EditOptions fields},
        reference_images and image_prompt_scale (method "dds": an image prompt)."""
        call = self._calls.edit(source, source_prompt, target_prompt, adapter_id, method, progress is not None,
                                timeout, options)
        if progress is None:
            return self._unary(call)
        for report, result in self._stream(call):
            progress(report)
            if result is not None:
                return result
        raise edit_without_result()


class JobHandle(JobHandleBase):
    """A personalization job: its latest state (`.job`), and waiting for it."""

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
        return self._outcome()


class Jobs:
    def __init__(self, client: Client):
        self._c = client

    def get(self, job_id: str, *, timeout=_UNSET) -> Job:
        return self._c._unary(self._c._calls.get_job(job_id, timeout))

    def list(self, *, timeout=_UNSET) -> list[Job]:
        return self._c._unary(self._c._calls.list_jobs(timeout))

    def cancel(self, job_id: str, *, timeout=_UNSET) -> Job:
        return self._c._unary(self._c._calls.cancel_job(job_id, timeout))

    def handle(self, job_id: str) -> JobHandle:
        return JobHandle(self._c, self.get(job_id))

    def watch(self, job_id: str, *, timeout=_UNSET) -> Iterator[JobEvent]:
        """The job's events until it ends, reopened after UNAVAILABLE or an early end (see
        _common.Reopenings); after `retry.max_attempts` reopenings in a row without an event, the
        error is raised."""
        watching = Reopenings(self._c._calls.watch_job(job_id, timeout), self._c.retry)
        while True:
            error: SteerServeError | None = None
            try:
                for event in self._c._stream(watching.opening()):
                    watching.event()
                    yield event
                    if event.job.finished:
                        return
            except Unavailable as err:
                error = err
            time.sleep(watching.wait(error))


class Adapters:
    def __init__(self, client: Client):
        self._c = client

    def list(self, *, timeout=_UNSET) -> list[Adapter]:
        return self._c._unary(self._c._calls.list_adapters(timeout))

    def get(self, adapter_id: str, *, timeout=_UNSET) -> Adapter:
        return self._c._unary(self._c._calls.get_adapter(adapter_id, timeout))

    def import_(self, name: str, safetensors, *, token: str = "", alpha: float = 0.0,
                idempotency_key: str | None = None, timeout=_UNSET) -> Adapter:
        """Registers a diffusers/peft LoRA safetensors file (bytes or a path)."""
        return self._c._unary(self._c._calls.import_adapter(name, safetensors, token, alpha, idempotency_key, timeout))

    def create_image_prompt(self, name: str, images, *, timeout=_UNSET) -> Adapter:
        """Stores an image prompt (method IMAGE_PROMPT) of 1-5 photos at once, no job; use it in
        generate(adapters=[(id, scale)]). Not retried (a repeat answers ALREADY_EXISTS by name)."""
        return self._c._unary(self._c._calls.create_image_prompt(name, images, timeout))

    def export(self, adapter_id: str, *, timeout=_UNSET) -> tuple[Adapter, bytes]:
        """The adapter and its diffusers-format LoRA safetensors bytes."""
        return self._c._unary(self._c._calls.export_adapter(adapter_id, timeout))

    def delete(self, adapter_id: str, *, timeout=_UNSET) -> None:
        self._c._unary(self._c._calls.delete_adapter(adapter_id, timeout))


Client._Adapters, Client._Jobs = Adapters, Jobs  # what `client.adapters` and `client.jobs` are
