"""The job runner: durable personalization jobs, from Personalize to a registered adapter.

    submit()  -> a QUEUED row (bounded queue, per-tenant limit); idle workers are woken
    worker    -> claims the oldest ready job (RUNNING under this runner's lease, renewed by a
                 heartbeat); backend.personalize(spec, resume, progress) trains in-process or on
                 Triton's `personalize` model; every `checkpoint_every` steps the trained
                 parameters are written to the checkpoint store; the adapter is validated against
                 the serving bank, written atomically and registered; previews are made through
                 the ordinary Generate path; SUCCEEDED with them in one commit
    cancel()  -> CANCELLED at once; a running job stops before its next step (on another
                 replica: at its runner's next heartbeat)
    restart   -> RUNNING jobs go back to QUEUED and resume from their last checkpoint; with
                 several gateway replicas on one PostgreSQL, a dead runner's jobs are claimed by
                 any replica once their lease expires (checkpoints live on the shared volume)

Nothing is lost: a job's row is committed before Personalize answers, every state change is a
commit, a job that fails ends FAILED with the reason, and one that keeps failing to finish (a crash
loop, a model server that stays away) ends FAILED after `job_max_attempts` starts. The adapter id
is derived from the job id, so a job interrupted between registering its adapter and finishing
finds its adapter at the next start instead of training twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

from service import crashpoints, tracing
from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.adapters import Adapter, AdapterFormatError, parse_adapter, serialize_adapter
from service.admission import generate_cost
from service.backends import Backend, BackendUnavailable
from service.config import Settings
from service.engine.images import encode_png
from service.engine.pipeline import AdapterUse, GenerationSpec
from service.personalize import FINESTYLE, TrainingStopped, finestyle
from service.personalize.spec import unpack_checkpoint
from service.stores import (
    AdapterAlreadyExists, AdapterStore, CheckpointStore, JobRecord, JobState, JobStore, LeaseLost, NotFound,
    is_database_unavailable, is_disk_full,
)
from service.stores import idempotency

from . import requests

log = logging.getLogger("steerserve.jobs")

_PROGRESS_WRITE_SECONDS = 0.5  # progress rows are committed at most this often (state changes at once)
_RETRY_SECONDS = 5.0  # before a job whose model server was unavailable runs again


class QueueFull(RuntimeError):
    """The training queue or the tenant's job limit is full (RESOURCE_EXHAUSTED)."""


class NameTaken(ValueError):
    """The adapter name is taken by an adapter or an active job of the tenant (ALREADY_EXISTS)."""


def adapter_id_for(job_id: str) -> str:
    return "ad-" + hashlib.sha256(job_id.encode()).hexdigest()[:20]


class JobProgress:
    """The personalize.Progress of one running job: throttled progress rows, ETA, checkpoints, stop."""

    def __init__(self, runner: "JobRunner", job: JobRecord):
        self.runner, self.job = runner, job
        self.stop = threading.Event()
        self.cancelled = False
        self.lost = False  # the lease passed to another runner: stop without writing
        self.resumed_from = 0  # the step this attempt's training resumed from (0: from the start)
        self._first: tuple[int, float] | None = None  # (step, time) of the first step of this attempt
        self._last_write = 0.0

    def step(self, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = (step - 1, now - 1e-9)
        done, started = step - self._first[0], self._first[1]
        eta = (total - step) * (now - started) / done if done > 0 else None
        self.runner.metrics_steps(self.job.method)
        if step == total or now - self._last_write >= _PROGRESS_WRITE_SECONDS:
            self._last_write = now
            self._write(step=step, loss=loss, eta_seconds=eta)

    def checkpoint(self, step: int, state: bytes) -> None:
        if self.stop.is_set():  # cancelled or lost: the file may be another runner's now
            return
        self.runner.checkpoints.write(self.job.job_id, state)
        crashpoints.reached("checkpoint.written")
        self._write(checkpoint_step=step)

    def _write(self, **fields) -> None:
        try:
            self.runner.store.update(self.job.job_id, owner=self.runner.owner, **fields)
        except LeaseLost:
            self.lose()
        except Exception as exc:
            if not is_database_unavailable(exc):
                raise
            # A progress row missed: training goes on; the lease (renewed by the heartbeat when the
            # database is back, or taken over if not) still fences what this runner may write.
            log.warning("job %s: progress not recorded, the database is unavailable (%s)", self.job.job_id, exc)

    def lose(self) -> None:
        if not self.lost:
            log.warning("job %s: its lease passed to another runner; stopping here", self.job.job_id)
        self.lost = True
        self.stop.set()

    def should_stop(self) -> bool:
        return self.stop.is_set()


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        adapters: AdapterStore,
        checkpoints: CheckpointStore,
        backend: Backend,
        check_adapter: Callable[[Adapter], Adapter],
        metrics=None,
        admission=None,
    ):
        """`admission` (service.admission.Admission): the gateway's one request queue, which a
        finished job's previews wait in like any Generate call (None: straight to the backend)."""
        self.settings = settings
        self.admission = admission
        self.store, self.adapters, self.checkpoints = store, adapters, checkpoints
        self.backend = backend
        self.check_adapter = check_adapter
        self.metrics = metrics
        # Who holds a lease: unique per process (a restarted gateway is a new runner).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._running: dict[str, JobProgress] = {}
        self._workers: list[asyncio.Task] = []
        self._heartbeat: asyncio.Task | None = None
        self._wake = asyncio.Event()  # a job was queued: idle workers look at once, not at the next poll
        self._closed = asyncio.Event()
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Re-queues the jobs an earlier process left unfinished, then starts the workers."""
        shared = self.store.db.shared
        if not shared:  # alone on the database: every RUNNING job was our previous process's
            self.store.requeue_unfinished()
        # On a shared database a dead replica's jobs wait out their lease, then any runner claims them.
        unfinished = self.store.active()
        # What a crash left: temp files, checkpoints of jobs that have ended.
        swept = self.checkpoints.sweep(keep={job.job_id for job in unfinished},
                                       min_age_s=self.store.db.files_min_age_s)
        if swept or unfinished:
            log.info("%d unfinished jobs; removed %d stale checkpoint files", len(unfinished), len(swept))
        self._set_gauges()
        self._workers = [asyncio.create_task(self._work(), name=f"job-worker-{i}")
                         for i in range(max(1, self.settings.training_workers))]
        self._heartbeat = asyncio.create_task(self._beat(), name="job-heartbeat")

    async def close(self, grace: float = 30.0) -> None:
        """Stops the workers. A running job stops at its next step and goes back to QUEUED, to
        resume from its checkpoint on another replica, or here when the server starts again."""
        self._closing = True
        self._closed.set()
        self._wake.set()
        for progress in self._running.values():
            progress.stop.set()
        if self._workers:
            _, pending = await asyncio.wait(self._workers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)

    # -- the RPCs' side --------------------------------------------------------------------------

    def submit(self, tenant: str, request: pb.PersonalizeRequest, tokenizer) -> JobRecord:
        """Queues a validated request: the limits, name and token checks and the insert in one
        transaction."""
        # One transaction under one lock on every replica: two Personalize calls (on any replicas)
        # cannot both pass the limits, the name check or the token check.
        key = request.idempotency_key
        digest = idempotency.fingerprint(request) if key else ""
        if key:
            idempotency.sweep(self.store.db)
        with self.store.db.transaction() as conn:
            conn.lock("steerserve:jobs:submit")
            earlier = idempotency.recall(conn, tenant, "personalize", key, digest) if key else None
            if earlier is not None:
                try:
                    return self.store.get(tenant, earlier)  # a retry: the job the first call queued
                except NotFound:
                    pass
            job = self._checked_create(conn, tenant, request, tokenizer)
            if key:
                idempotency.remember(conn, tenant, "personalize", key, digest, job.job_id)
        self._wake.set()
        self._count("submitted", job.method)
        self._set_gauges()
        return job

    def _checked_create(self, conn, tenant: str, request: pb.PersonalizeRequest, tokenizer) -> JobRecord:
        s = self.settings
        active = self.store.active()
        if sum(j.state == JobState.QUEUED for j in active) >= s.max_queued_jobs:
            raise QueueFull(f"the training queue is full ({s.max_queued_jobs} jobs waiting); retry later")
        mine = [j for j in active if j.tenant == tenant]
        if len(mine) >= s.max_jobs_per_tenant:
            raise QueueFull(f"you have {len(mine)} jobs queued or running; at most {s.max_jobs_per_tenant} "
                            "at a time: wait for one to finish or cancel one")
        name = request.name.strip()
        owned = self.adapters.list(tenant)
        # The job holds its future adapter's place in the quota from now on.
        self.adapters.check_quota(conn, tenant)
        if any(a.name == name for a in owned) or any(j.name == name for j in mine):
            raise NameTaken(f"name: an adapter or job named {name!r} already exists")
        resolved = requests.resolve(request, taken_tokens=[a.token for a in owned if a.token] + [j.token for j in mine],
                                    tokenizer=tokenizer, profile=s.profile().profile)
        resolved.name = name
        return self.store.create(
            tenant, requests.method_name(resolved), name, resolved.options.steps, resolved.SerializeToString(),
            token=resolved.token, class_word=resolved.class_word,
            trace_parent=(tracing.inject_headers() or {}).get("traceparent", ""),
        )

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        before = self.store.get(tenant, job_id)  # NOT_FOUND for another tenant's id
        if before.state.finished:
            return before
        job = self.store.finish(job_id, JobState.CANCELLED, message="cancelled by the client")
        if job.state != JobState.CANCELLED:  # it finished first
            return job
        progress = self._running.get(job_id)
        if progress is not None:
            progress.cancelled = True
            progress.stop.set()  # the worker cleans up when training stops (within a step)
        elif before.lease_owner == "":
            self.checkpoints.delete(job_id)
        # else another replica runs it: its heartbeat sees CANCELLED, it stops and cleans up
        self._count("CANCELLED", job.method)
        self._set_gauges()
        return job

    # -- the workers -----------------------------------------------------------------------------

    async def _work(self) -> None:
        while not self._closing:
            if not await self._backend_ready():
                return
            try:
                claimed = self.store.claim(self.owner, self.settings.job_lease_s)
            except Exception:  # noqa: BLE001 - the database is away: try again at the next poll
                log.exception("could not claim a job; retrying")
                claimed = None
            if claimed is None:
                await self._idle()
                continue
            job, previous = claimed
            try:
                # One trace per attempt: training (backend.personalize) and previews (backend.generate).
                with tracing.span("job.attempt", links_to=job.trace_parent) as span:
                    if span.is_recording():
                        span.set_attributes({"steerserve.job.id": job.job_id, "steerserve.job.method": job.method,
                                             "steerserve.job.steps": job.total_steps,
                                             "steerserve.job.attempt": job.attempts, "steerserve.tenant": job.tenant})
                    await self._run(job, previous)
            except Exception:  # noqa: BLE001 - a worker never dies; _run already recorded the failure
                log.exception("job %s: unexpected error in the runner", job.job_id)
            self._set_gauges()

    async def _idle(self) -> None:
        """Until a job is submitted here, or the next poll (jobs submitted on other replicas,
        retries whose pause ended, leases that expired)."""
        try:
            await asyncio.wait_for(self._wake.wait(), self.settings.job_poll_interval_s)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    async def _backend_ready(self) -> bool:
        """Waits until the model server is up (when a supervisor watches it), so an outage that
        lasts a whole restart costs a waiting job one attempt, not one per retry; False when the
        runner closes meanwhile."""
        waiting = asyncio.ensure_future(self.backend.wait_available())
        closing = asyncio.ensure_future(self._closed.wait())
        _, pending = await asyncio.wait({waiting, closing}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return not self._closing

    async def _beat(self) -> None:
        """Renews this runner's leases every third of the lease, and stops the jobs it lost:
        cancelled from another replica, or taken over while this process stalled."""
        interval = min(self.settings.job_lease_s / 3, 5.0)
        while True:
            await asyncio.sleep(interval)
            try:
                rows = self.store.heartbeat(self.owner, list(self._running), self.settings.job_lease_s)
            except Exception:  # noqa: BLE001 - the database is away; the lease may lapse, fencing holds
                log.exception("job heartbeat failed")
                continue
            for job_id, row in rows.items():
                progress = self._running.get(job_id)
                if progress is None:
                    continue
                if row.state.finished:
                    progress.cancelled = row.state == JobState.CANCELLED
                    progress.stop.set()
                elif row.lease_owner != self.owner:
                    progress.lose()
            self._set_gauges()

    async def _run(self, job: JobRecord, previous_owner: str = "") -> None:
        job_id = job.job_id
        if job.attempts > self.settings.job_max_attempts:
            self._fail(job, f"interrupted {job.attempts - 1} times (restarts or model server outages); giving up")
            return
        message = "training"
        if previous_owner:
            message = f"taken over from runner {previous_owner} (it stopped renewing its lease); training"
            log.warning("job %s: %s", job_id, message)
        progress = JobProgress(self, job)
        self._running[job_id] = progress
        self._set_gauges()
        started = time.monotonic()
        try:
            job = self.store.update(job_id, owner=self.owner, message=message)
            progress.job = job
            record = self.adapters.find(job.tenant, adapter_id_for(job_id))
            trained_now = record is None
            if trained_now:  # not trained yet (an interrupted job may already have its adapter)
                adapter = await self._train(job, progress)
                self.store.update(job_id, owner=self.owner, message="storing the adapter", eta_seconds=None)
                try:
                    record = self.adapters.create(
                        job.tenant, job.name, job.method, serialize_adapter(adapter), token=job.token,
                        class_word=job.class_word, rank=adapter.max_rank, num_parameters=adapter.num_parameters,
                        source="personalize", adapter_id=adapter_id_for(job_id), for_job=job_id,
                    )
                except AdapterAlreadyExists:
                    # A runner this one took over from may have registered the job's adapter after
                    # all (it lost its lease between training and registering): finish with that one.
                    record = self.adapters.find(job.tenant, adapter_id_for(job_id))
                    if record is None:
                        raise
                crashpoints.reached("job.adapter_registered")
            self.store.update(job_id, owner=self.owner, adapter_id=record.adapter_id, message="making previews",
                              eta_seconds=None)
            # Where it will serve, before the user's first request (and the previews) ask for it.
            try:
                self.backend.preload_adapter(record.key, job.tenant)
            except Exception as exc:  # noqa: BLE001 - best effort: the first request loads it anyway
                log.warning("job %s: preloading its adapter failed: %s", job_id, exc)
            previews, note = await self._previews(job, record.key)
            # A finished job still says it survived a restart (its RUNNING message may be missed).
            resumed_from = progress.resumed_from if trained_now else job.checkpoint_step
            resumed = f"resumed from step {resumed_from}" if resumed_from else ""
            ended = self.store.finish(job_id, JobState.SUCCEEDED, owner=self.owner, adapter_id=record.adapter_id,
                                      previews=previews, step=job.total_steps,
                                      message="; ".join(m for m in (resumed, note) if m))
            if ended.state != JobState.SUCCEEDED:  # cancelled meanwhile (from any replica)
                return
            self._count("SUCCEEDED", job.method)
            if self.metrics is not None:
                self.metrics.training_seconds.labels(job.method).observe(time.monotonic() - started)
            log.info("job %s succeeded: adapter %s", job_id, record.adapter_id)
        except LeaseLost:
            progress.lose()
        except TrainingStopped:
            if not (progress.cancelled or progress.lost):  # the server is stopping: resume elsewhere or later
                self._release(job_id, "server stopped; resumes from its last checkpoint")
        except BackendUnavailable as exc:
            current = self.store.get_by_id(job_id)
            if current.attempts >= self.settings.job_max_attempts:
                self._fail(current, f"the model server stayed unavailable: {exc}")
            elif not current.state.finished:
                # Not claimed again before the pause, and (see _backend_ready) not before the model
                # server answers ready.
                self._release(job_id, f"waiting to retry: {exc}", retry_in_s=_RETRY_SECONDS)
        except AdapterAlreadyExists:
            self._fail(job, f"name: an adapter named {job.name!r} was created while the job ran")
        except Exception as exc:  # noqa: BLE001 - the job ends FAILED with the reason, never silently
            if is_database_unavailable(exc):
                # Nothing is wrong with the job: back to the queue if the database answers again,
                # else its lease runs out and a runner (here or elsewhere) takes it over.
                log.warning("job %s: the database is unavailable (%s); the job will be retried", job_id, exc)
                self._release(job_id, f"waiting to retry: the database was unavailable ({exc})",
                              retry_in_s=_RETRY_SECONDS)
                return
            log.exception("job %s failed", job_id)
            if is_disk_full(exc):
                self._fail(job, f"the server's storage is full ({exc}); no adapter was stored")
            else:
                self._fail(job, f"{type(exc).__name__}: {exc}")
        finally:
            self._running.pop(job_id, None)
            try:
                if self.store.get_by_id(job_id).state.finished:
                    self.checkpoints.delete(job_id)
            except Exception:  # noqa: BLE001 - the database is away: the next start's sweep removes it
                log.exception("job %s: could not check whether its checkpoint can go", job_id)

    def _release(self, job_id: str, message: str, retry_in_s: float = 0.0) -> None:
        try:
            self.store.release(job_id, self.owner, message=message, retry_in_s=retry_in_s)
        except LeaseLost:
            pass  # another runner has it already
        except Exception as exc:  # noqa: BLE001 - the database is away: the lease expiry re-queues it
            log.warning("job %s: could not hand it back (%s); its lease will expire", job_id, exc)
        self._wake.set()

    def _checkpoint(self, job: JobRecord) -> tuple[bytes | None, int]:
        """The job's checkpoint file, whatever its row says: the file is written atomically before
        its step is recorded, so after a crash in between it is one checkpoint ahead of the row."""
        data = self.checkpoints.read(job.job_id)
        if data is None:
            return None, 0
        try:
            return data, int(unpack_checkpoint(data)["step"])
        except Exception as exc:  # noqa: BLE001 - damaged on disk: train from the start rather than fail
            log.warning("job %s: checkpoint unreadable (%s); training from the start", job.job_id, exc)
            return None, 0

    async def _train(self, job: JobRecord, progress: JobProgress) -> Adapter:
        request = pb.PersonalizeRequest.FromString(job.request)
        spec = requests.training_spec(request, self.settings.max_input_image_pixels, self.settings.checkpoint_every)
        # Off the event loop: a real model's checkpoint (adapter + optimizer state) is tens of MB.
        resume, progress.resumed_from = await asyncio.to_thread(self._checkpoint, job)
        if resume is not None:
            self.store.update(job.job_id, owner=self.owner, checkpoint_step=progress.resumed_from,
                              message=f"training, resumed from step {progress.resumed_from}")
        blob = await self.backend.personalize(spec, resume, progress)
        try:
            # What the serving bank will load: refuse here what it could not serve.
            return self.check_adapter(parse_adapter(blob))
        except AdapterFormatError as exc:
            raise RuntimeError(f"the trained adapter cannot be served: {exc}") from exc

    async def _previews(self, job: JobRecord, adapter_key: str) -> tuple[list[bytes], str]:
        """"a <token> <class_word>" (a style: its first concept in the style, with style guidance)
        through the ordinary Generate path (admission, then the backend), so a finished job shows the adapter working exactly as
        clients will use it. A failure here does not fail the job."""
        n = self.settings.job_previews
        if n <= 0:
            return [], ""
        style = job.method == FINESTYLE
        spec = GenerationSpec(prompt=requests.preview_prompt(pb.PersonalizeRequest.FromString(job.request)),
                              steps=self.settings.default_steps, seed=0, num_images=min(n, self.settings.max_num_images),
                              adapters=(AdapterUse(adapter_key, style=style, tenant=job.tenant),),
                              style_guidance_scale=finestyle.STYLE_GUIDANCE_SCALE if style else 0.0)
        try:
            if self.admission is None:
                result = await self.backend.generate(spec, deadline=None)
            else:
                result = await self.admission.run(job.tenant, "generate", generate_cost(spec), None,
                                                  lambda: self.backend.generate(spec, deadline=None))
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s: previews failed: %s", job.job_id, exc)
            return [], f"adapter ready; previews failed ({type(exc).__name__}: {exc})"
        return [encode_png(image) for image in result.images], ""

    def _fail(self, job: JobRecord, reason: str) -> None:
        try:
            ended = self.store.finish(job.job_id, JobState.FAILED, owner=self.owner, error=reason, message=reason)
        except LeaseLost:
            return  # another runner has it: its outcome, not ours
        if ended.state == JobState.FAILED:
            self._count("FAILED", job.method)

    # -- metrics ---------------------------------------------------------------------------------

    def _count(self, event: str, method: str) -> None:
        if self.metrics is None:
            return
        if event == "submitted":
            self.metrics.jobs_submitted.labels(method).inc()
        else:
            self.metrics.jobs_finished.labels(method, event).inc()

    def metrics_steps(self, method: str) -> None:
        if self.metrics is not None:
            self.metrics.training_steps.labels(method).inc()

    def _set_gauges(self) -> None:
        """Store-wide figures (every replica on one database reports the same: aggregate with max)."""
        if self.metrics is None:
            return
        try:
            queued, running, oldest_age = self.store.queue_stats()
        except Exception:  # noqa: BLE001 - a gauge never fails a job
            log.exception("could not read the job queue")
            return
        self.metrics.jobs_queued.set(queued)
        self.metrics.jobs_running.set(running)
        age_gauge = getattr(self.metrics, "jobs_oldest_queued_age", None)
        if age_gauge is not None:
            age_gauge.set(oldest_age)
