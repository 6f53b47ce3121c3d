"""Putting a UNet runtime on an engine: built, chosen (`auto`), warmed up, and kept serving.

What serves is a `ServingRuntime`: the runtime in use, with the eager UNet beside it. It never
lets a compiled form fail a request that eager would serve: a call that the compiled runtime fails
is answered by eager, that shape stays on eager from then on, and the failure is logged and counted
(`steerserve_unet_runtime_failures_total`).

`auto` never holds start-up: the engine serves eager at once, and a background thread (niced, with
the serving thread's torch threads) reads the cached choice or measures it (timing only calls that
no serving call overlapped), builds the winner and warms up every batch bucket, then switches to
it. A candidate whose full warm-up fails is dropped (its reason cached with the choice) and the
next fastest is tried; if none is left, eager goes on serving. `measure="blocking"` does the same
before returning: `steerserve prepare-runtime` (at image build, by a Job, on a shared volume) so
that new replicas find the choice and its artefacts ready.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .runtime import EagerUNet, RuntimeOptions, UNetRuntime, batch_buckets
from .selection import RuntimeChoice, choose_runtime, latent_size, release, save_choice

if TYPE_CHECKING:
    from service.engine.pipeline import Engine

log = logging.getLogger(__name__)


def build_runtime(engine: "Engine", kind: str, options: RuntimeOptions, buckets: Sequence[int]) -> UNetRuntime:
    """`kind`'s runtime for this engine (its adapter bank attached: compiled forms must see the
    banked layers), not yet warmed up."""
    if kind == "eager":
        return EagerUNet(engine.unet)
    if kind == "compile":
        from .torch_compile import CompiledUNet

        # Inductor's compiled kernels and FX graphs, kept beside the ONNX exports so a restart
        # reuses them (torch's default is a /tmp folder that does not survive a new pod).
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(options.compiled_dir / "inductor"))
        return CompiledUNet(engine.unet, buckets, mode=options.compile_mode, text_length=engine.text_length)
    if kind == "onnx":
        from .onnx_runtime import OnnxUNet

        return OnnxUNet.for_engine(engine, options.compiled_dir, max_rows=buckets[-1], threads=options.threads)
    if kind == "triton_engine":
        from .triton_engine import TritonEngineUNet

        return TritonEngineUNet.for_engine(engine, options.compiled_dir, max_rows=buckets[-1])
    raise ValueError(f"unknown UNet runtime {kind!r}")


class ServingRuntime:
    """engine.unet_runtime: the runtime serving now (`current`), eager beside it for the shapes it
    failed, and the idle signal a measurement beside serving waits on (selection.Quiet)."""

    def __init__(self, eager: EagerUNet, current: UNetRuntime | None = None):
        self.eager = eager
        self.current: UNetRuntime = current or eager
        self.failed_shapes: dict[tuple[int, ...], str] = {}  # (rows, h, w) -> why current failed it
        self.failures = 0  # serving calls the current runtime failed and eager answered
        self.ready = threading.Event()  # set once the final runtime serves (at once unless auto measures)
        self.on_promote: list = []  # called after a switch (the step batcher measures its width again)
        self._idle = threading.Condition()
        self._in_flight = 0
        self._started = 0

    @property
    def name(self) -> str:
        return self.current.name

    def __getattr__(self, attribute):
        """What the serving runtime has of its own (an onnx graph's path and session, ...)."""
        if attribute == "current":  # not set yet (during construction)
            raise AttributeError(attribute)
        return getattr(self.current, attribute)

    @property
    def stats(self):
        return self.current.stats

    def __call__(self, latents, timesteps, embeds):
        with self._idle:
            self._in_flight += 1
            self._started += 1
        try:
            return self._run(self.current, latents, timesteps, embeds)
        finally:
            with self._idle:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.notify_all()

    def _run(self, runtime, latents, timesteps, embeds):
        if runtime is self.eager:
            return runtime(latents, timesteps, embeds)
        shape = (latents.shape[0], *latents.shape[2:])
        if shape in self.failed_shapes:
            runtime.stats.count(fallback=True)
            return self.eager.unet(latents, timesteps, encoder_hidden_states=embeds).sample
        try:
            return runtime(latents, timesteps, embeds)
        except Exception as exc:  # noqa: BLE001 - eager decides whether the call itself is bad
            failure = exc
        noise = self.eager.unet(latents, timesteps, encoder_hidden_states=embeds).sample  # raises if the input is bad
        self.failures += 1
        self.failed_shapes[shape] = f"{type(failure).__name__}: {failure}"[:300]
        runtime.stats.count(fallback=True)
        log.error("UNet runtime %s failed a call of shape %s (%s); that shape runs eager from now on",
                  runtime.name, shape, self.failed_shapes[shape], exc_info=failure)
        return noise

    def warmup(self, shapes) -> None:
        self.current.warmup(shapes)

    def promote(self, runtime: UNetRuntime) -> None:
        """Serve with `runtime` from the next call on (calls in flight finish on the old one)."""
        switched = runtime is not self.current
        self.failed_shapes = {}
        self.current = runtime
        for callback in self.on_promote if switched else ():
            try:
                callback()
            except Exception:  # noqa: BLE001 - a listener's failure must not undo the switch
                log.exception("after switching the UNet runtime")

    # selection.Quiet: what a measurement beside serving waits on
    def wait_idle(self) -> int:
        with self._idle:
            self._idle.wait_for(lambda: not self._in_flight)
            return self._started

    def calls_started(self) -> int:
        with self._idle:
            return self._started


def _max_rows(engine: "Engine") -> int:
    bank = engine.adapters.bank
    return bank.state.max_rows if bank is not None else 64


def warmup_shapes(engine: "Engine", buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    return [(b, *latent_size(engine)) for b in buckets]


def configure_unet_runtime(engine: "Engine", options: RuntimeOptions) -> ServingRuntime:
    """Puts ``options.kind``'s runtime on ``engine`` (after its adapter bank is attached). A forced
    kind is built and warmed up before this returns (a failure raises: it was asked for); `auto`
    serves eager at once and switches in the background (or before returning, measure="blocking").
    `engine.unet_runtime_choice` says what serves and why, the runtime's `stats.warmup_seconds`
    how long getting it ready took (measurement included); `ready` is set once it serves."""
    buckets = batch_buckets(_max_rows(engine), options.buckets)
    started = time.perf_counter()
    serving = ServingRuntime(EagerUNet(engine.unet))
    engine.unet_runtime = serving
    if options.kind != "auto":
        runtime = build_runtime(engine, options.kind, options, buckets)
        if options.warmup:
            runtime.warmup(warmup_shapes(engine, buckets))
        engine.unet_runtime_choice = RuntimeChoice(options.kind, "setting")
        _serve(engine, serving, runtime, started)
        return serving
    engine.unet_runtime_choice = RuntimeChoice("eager", "measuring")
    if options.measure == "blocking":
        with _serving_threads(options):
            _choose_and_switch(engine, serving, options, buckets, started)
    else:
        threading.Thread(target=_in_background, args=(engine, serving, options, buckets, started),
                         name="unet-runtime-choice", daemon=True).start()
    return serving


def _serve(engine: "Engine", serving: ServingRuntime, runtime: UNetRuntime, started: float) -> None:
    runtime.stats.warmup_seconds = time.perf_counter() - started
    serving.promote(runtime)
    serving.ready.set()
    log.info("UNet runtime %s serving after %.1f s: %s", runtime.name, runtime.stats.warmup_seconds,
             engine.unet_runtime_choice.describe())


def _in_background(engine, serving, options, buckets, started) -> None:
    """The measuring thread: serving first (niced; timed calls only while serving is idle), with the
    serving thread's torch threads, after the model server has loaded everything (ready_file)."""
    from service.engine.pipeline import flush_denormals

    if engine.device.type == "cpu" and (options.threads or 1) == 1:
        # Serving first: this thread only (Linux), and the compiler processes it starts. Not where
        # the winner keeps threads it creates from here for serving (CUDA graphs' replay thread,
        # onnxruntime's intra-op pool with several threads): those would inherit the nice value,
        # and an unprivileged process cannot take it back.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
    if options.threads:
        torch.set_num_threads(options.threads)  # per thread (OpenMP): as the serving thread runs
    flush_denormals()
    if options.ready_file is not None and not _wait_for_file(options.ready_file, options.ready_timeout_s):
        log.warning("%s did not appear within %.0f s; measuring the UNet runtime anyway",
                    options.ready_file, options.ready_timeout_s)
    try:
        _choose_and_switch(engine, serving, options, buckets, started, quiet=serving)
    except Exception:  # noqa: BLE001 - the choice is an optimisation: eager goes on serving
        log.exception("choosing the UNet runtime failed; serving eager")
        serving.ready.set()


@contextlib.contextmanager
def _serving_threads(options: RuntimeOptions):
    """Measures in the calling thread with the serving thread's torch threads, then restores."""
    before = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _wait_for_file(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)  # polling a file another process writes, within a deadline
    return True


def _choose_and_switch(engine, serving, options, buckets, started, quiet=None) -> None:
    """The measured winner, warmed up for every bucket, then serving. A candidate whose warm-up
    fails is dropped (cached with the choice) and the next fastest tried; eager is the last resort."""
    def build(kind):
        return build_runtime(engine, kind, options, buckets)

    runtime, choice = choose_runtime(engine, options, buckets, build, candidates=options.candidates, quiet=quiet)
    ranking = [choice.kind] + [k for k in choice.ranking() if k != choice.kind]
    dropped = False
    for kind in ranking:
        if kind == "eager":
            release(runtime)
            runtime = serving.eager
            break
        try:
            runtime = runtime if kind == choice.kind else build(kind)
            if options.warmup:
                runtime.warmup(warmup_shapes(engine, buckets))
            break
        except Exception as exc:  # noqa: BLE001 - drop this candidate, keep serving
            choice.failed[kind] = f"warm-up: {type(exc).__name__}: {exc}"[:300]
            choice.step_ms.pop(kind, None)
            dropped = True
            log.warning("UNet runtime %s failed its warm-up; dropped: %s", kind, choice.failed[kind], exc_info=True)
            release(runtime)
    else:
        runtime = serving.eager
    choice.kind = runtime.name
    if dropped:
        choice.measured_at = time.time()  # the failure's age counts from now, not from the measurement
        save_choice(options, choice)  # the next start skips what failed (until failure_ttl_s)
    engine.unet_runtime_choice = choice
    _serve(engine, serving, runtime, started)


def runtime_status(engine: "Engine") -> str:
    """One line for logs and the CLI: what serves now, and why."""
    runtime, choice = engine.unet_runtime, engine.unet_runtime_choice
    why = choice.describe() if choice is not None else runtime.name
    if getattr(runtime, "ready", None) is not None and not runtime.ready.is_set():
        return f"UNet runtime {runtime.name} serving now: {why}"
    return f"UNet runtime {runtime.name} ready in {runtime.stats.warmup_seconds:.1f} s: {why}"
