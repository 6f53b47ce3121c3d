"""The in-process backend: the engine in this process.

Generate requests run as coroutines on the gateway's event loop, their UNet steps batched together
by one StepBatcher (service/engine/batching.py): concurrent requests share UNet calls, as on Triton.
Edits run on worker threads (`workers`): DreamSteerer's model-internal steps need a thread's
private Workbench.

Training jobs run on their own threads (`training_workers`: jobs trained at once), each with a
private copy of the base model (service.personalize.FrozenBase): a job wraps the model's layers in
trainable LoRA while it runs, which must never reach the engine that serves Generate. Serving goes
first: while a request is in flight it holds its share of the cores, and training steps fill what is
left (service/engine/priority.py, `STEERSERVE_SERVING_FIRST`).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from PIL import Image

from service import tracing
from service.adapters import serialize_adapter
from service.edit import DREAMSTEERER, Edited, EditProgress, EditSpec
from service.edit.runner import run_edit
from service.edit.spec import throttled
from service.edit.workbench import Workbench
from service.engine.batching import StepBatcher
from service.engine.priority import ComputeShare, TurnTaking, default_units
from service.engine.pipeline import AdapterUse, Engine, GenerationCancelled, GenerationResult, GenerationSpec
from service.engine.sampling import generation
from service.personalize import FrozenBase, Progress, TrainingSpec, train

from .base import ImagePromptSide



def _bank_rows(engine: Engine) -> int:
    """The most UNet rows one call may route (the adapter bank's routing table), or 64 without a bank."""
    bank = getattr(engine.adapters, "bank", None)
    return bank.state.max_rows if bank is not None else 64


def _training_thread() -> None:
    """A training thread runs its ops on one intra-op thread. Measured on 2 cores (DreamBooth-LoRA
    step, embedded model): 72 ms on the main thread with 2 OpenMP threads, 200-260 ms on a worker
    thread with 2, 95 ms on a worker thread with 1 (a second OpenMP team next to the main
    thread's idle, spinning one fights it for the cores). The setting is per thread."""
    import torch

    from service.engine.pipeline import flush_denormals

    torch.set_num_threads(1)
    flush_denormals()


class InProcessBackend(ImagePromptSide):
    name = "inprocess"

    def __init__(
        self, engine: Engine, model_dir, workers: int = 1, metrics=None, training_workers: int = 1,
        torch_threads: int | None = None, serving_first: bool = True, compute_units: int = 0,
    ):
        """`workers` engine threads run requests; the gateway's admission (service/admission) is
        the one queue in front of them and holds at most that many running, so a request handed
        here starts at once (its wait for a thread is still measured)."""
        self.engine = engine
        self.model_dir = model_dir
        self.model_name = engine.name
        self.limits = engine.limits
        self.tokenizer = engine.tokenizer
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine")
        # Generate's model calls: every in-flight request's steps batched into shared UNet calls.
        # `torch_threads` on its model thread (STEERSERVE_TORCH_THREADS, 1): see batching._model_thread.
        self.batcher = StepBatcher(engine, max_rows=_bank_rows(engine), threads=torch_threads)
        # How many requests share a call pays on this device (service/engine/width.py): measured
        # now on the model thread, then from every call; the gateway's admission runs that many at once.
        self.batch_width = self.batcher.width
        self.batcher.measure_width()
        self._trainers = ThreadPoolExecutor(max_workers=training_workers, thread_name_prefix="trainer",
                                            initializer=_training_thread)
        # Serving first, training in the gaps: requests hold their model thread's cores while in
        # flight; each training step (one thread: _training_thread) waits for room.
        self.share = ComputeShare(compute_units or default_units(str(engine.device)), serving_units=torch_threads or 1,
                                  training_units=1, enabled=serving_first,
                                  on_wait=metrics.training_wait.inc if metrics is not None else None)
        self._bases = threading.local()  # one FrozenBase per training thread, loaded on first use
        self._workbenches = threading.local()  # one Workbench (private model copy) per engine thread
        self._waiting = 0
        self._lock = threading.Lock()

    server = None  # no model server: the engine is in this process
    edits_take_image_prompts = True  # DDS's Encode runs on this engine, which packs them

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def start_supervision(self, on_change=None, **options) -> None:
        """Nothing to supervise in-process: the engine lives and dies with the gateway."""
        return None

    async def wait_available(self) -> None:
        return None

    def forget_adapter(self, key: str) -> None:
        """A deleted adapter leaves the bank (its slot frees once no request uses it)."""
        manager = self.engine.adapters.manager
        if manager is not None:
            manager.invalidate(key)

    def preload_adapter(self, key: str, tenant: str) -> None:
        """Into the serving bank's host cache, on its loader thread: the first request then only
        copies it into a slot."""
        self.engine.adapters.prefetch([[AdapterUse(key, tenant=tenant)]])

    async def generate(
        self, spec: GenerationSpec, deadline: float | None, on_step: Callable[[int, int], None] | None = None
    ) -> GenerationResult:
        """The sampling loop as a coroutine here, its steps batched with every other request's
        (StepBatcher). DEADLINE_EXCEEDED (GenerationCancelled) at the first step past the deadline;
        a caller that goes away cancels the coroutine, and its queued step is dropped."""
        def should_stop() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        engine = self.engine
        with tracing.span("backend.generate") as span:
            if span.is_recording():
                span.set_attributes(tracing.generation_attributes(spec, self.name))
            if should_stop():
                raise GenerationCancelled("deadline passed while the request was queued")
            loop = generation(spec, engine.facts, should_stop,
                              on_step=(lambda info: on_step(info.step, info.total)) if on_step is not None else None,
                              device=engine.device, dtype=engine.dtype)
            with self.share.serving():
                out = await self.batcher.run(loop)
            result = GenerationResult([Image.fromarray(a) for a in out.images], out.seeds, out.timings)
            # Waiting for a place in a UNet call is part of each step (the batch forms while the
            # previous call runs); admission's wait is added by the gateway.
            result.timings["queue_seconds"] = 0.0
            return result

    @property
    def image_prompt_encoder(self):
        served = self.engine.image_prompts
        return served.photos if served is not None else None

    async def edit(self, spec: EditSpec, deadline: float | None, progress: EditProgress | None = None) -> Edited:
        """On the engine's worker threads (same queue as Generate): DDS iterations through the
        adapter bank; DreamSteerer's model-internal steps on this thread's private Workbench."""

        def work(should_stop):
            # A span per edit phase when tracing is on (children of backend.edit: the context travels).
            reports = tracing.edit_phases(throttled(progress))
            try:
                return run_edit(self.engine, self._workbench() if spec.method == DREAMSTEERER else None, spec,
                                should_stop, reports)
            finally:
                tracing.close_phases(reports)

        with tracing.span("backend.edit") as span:
            if span.is_recording():
                span.set_attributes(tracing.edit_attributes(spec, self.name))
            with self.share.serving():
                return await self._queued(work, deadline)

    async def unet_runtime(self) -> tuple[str, str]:
        choice = self.engine.unet_runtime_choice
        return self.engine.unet_runtime.name, choice.describe() if choice is not None else ""

    def _workbench(self) -> Workbench:
        bench = getattr(self._workbenches, "bench", None)
        if bench is None:
            bench = self._workbenches.bench = Workbench(
                FrozenBase.from_pretrained(self.model_dir, device=self.engine.device, dtype=self.engine.dtype))
        return bench

    async def _queued(self, work, deadline: float | None):
        """Runs `work(should_stop)` on an engine thread; its result gets `timings["queue_seconds"]`
        (the wait for a thread). DEADLINE_EXCEEDED
        (GenerationCancelled) once the deadline passes, queued or running; a caller that goes away
        stops it at its next step."""
        with self._lock:
            self._waiting += 1
            self._set_depth()
        enqueued = time.monotonic()
        started = threading.Event()
        abandoned = threading.Event()  # the caller went away: stop at the next step

        def should_stop() -> bool:
            return abandoned.is_set() or (deadline is not None and time.monotonic() >= deadline)

        def run():
            with self._lock:
                self._waiting -= 1
                self._set_depth()
            started.set()
            queued = time.monotonic() - enqueued
            if self.metrics is not None:
                self.metrics.queue_wait.observe(queued)
            if should_stop():
                raise GenerationCancelled("deadline passed while the request was queued")
            result = work(should_stop)
            result.timings["queue_seconds"] = queued
            return result

        # The caller's context (request id, current span) goes with the work to the engine thread.
        future = self._executor.submit(contextvars.copy_context().run, run)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The client went away: drop the request if it has not started, else stop it early.
            abandoned.set()
            if future.cancel() and not started.is_set():
                with self._lock:
                    self._waiting -= 1
                    self._set_depth()
            raise

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._waiting)

    async def personalize(self, spec: TrainingSpec, resume: bytes | None, progress: Progress) -> bytes:
        def run() -> bytes:
            base = getattr(self._bases, "base", None)
            if base is None:
                base = self._bases.base = FrozenBase.from_pretrained(
                    self.model_dir, device=self.engine.device, dtype=self.engine.dtype
                )
            return serialize_adapter(train(base, spec, reports, resume))

        with tracing.span("backend.personalize") as span:
            if span.is_recording():
                span.set_attributes(tracing.training_attributes(spec, self.name, resume))
                progress = tracing.traced_progress(progress, span)
            reports = TurnTaking(progress, self.share)  # each step waits for serving's room
            return await asyncio.wrap_future(self._trainers.submit(contextvars.copy_context().run, run))

    async def close(self) -> None:
        self.batcher.close()
        if self.engine.adapters.manager is not None:
            self.engine.adapters.manager.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._trainers.shutdown(wait=True, cancel_futures=True)
