"""Continuous batching of denoising steps across in-flight requests, inside one process.

Each request's sampling loop (service.engine.sampling.generation) runs as a coroutine
(`StepBatcher.run`) whose model calls go to `StepBatcher.execute`. Denoise calls queue here; one worker
thread runs the model: whenever it is free, every queued step (up to `max_rows` UNet rows) becomes
ONE `Engine.predict_noise` call, rows concatenated and answers split back. Steps of different
requests -- at different timesteps, with different users' adapters per row, CFG's two rows or
FineStyle's three -- share one UNet forward, as the Triton `unet` model's dynamic batcher does for
BLS calls, but without a round trip per step: the loop and the UNet meet in one process (the
in-process backend; Triton's `generate` model, where the loop runs inside one model execution).

Everything with tensors runs on that one worker thread: Encode and Decode between UNet calls, and
each loop's own work between its calls (guidance, the scheduler step: `run` advances the generator
there). torch's CPU thread pool is then used from one thread only; a second thread doing small ops
beside it makes two OpenMP teams spin against each other for the cores (measured: several times
slower steps on 2 cores). While the worker computes one call, the next steps of every other request
queue up; the next call is formed once every request the last call answered has queued its next
step (or finished), so requests stay in one cohort and batches grow with load by themselves.

How wide a call gets is set in front of it: admission runs as many requests at once as the batch
width this device pays for (`self.width`, a service.engine.width.BatchWidth). The batcher measures
what each step costs at its width into it (rows, and seconds from one call to the next: the UNet
call and the answered requests' own steps), and `measure_width()` seeds it at start with a 2-row
call against a wider one (or the UNet runtime chooser's timings of both, when there are).

Thousands of adapters: a call takes queued steps, oldest first, while their distinct adapters fit
the adapter bank's slots (`slot_capacity`); a step that would overflow them waits for the next call
(first in line) rather than failing the merged call. As soon as a request's model call arrives here,
its adapters start loading into host memory on the adapter manager's loader thread
(`AdapterHook.prefetch`), while the current call computes: the call that uses them then only copies
them into a slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .sampling import Denoise, StepResult
from .width import BatchWidth

log = logging.getLogger(__name__)


def _model_thread(threads: int | None) -> None:
    """The model thread's torch setup. Intra-op threads are set per thread (OpenMP): a process whose
    main thread already ran torch with 2 threads (start-up, warm-up) and whose model thread then
    runs another 2-thread team has two teams spinning for 2 cores: measured 0.54 s -> 1.6 s for a
    20-step request on the embedded model; with 1 thread on the model thread, 0.56 s."""
    from .pipeline import flush_denormals

    if threads is not None:
        torch.set_num_threads(threads)
    flush_denormals()


@dataclass
class BatchStats:
    calls: int = 0  # UNet calls made
    rows: int = 0  # rows they held
    steps: int = 0  # Denoise calls (request steps) they answered
    # Per request step, summed: time queued for a UNet call, and the call's compute. Their rates'
    # ratio is the load signal (as Triton's queue/compute duration counters for a batched model).
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    deferred: int = 0  # steps left for a later call when one was formed (rows or adapter slots full)

    @property
    def mean_rows(self) -> float:
        return self.rows / self.calls if self.calls else 0.0


# Model-thread seconds the start-up measurement of a wide call may take (by a CPU's estimate: a call
# costs its rows' share of a 2-row call); wider calls are then learned from the calls served.
_SEED_BUDGET_S = 1.5


class StepBatcher:
    def __init__(self, engine, max_rows: int, name: str = "unet-steps", threads: int | None = None, width=None):
        """`engine`: a service.engine.pipeline.Engine (its `execute` and `predict_noise`);
        `max_rows`: the most rows one UNet call takes (the adapter bank's routing table size);
        `threads`: torch intra-op threads of the model thread (None: leave torch's default);
        `width`: the BatchWidth its calls are measured into (None: a new one)."""

        self.engine = engine
        self.max_rows = max_rows
        # Until measured: one request at a time on a CPU (a call there costs about the sum of its
        # rows, e.g. an SD-size UNet too slow to time wide calls at start), the slots on a GPU.
        self.width = width if width is not None else BatchWidth(unknown=1 if engine.device.type == "cpu" else None)
        # Measured again on the runtime that serves once `auto` has switched to it.
        on_promote = getattr(engine.unet_runtime, "on_promote", None)
        if on_promote is not None:
            on_promote.append(self.measure_width)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_model_thread,
                                          initargs=(threads,))
        self._queue: deque[tuple[Denoise, asyncio.Future, float]] = deque()
        self._drain_task: asyncio.Task | None = None
        self._advancing = 0  # loops between two of their model calls (guidance, scheduler step)
        self._settled: asyncio.Event | None = None  # created on the running loop (_cohort_settled)
        self._settled_loop = None
        self.stats = BatchStats()

    async def run(self, loop_generator):
        """Runs a sampling loop (service.engine.sampling) to its result: its model calls batched
        here, its own steps advanced on the worker thread too."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # request id, trace span: to the worker with each step

        def advance(answer):
            try:
                return loop_generator.send(answer), False, None
            except StopIteration as done:  # (a StopIteration cannot cross into a Future)
                return None, True, done.value

        self._advancing += 1
        try:
            answer = None
            while True:
                call, finished, result = await loop.run_in_executor(self._worker, context.run, advance, answer)
                if finished:
                    return result
                self._advancing -= 1
                self._wake()
                try:
                    answer = await self.execute(call)
                finally:
                    self._advancing += 1
        finally:
            self._advancing -= 1
            self._wake()
            try:
                loop_generator.close()
            except ValueError:  # cancelled while the worker advances it: it is collected later
                pass

    def _wake(self) -> None:
        if self._advancing == 0 and self._settled is not None:
            self._settled.set()

    async def _cohort_settled(self) -> None:
        """Until no loop is between calls: every request the last call answered has queued its
        next step or finished (their work is short; it runs on the worker before the next call)."""
        loop = asyncio.get_running_loop()
        if self._settled is None or self._settled_loop is not loop:  # an Event belongs to one loop
            self._settled, self._settled_loop = asyncio.Event(), loop
        while self._advancing > 0:
            self._settled.clear()
            await self._settled.wait()

    async def execute(self, call):
        """One model call of a loop: Denoise batched with every other request's; others in turn."""
        rows = getattr(call, "rows", None)
        if rows:  # read its adapters from the store now, off the model thread (no-op when at hand)
            try:
                self.engine.adapters.prefetch(rows)
            except Exception as exc:  # noqa: BLE001 - only an optimisation: the step reads them itself
                log.debug("adapter prefetch failed: %s", exc)
        if isinstance(call, Denoise):
            return await self._denoise(call)
        loop = asyncio.get_running_loop()
        # The caller's context (request id, trace span) goes with the call to the worker thread.
        return await loop.run_in_executor(self._worker, contextvars.copy_context().run, self.engine.execute, call)

    async def _denoise(self, call: Denoise) -> StepResult:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((call, future, time.perf_counter()))
        self._wake()
        task = self._drain_task
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._drain_task = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        """Runs UNet calls until the queue is empty (on the event loop; the compute on the worker)."""
        loop = asyncio.get_running_loop()
        batch: list = []
        previous = None  # (rows, start) of the call before: the step it made took until this one
        try:
            while True:
                # Let the requests the last call answered take their next step first (each runs
                # its guidance and scheduler step, then queues): otherwise the requests answered
                # together and those that queued meanwhile would alternate, each cohort alone.
                await asyncio.sleep(0)
                await self._cohort_settled()
                if not self._queue:
                    break
                started = time.perf_counter()
                batch, rows, queued = self._take_batch(started)
                if not batch:
                    continue
                # What a step costs each request at this width: from one call to the next, the
                # call and every answered request's own step (guidance, scheduler), in rows at the
                # default resolution (a row's cost goes with its pixels).
                if previous is not None:
                    self.width.observe(previous[0], started - previous[1])
                previous = (self._default_rows([call for call, _ in batch]), started)
                answers = await loop.run_in_executor(self._worker, self._compute, [c for c, _ in batch])
                seconds = time.perf_counter() - started
                self.stats.calls += 1
                self.stats.rows += rows
                self.stats.steps += len(batch)
                self.stats.queue_seconds += queued
                self.stats.compute_seconds += seconds * len(batch)
                for (call, future), answer in zip(batch, answers):
                    if future.done():
                        continue
                    if isinstance(answer, BaseException):
                        future.set_exception(answer)
                    else:
                        future.set_result(StepResult(answer, batch_size=rows, compute_seconds=seconds))
                batch = []
        except BaseException as exc:  # noqa: BLE001 - never strand a waiting request
            # The call in flight (its rows already taken from the queue) and everything queued.
            failure = exc if isinstance(exc, Exception) else RuntimeError(f"step batcher stopped: {exc!r}")
            stranded = [future for _, future in batch] + [future for _, future, _ in self._queue]
            self._queue.clear()
            for future in stranded:
                if not future.done():
                    future.set_exception(failure)
            raise

    def _take_batch(self, now: float) -> tuple[list, int, float]:
        """The next call's steps, oldest first: up to `max_rows` rows, and only while their distinct
        adapters fit the bank's slots; those that do not fit stay queued, first in line next time."""
        capacity = self.engine.adapters.slot_capacity
        batch, rows, queued = [], 0, 0.0
        adapters: set[str] = set()
        taken: list = []
        left: deque = deque()
        try:
            while self._queue:
                item = self._queue.popleft()
                call, future, enqueued = item
                if future.done():  # its request went away (cancelled) while it waited
                    continue
                m = call.latents.shape[0]
                keys = {use.key for row in call.rows for use in row}
                fits = not batch or (rows + m <= self.max_rows and (capacity is None or len(adapters | keys) <= capacity))
                if not fits:
                    left.append(item)
                    if rows >= self.max_rows:
                        break
                    continue
                taken.append(item)
                batch.append((call, future))
                rows += m
                adapters |= keys
                queued += now - enqueued
        except BaseException:
            self._queue = deque(taken) + left + self._queue  # nothing lost: _drain fails them all
            raise
        left.extend(self._queue)
        self._queue = left
        if batch:
            self.stats.deferred += len(left)
        return batch, rows, queued

    def measure_width(self):
        """Seeds `width` on the model thread (before the calls queued after this): the runtime
        chooser's timings of 2 and more rows when the engine has them, else a 2-row call against
        the widest of 16, 8, 4 rows that fits _SEED_BUDGET_S. A concurrent.futures.Future."""
        return self._worker.submit(self._seed_width)

    def _seed_width(self) -> None:
        try:
            choice = getattr(self.engine, "unet_runtime_choice", None)
            timings = getattr(choice, "step_ms", {}).get(getattr(choice, "kind", None)) or {}
            if len(timings) >= 2:
                self.width.seed({float(rows): ms / 1000 for rows, ms in timings.items()},
                                "the UNet runtime chooser's timings")
                return
            points = {2: self._time_rows(2)}
            for wide in (16, 8, 4):
                if wide <= self.max_rows and 4 * points[2] * wide / 2 <= _SEED_BUDGET_S:
                    points[wide] = self._time_rows(wide)
                    break
            self.width.seed(points, "measured at start")
            log.info("batch width: %s (%s)", self.width.describe(), self.width.seeded_by)
        except Exception as exc:  # noqa: BLE001 - then only the calls served teach it
            log.warning("could not measure the UNet's cost by batch width at start: %s", exc)

    @torch.no_grad()
    def _time_rows(self, rows: int, reps: int = 3) -> float:
        """Fastest seconds of a `rows`-row UNet call at the default resolution, after a warm one
        (the device's cost: anything else running on the host only adds time)."""
        engine = self.engine
        unet = engine.unet
        size = engine.limits.default_size // engine.vae_scale_factor
        param = next(unet.parameters())
        like = dict(device=param.device, dtype=param.dtype)
        latents = torch.zeros(rows, unet.config.in_channels, size, size, **like)
        timesteps = torch.full((rows,), 999.0, device=param.device)
        embeds = torch.zeros(rows, engine.text_length, engine.text_width, **like)
        times = []
        for _ in range(reps + 1):
            started = time.perf_counter()
            noise = engine.predict_noise(latents, timesteps, embeds, [()] * rows)
            _synchronize(noise)
            times.append(time.perf_counter() - started)
        return min(times[1:])

    def _default_rows(self, calls: list[Denoise]) -> float:
        """The rows of `calls` counted at the default resolution (by pixels)."""
        try:
            side = self.engine.limits.default_size // self.engine.vae_scale_factor
        except AttributeError:
            side = None
        if not side:
            return float(sum(c.latents.shape[0] for c in calls))
        return sum(c.latents.shape[0] * c.latents.shape[-1] * c.latents.shape[-2] for c in calls) / (side * side)

    @torch.no_grad()
    def _compute(self, calls: list[Denoise]) -> list:
        """Noise for each call: one predict_noise per latent shape (one for the usual all-equal
        batch). A failing merged call (an adapter that cannot load, more distinct adapters than the
        bank's slots) is retried call by call, so the error lands on its own request only."""
        out: list = [None] * len(calls)
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(calls):
            groups.setdefault((tuple(c.latents.shape[1:]), tuple(c.embeds.shape[1:])), []).append(i)
        for indices in groups.values():
            group = [calls[i] for i in indices]
            try:
                noise = self._predict(group)
                _synchronize(noise)  # (so that its time is the call's, on a GPU too)
            except Exception as exc:  # noqa: BLE001 - isolate the failing request below
                if len(group) == 1:
                    out[indices[0]] = exc
                    continue
                for i in indices:
                    try:
                        out[i] = self._predict([calls[i]])
                    except Exception as alone:  # noqa: BLE001
                        out[i] = alone
                continue
            start = 0
            for i, c in zip(indices, group):
                m = c.latents.shape[0]
                out[i] = noise[start : start + m]
                start += m
        return out

    def _predict(self, group: list[Denoise]) -> torch.Tensor:
        if len(group) == 1:
            c = group[0]
            return self.engine.predict_noise(c.latents, c.timesteps, c.embeds, c.rows)
        return self.engine.predict_noise(torch.cat([c.latents for c in group]), torch.cat([c.timesteps for c in group]),
                                         torch.cat([c.embeds for c in group]), [r for c in group for r in c.rows])

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _synchronize(noise) -> None:
    """A GPU call's time is its kernels' (they run after the call returns)."""
    if isinstance(noise, torch.Tensor) and noise.is_cuda:
        torch.cuda.synchronize(noise.device)

