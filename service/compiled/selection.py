"""Choosing the UNet runtime by measurement: `auto` (the default) serves with the fastest that works.

Which runtime is fastest depends on the model, the device and the libraries: on our CPUs onnxruntime
beats eager PyTorch at every batch size; on a GPU torch.compile with CUDA graphs usually wins, and
onnxruntime needs the GPU build. So the service does not guess: at start it builds each candidate
(`eager`, `onnx`, `compile`) on the real engine (bank attached), times the same UNet calls with each
(one image under CFG, and a full batch), and keeps the fastest. A candidate that fails to build or
run (no onnxruntime-gpu, a compiler error) is skipped and its reason kept.

The result is cached in the compiled folder under a key of everything it depends on (weights,
config, bank layout, graph shape, device, CPU/GPU model, threads, library versions): a restart, or
another replica on the same hardware, reads it instead of measuring again, and the export/compile
artefacts themselves are cached too (ONNX graphs beside it; torch.compile's inductor cache), so a
restart only warms up the chosen runtime. STEERSERVE_UNET_RUNTIME=eager|compile|onnx forces one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .runtime import AUTO_CANDIDATES as CANDIDATES

if TYPE_CHECKING:
    from service.engine.pipeline import Engine

    from .runtime import RuntimeOptions, UNetRuntime

log = logging.getLogger(__name__)

CHOICE_FORMAT = 1


@dataclass
class RuntimeChoice:
    """What serves, and why: the measurement (or its cached copy) behind an `auto` choice."""

    kind: str
    chosen_by: str  # "setting", "measured at start", "cached measurement"
    step_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> {rows: median ms}
    startup_s: dict[str, float] = field(default_factory=dict)  # candidate -> build + warm-up seconds
    failed: dict[str, str] = field(default_factory=dict)  # candidate -> why it could not run
    key: str = ""

    def speedup(self, kind: str) -> float | None:
        """Eager time over `kind`'s, averaged (geometric) over the probe shapes."""
        if kind not in self.step_ms or "eager" not in self.step_ms:
            return None
        ratios = [self.step_ms["eager"][r] / ms for r, ms in self.step_ms[kind].items() if ms > 0]
        return statistics.geometric_mean(ratios) if ratios else None

    def describe(self) -> str:
        if self.chosen_by == "setting":
            return f"{self.kind} (set by STEERSERVE_UNET_RUNTIME)"
        parts = []
        for kind, shapes in self.step_ms.items():
            times = ", ".join(f"{ms:.1f} ms x{rows}" for rows, ms in shapes.items())
            parts.append(f"{kind} {times}")
        parts += [f"{kind} failed ({why})" for kind, why in self.failed.items()]
        return f"{self.kind} ({self.chosen_by}: {'; '.join(parts)})"


def _device_identity(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": torch.cuda.get_device_capability(device)}
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"type": "cpu", "model": model, "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def choice_key(engine: "Engine", options: "RuntimeOptions", buckets: tuple[int, ...]) -> str:
    """Everything the measured ranking depends on; the weights' digest is the ONNX graph's key."""
    from .onnx_export import graph_key, graph_shape

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({
        "format": CHOICE_FORMAT, "graph": graph_key(engine.unet, engine.adapters.bank, graph_shape(engine, buckets[-1])),
        "device": _device_identity(engine.device), "torch": torch.__version__, "onnxruntime": ort_version,
        "buckets": list(buckets), "compile_mode": options.compile_mode, "candidates": list(options.candidates),
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_path(options: "RuntimeOptions", key: str) -> Path:
    return Path(options.cache_dir or Path("var") / "compiled") / f"runtime-choice-{key}.json"


def cached_choice(options: "RuntimeOptions", key: str) -> RuntimeChoice | None:
    path = _cache_path(options, key)
    try:
        data = json.loads(path.read_text())
        choice = RuntimeChoice(**data)
    except (OSError, ValueError, TypeError):
        return None
    if choice.kind not in options.candidates or choice.key != key:
        return None
    choice.chosen_by = "cached measurement"
    return choice


def _save(options: "RuntimeOptions", choice: RuntimeChoice) -> None:
    path = _cache_path(options, choice.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(choice), indent=1))
        os.replace(tmp, path)  # another replica measuring at the same time writes the same facts
    except OSError as exc:  # a read-only cache: measure again next start, but serve
        log.warning("UNet runtime choice not cached (%s)", exc)


def probe_rows(buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The call sizes timed: one image under CFG (2 rows, the latency case) and a full batch of 16
    rows or the largest bucket (the throughput case), each at the bucket it runs in."""
    from .runtime import bucket_for

    return tuple(sorted({bucket_for(min(r, buckets[-1]), buckets) for r in (2, 16)}))


@torch.no_grad()
def time_calls(runtime: "UNetRuntime", engine: "Engine", rows: int, budget_s: float = 1.0,
               max_reps: int = 30) -> float:
    """Median milliseconds of one call of `rows` rows at the default resolution (after 2 warm calls)."""
    from .runtime import warmup_inputs

    size = engine.limits.default_size // engine.vae_scale_factor
    inputs = warmup_inputs(engine.unet, rows, size, size, engine.tokenizer.model_max_length)
    times: list[float] = []
    deadline = None
    for i in range(max_reps + 2):
        started = time.perf_counter()
        runtime(*inputs)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        if i >= 2:
            times.append(time.perf_counter() - started)
            deadline = deadline or time.perf_counter() + budget_s
            if len(times) >= 5 and time.perf_counter() > deadline:
                break
    return 1000 * statistics.median(times)


def choose_runtime(engine: "Engine", options: "RuntimeOptions", buckets: tuple[int, ...],
                   build: Callable[[str], "UNetRuntime"],
                   candidates: tuple[str, ...] = CANDIDATES) -> tuple["UNetRuntime", RuntimeChoice]:
    """The fastest runtime of `candidates` for this engine, from the cache or measured now; returned
    built (and warmed up for the probe shapes), ready for the caller's full warm-up."""
    key = choice_key(engine, options, buckets)
    # One measurement at a time per key on this machine: Triton loads its models side by side, and
    # two instances timing at once would each see the other's load. The second finds the first's.
    with _measurement_lock(options, key):
        return _choose(engine, options, buckets, build, candidates, key)


@contextlib.contextmanager
def _measurement_lock(options: "RuntimeOptions", key: str):
    path = _cache_path(options, key).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError:  # a read-only cache: measure without the lock
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _choose(engine, options, buckets, build, candidates, key):
    cached = cached_choice(options, key)
    if cached is not None:
        try:
            runtime = build(cached.kind)
            runtime.warmup([(r, *_latent_size(engine)) for r in probe_rows(buckets)])  # builds lazily
            return runtime, cached
        except Exception as exc:  # noqa: BLE001 - the cached winner no longer builds: measure again
            log.warning("cached UNet runtime %s failed to build (%s); measuring again", cached.kind, exc)
    choice = RuntimeChoice(kind="eager", chosen_by="measured at start", key=key)
    rows = probe_rows(buckets)
    best: tuple[float, str, "UNetRuntime"] | None = None
    # eager first when it is a candidate: the reference every other is scored against.
    for kind in sorted(candidates, key=lambda k: k != "eager"):
        started = time.perf_counter()
        try:
            runtime = build(kind)
            runtime.warmup([(r, *_latent_size(engine)) for r in rows])
            choice.startup_s[kind] = round(time.perf_counter() - started, 2)
            choice.step_ms[kind] = {str(r): round(time_calls(runtime, engine, r), 3) for r in rows}
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here is skipped
            choice.failed[kind] = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("UNet runtime %s cannot run here: %s", kind, choice.failed[kind], exc_info=True)
            continue
        # Geometric mean over the probe shapes, relative to one reference for all: eager's times
        # when it ran, else the first candidate that did.
        reference = choice.step_ms.get("eager") or next(iter(choice.step_ms.values()))
        score = statistics.geometric_mean([choice.step_ms[kind][r] / reference[r] for r in choice.step_ms[kind]])
        if best is None or score < best[0]:
            if best is not None:
                _release(best[2])
            best = (score, kind, runtime)
        else:
            _release(runtime)
    if best is None:
        raise RuntimeError(f"no UNet runtime could run: {choice.failed}")
    choice.kind = best[1]
    _save(options, choice)
    return best[2], choice


def _latent_size(engine: "Engine") -> tuple[int, int]:
    size = engine.limits.default_size // engine.vae_scale_factor
    return size, size


def _release(runtime) -> None:
    """Drops a losing candidate's resources (an onnxruntime session; torch.compile's graphs stay in
    Dynamo's cache until the process ends: harmless, and not worth a global reset)."""
    if hasattr(runtime, "session"):
        runtime.session = None
