"""Choosing the UNet runtime by measurement: `auto` (the default) serves with the fastest that works.

Which runtime is fastest depends on the model, the device and the libraries: on our CPUs onnxruntime
beats eager PyTorch at every batch size; on a GPU torch.compile with CUDA graphs usually wins, and
onnxruntime needs the GPU build. So the service does not guess: it builds each candidate (`eager`,
`onnx`, `compile`) on the real engine (bank attached), times the same UNet calls with each (one
image under CFG, and a full batch) and ranks them. A candidate that fails to build or run (no
onnxruntime-gpu, a compiler error) is skipped and its reason kept.

When this runs is configure.py's business: by default in the background while eager serves, and
only the timed calls that saw no serving call beside them count (`Quiet`).

The result is cached in the compiled folder under a key of everything it depends on (weights,
config, bank layout, graph shape, device, CPU/GPU model, threads, library versions, this package's
code, the interpreter's encoding and compiler settings): a restart, or another replica on the same
hardware, reads it instead of measuring again, and the export/compile artefacts themselves are
cached too (ONNX graphs beside it; torch.compile's inductor cache). A cached choice in which a
candidate failed is trusted for `failure_ttl_s` only: a failure may have been the environment's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import locale
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from .runtime import AUTO_CANDIDATES as CANDIDATES
from .runtime import bucket_for, warmup_inputs

if TYPE_CHECKING:
    from service.engine.pipeline import Engine

    from .runtime import RuntimeOptions, UNetRuntime

log = logging.getLogger(__name__)

CHOICE_FORMAT = 2
MAX_OVERLAPS = 20  # timed calls redone because serving overlapped them, per sample


@dataclass
class RuntimeChoice:
    """What serves, and why: the measurement (or its cached copy) behind an `auto` choice."""

    kind: str
    chosen_by: str  # "setting", "measuring" (eager serves meanwhile), "measured", "cached measurement"
    step_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> {rows: median ms}
    startup_s: dict[str, float] = field(default_factory=dict)  # candidate -> build + warm-up seconds
    failed: dict[str, str] = field(default_factory=dict)  # candidate -> why it could not run
    key: str = ""
    measured_at: float = 0.0  # time.time() of the measurement

    def score(self, kind: str) -> float | None:
        """The ranking rule: `kind`'s time over the reference's (eager's when it ran, else the first
        candidate measured), geometric mean over the probe shapes; lower is faster."""
        if kind not in self.step_ms:
            return None
        reference = self.step_ms.get("eager") or next(iter(self.step_ms.values()))
        return statistics.geometric_mean([ms / reference[r] for r, ms in self.step_ms[kind].items()])

    def ranking(self) -> list[str]:
        """Measured candidates, fastest first."""
        return sorted(self.step_ms, key=self.score)

    def speedup(self, kind: str) -> float | None:
        """Eager time over `kind`'s, averaged (geometric) over the probe shapes."""
        if kind not in self.step_ms or "eager" not in self.step_ms:
            return None
        return 1.0 / self.score(kind)

    def describe(self) -> str:
        if self.chosen_by == "setting":
            return f"{self.kind} (set by STEERSERVE_UNET_RUNTIME)"
        if self.chosen_by == "measuring":
            return f"{self.kind} (serving while the auto choice is measured)"
        parts = []
        for kind, shapes in self.step_ms.items():
            times = ", ".join(f"{ms:.1f} ms x{rows}" for rows, ms in shapes.items())
            parts.append(f"{kind} {times}")
        parts += [f"{kind} failed ({why})" for kind, why in self.failed.items()]
        return f"{self.kind} ({self.chosen_by}: {'; '.join(parts)})"


class Quiet(Protocol):
    """Serving's side of a measurement beside it (configure.ServingRuntime): a timed call counts only
    if no serving call ran during it."""

    def wait_idle(self) -> int:
        """Blocks until no serving call is in flight; returns the count of serving calls started."""

    def calls_started(self) -> int: ...


def _device_identity(device: torch.device, threads: int | None) -> dict:
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
    return {"type": "cpu", "model": model, "cpus": os.cpu_count(), "threads": threads or torch.get_num_threads()}


def _code_version() -> str:
    """This package's source: a fix to a runtime (or to how it is measured) measures again."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def _environment() -> dict:
    """What outside the code decided whether a candidate could run: the interpreter and its text
    encoding (torch.compile failed under an ASCII locale), the compiler and inductor settings."""
    return {
        "python": sys.version.split()[0], "encoding": locale.getpreferredencoding(False),
        **{k: v for k, v in sorted(os.environ.items())
           if k in ("CC", "CXX") or k.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE", "OMP_"))
           and k != "TORCHINDUCTOR_CACHE_DIR"},
    }


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
        "device": _device_identity(engine.device, options.threads), "torch": torch.__version__,
        "onnxruntime": ort_version, "code": _code_version(), "environment": _environment(),
        "buckets": list(buckets), "compile_mode": options.compile_mode, "candidates": list(options.candidates),
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_path(options: "RuntimeOptions", key: str) -> Path:
    return options.compiled_dir / f"runtime-choice-{key}.json"


def cached_choice(options: "RuntimeOptions", key: str) -> RuntimeChoice | None:
    path = _cache_path(options, key)
    try:
        data = json.loads(path.read_text())
        choice = RuntimeChoice(**data)
    except (OSError, ValueError, TypeError):
        return None
    if choice.kind not in options.candidates or choice.key != key:
        return None
    if choice.failed and time.time() - choice.measured_at > options.failure_ttl_s:
        log.info("cached UNet runtime choice has failures older than %.0f s (%s): measuring again",
                 options.failure_ttl_s, ", ".join(choice.failed))
        return None
    choice.chosen_by = "cached measurement"
    return choice


def save_choice(options: "RuntimeOptions", choice: RuntimeChoice) -> None:
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
    return tuple(sorted({bucket_for(min(r, buckets[-1]), buckets) for r in (2, 16)}))


def latent_size(engine: "Engine") -> tuple[int, int]:
    size = engine.limits.default_size // engine.vae_scale_factor
    return size, size


@torch.no_grad()
def time_calls(runtime: "UNetRuntime", engine: "Engine", rows: int, budget_s: float = 1.0,
               max_reps: int = 30, quiet: Quiet | None = None) -> float:
    """Median milliseconds of one call of `rows` rows at the default resolution (after 2 warm calls).
    With `quiet`, each timed call starts when serving is idle, and one that a serving call overlapped
    is timed again: a measurement beside serving times the runtime, not the load."""
    inputs = warmup_inputs(engine.unet, rows, *latent_size(engine), engine.text_length)
    times: list[float] = []
    deadline = None
    for i in range(max_reps + 2):
        for attempt in range(MAX_OVERLAPS + 1):
            before = quiet.wait_idle() if quiet is not None else 0
            started = time.perf_counter()
            runtime(*inputs)
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            elapsed = time.perf_counter() - started
            if quiet is None or quiet.calls_started() == before:
                break
            # else a serving call overlapped it: again, up to MAX_OVERLAPS times (under a steady
            # flood no call is quiet; then the load is part of what is timed, for every candidate)
        if i >= 2:
            times.append(elapsed)
            deadline = deadline or time.perf_counter() + budget_s
            if len(times) >= 5 and time.perf_counter() > deadline:
                break
    return 1000 * statistics.median(times)


def choose_runtime(engine: "Engine", options: "RuntimeOptions", buckets: tuple[int, ...],
                   build: Callable[[str], "UNetRuntime"], candidates: tuple[str, ...] = CANDIDATES,
                   quiet: Quiet | None = None) -> tuple["UNetRuntime", RuntimeChoice]:
    """The fastest runtime of `candidates` for this engine, from the cache or measured now; returned
    built (and warmed up for the probe shapes), ready for the caller's full warm-up."""
    key = choice_key(engine, options, buckets)
    # One measurement at a time per key on this machine: Triton loads its models side by side, and
    # two instances timing at once would each see the other's load. The second finds the first's.
    with _measurement_lock(options, key):
        return _choose(engine, options, buckets, build, candidates, key, quiet)


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


# Memory an ONNX export and its onnxruntime session take beside the served model on a CPU, as a
# multiple of the UNet's weights: an SD 1.5-size UNet (3.4 GB in fp32) took about 16 GB more while
# exporting (measured here). torch.compile's inductor is held to the same bound (not measured at that
# size here). A candidate that would not fit is left out with its reason rather than risking the
# serving process (and, on Triton, its neighbours: the kernel's OOM killer picks any of them).
EXPORT_MEMORY_FACTOR = 5.0


def _available_memory() -> int | None:
    """Bytes the kernel says a new allocation can take (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_shortfall(kind: str, engine: "Engine") -> str | None:
    """Why `kind` cannot be measured here for lack of host memory, or None."""
    if kind not in ("onnx", "compile") or engine.device.type != "cpu":
        return None
    weights = sum(p.numel() * p.element_size() for p in engine.unet.parameters())
    need, available = EXPORT_MEMORY_FACTOR * weights, _available_memory()
    if available is None or available >= need:
        return None
    return (f"not enough memory to build it: about {need / 2**30:.1f} GiB needed beside the served model, "
            f"{available / 2**30:.1f} GiB available")


def _choose(engine, options, buckets, build, candidates, key, quiet):
    probes = [(r, *latent_size(engine)) for r in probe_rows(buckets)]
    cached = cached_choice(options, key)
    if cached is not None:
        try:
            runtime = build(cached.kind)
            runtime.warmup(probes)  # builds lazily
            return runtime, cached
        except Exception as exc:  # noqa: BLE001 - the cached winner no longer builds: measure again
            log.warning("cached UNet runtime %s failed to build (%s); measuring again", cached.kind, exc)
    choice = RuntimeChoice(kind="eager", chosen_by="measured", key=key, measured_at=time.time())
    best: tuple[float, str, "UNetRuntime"] | None = None
    # eager first when it is a candidate: the reference every other is scored against.
    for kind in sorted(candidates, key=lambda k: k != "eager"):
        started = time.perf_counter()
        shortfall = memory_shortfall(kind, engine) if not _graph_cached(kind, engine, options, buckets) else None
        if shortfall is not None:
            choice.failed[kind] = shortfall
            log.warning("UNet runtime %s left out: %s", kind, shortfall)
            continue
        try:
            runtime = build(kind)
            runtime.warmup(probes)
            choice.startup_s[kind] = round(time.perf_counter() - started, 2)
            choice.step_ms[kind] = {str(r): round(time_calls(runtime, engine, r, quiet=quiet), 3) for r, _, _ in probes}
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here is skipped
            choice.failed[kind] = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("UNet runtime %s cannot run here: %s", kind, choice.failed[kind], exc_info=True)
            continue
        score = choice.score(kind)
        if best is None or score < best[0]:
            if best is not None:
                release(best[2])
            best = (score, kind, runtime)
        else:
            release(runtime)
    if best is None:
        raise RuntimeError(f"no UNet runtime could run: {choice.failed}")
    choice.kind = best[1]
    save_choice(options, choice)
    return best[2], choice


def _graph_cached(kind: str, engine: "Engine", options: "RuntimeOptions", buckets) -> bool:
    """Whether `kind`'s artefact is already on disk (an ONNX graph exported earlier or ahead)."""
    if kind != "onnx":
        return False
    from .onnx_export import cached_unet, graph_shape

    return cached_unet(engine.unet, engine.adapters.bank, graph_shape(engine, buckets[-1]), options.compiled_dir) is not None


def release(runtime) -> None:
    """Drops a losing candidate's resources (an onnxruntime session; torch.compile's graphs stay in
    Dynamo's cache until the process ends: harmless, and not worth a global reset)."""
    if hasattr(runtime, "session"):
        runtime.session = None
