"""Serving first, training in the gaps: step-level priority between the requests a replica serves
and the personalization jobs it trains on the same compute.

A replica's compute is counted in units: CPU cores this process may use, or 1 for a GPU (one
device runs one step at a time well; see docs/training_beside_serving.md for CUDA stream priorities).
While serving has work (a Generate or Edit in flight) it holds `serving_units` of them: its model
thread's torch threads on a CPU, the whole device on a GPU. Serving never waits for training. A
training step needs `training_units` and starts only when the units serving holds plus those of the
training steps already running leave room for it; otherwise it waits, re-checking as serving's work
comes and goes. The unit of preemption is one training step (tens to hundreds of milliseconds): a
serving burst that starts while training steps run waits at most for those steps' ends to have its
units back, and a training job never loses more than the time serving actually needs.

Who calls what:
- serving: `with share.serving(): ...` around each request (in-process: the backend's Generate and
  Edit; Triton: the `generate` and `unet` model instances, which publish it to the other processes
  of the same Triton server through `ServingState` files);
- training: the job's Progress offers `step_turn()` (service.personalize.TrainingRun wraps each
  optimisation step in it): `TurnTaking` adds it with this share.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

def default_units(device: str) -> int:
    """1 on a GPU, else the CPU cores this process may use: its CPU affinity, capped by a cgroup CPU
    quota (a Kubernetes CPU limit), rounded up."""
    if str(device).startswith("cuda"):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def _cgroup_cpu_quota() -> int | None:
    """CPUs the cgroup may use (cgroup v2 cpu.max, v1 cfs quota/period), rounded up; None without one."""
    import math

    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else math.ceil(quota / period)
    except (OSError, ValueError):
        return None


_HAVE_PROC = os.path.exists("/proc/self/stat")


def _process_state(pid: int) -> tuple[bool, int | None]:
    """(alive, start time) of process `pid` as this process sees it. The start time is
    /proc/<pid>/stat's field 22 (clock ticks after boot): a pid used again by a later process has
    another one. A zombie (killed, not yet reaped) counts as dead. Without /proc: os.kill, start None."""
    if _HAVE_PROC:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return False, None
        except OSError:  # readable by nobody here (hidepid): alive, start unknown
            return True, None
        try:
            fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": field 3 (state) on
            if fields[0] in (b"Z", b"X"):
                return False, None
            return True, int(fields[19])
        except (ValueError, IndexError):
            return True, None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        pass
    return True, None


class ServingState:
    """Serving's busy units, shared by the processes of one model server (Triton's model stubs):
    each serving process writes its own small file `<folder>/serving-<pid>`, training processes sum
    the files of the live ones. No locks across processes: each write is one pwrite of the whole
    record, and a reader sees each writer's last whole write.

    An entry cannot go stale (the folder may outlive a container restart, and pids are used again):
    the record carries its writer's start time, so the file an earlier process with the same pid
    left is not taken for the live one's, and a heartbeat with a lease, rewritten every lease/4 by a
    daemon thread while the process holds units, so a busy entry whose writer stopped (crashed,
    frozen) stops counting `lease_s` later. Readers remove entries that are stale: a dead or zombie
    writer, another start time, an expired busy lease, or a record of another format (the old
    4-byte one). A writer whose file a reader removed writes it again at its next write."""

    MAGIC = b"SSv2"
    # magic, writer's start time (ticks after boot; 0 = unknown), units, heartbeat (time.monotonic:
    # CLOCK_MONOTONIC, the same clock for every process of a machine), lease in seconds.
    _FORMAT = "<4sQidd"
    SIZE = struct.calcsize(_FORMAT)
    LEASE_S = 10.0  # a busy entry counts this long after its last heartbeat

    def __init__(self, folder: str | Path, lease_s: float | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)  # raises if it cannot be made: see open_serving_state
        self.lease_s = float(lease_s or self.LEASE_S)
        self._pid = os.getpid()
        self._path = self.folder / f"serving-{self._pid}"
        self._start = _process_state(self._pid)[1] or 0
        self._fd: int | None = None
        self._units = 0
        self._lock = threading.Lock()  # one record written at a time (publish, heartbeat)
        self._closed = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._failing = False

    def publish(self, units: int) -> None:
        """Best effort: a failure is logged, never raised into the request that publishes."""
        with self._lock:
            self._units = units
            self._write()
            if units > 0 and self._heartbeat is None and not self._closed.is_set():
                try:
                    self._heartbeat = threading.Thread(target=self._beat, name="serving-state-heartbeat",
                                                       daemon=True)
                    self._heartbeat.start()
                except RuntimeError as exc:  # no thread to be had: the entry expires during long requests
                    self._heartbeat = None
                    log.warning("serving state heartbeat not started: %s", exc)

    def _beat(self) -> None:
        while not self._closed.wait(self.lease_s / 4):
            with self._lock:
                if self._units > 0 and not self._closed.is_set():
                    self._write()

    def _write(self) -> None:
        """One pwrite of the whole record (the lock held)."""
        record = struct.pack(self._FORMAT, self.MAGIC, self._start, self._units, time.monotonic(), self.lease_s)
        try:
            if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
                os.close(self._fd)  # a reader took the file for stale (a late heartbeat): made again
                self._fd = None
            if self._fd is None:
                self._fd = self._create(record)
            else:
                os.pwrite(self._fd, record, 0)
            self._failing = False
        except OSError as exc:
            if not self._failing:
                log.warning("serving state %s not written (training elsewhere will not see this load): %s",
                            self._path, exc)
            self._failing = True

    def _create(self, record: bytes) -> int:
        """The file, whole from the start: written aside, then renamed over whatever an earlier
        process with this pid left (readers never see it empty)."""
        self.folder.mkdir(parents=True, exist_ok=True)  # another process's close may have removed it
        aside = self.folder / f".serving-{self._pid}.new"
        fd = os.open(aside, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(fd, record, 0)
            os.replace(aside, self._path)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _entry_units(self, pid: int, record: bytes, now: float) -> int | None:
        """The units an entry holds, or None where it is stale (to be removed)."""
        alive, start = _process_state(pid)
        if not alive or len(record) != self.SIZE:
            return None
        magic, written_start, units, heartbeat, lease = struct.unpack(self._FORMAT, record)
        if magic != self.MAGIC:
            return None
        if start is not None and written_start and written_start != start:
            return None  # left by an earlier process with this pid
        if units > 0 and not -lease <= now - heartbeat <= lease:
            return None  # busy, but no heartbeat within its lease (or of another boot's clock)
        return max(0, units)

    def others_busy(self) -> int:
        """Units held by the serving processes other than this one (stale entries are removed)."""
        total = 0
        now = time.monotonic()
        for path in self.folder.glob("serving-*"):
            suffix = path.name[len("serving-"):]
            if not suffix.isdigit() or int(suffix) == self._pid:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                inode = os.fstat(fd).st_ino
                record = os.pread(fd, self.SIZE + 1, 0)
                units = self._entry_units(int(suffix), record, now)
                if units is None:
                    # A read racing the writer's pwrite can see a torn record: read once more
                    # before calling a live writer's entry stale.
                    units = self._entry_units(int(suffix), os.pread(fd, self.SIZE + 1, 0), time.monotonic())
            finally:
                os.close(fd)
            if units is None:
                _remove_if_same(path, inode)
            else:
                total += units
        return total

    def close(self) -> None:
        self._closed.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=1)
        with self._lock:
            self._units = 0
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                self._path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()  # the server's last serving process to go removes the folder
        except OSError:
            pass


def _remove_if_same(path: Path, inode: int) -> None:
    """Removes `path` if it is still the file read (not one its writer has just made again)."""
    try:
        if os.stat(path).st_ino == inode:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def open_serving_state(folder: str | Path) -> ServingState | None:
    """The ServingState in `folder`, or None (logged) where it cannot be made: serving then never
    waits on it, and training in other processes does not see this one's load."""
    try:
        return ServingState(folder)
    except OSError as exc:
        log.warning("serving state folder %s unusable (%s): training beside serving in other processes "
                    "will not see this one's requests", folder, exc)
        return None


def serving_state_folder(explicit: str | Path | None = None) -> Path:
    """Where the processes of one Triton server meet: STEERSERVE_SERVING_STATE_DIR, else a folder
    named after the parent process (the tritonserver that started every model stub) in /dev/shm
    (or the temp folder)."""
    if explicit:
        return Path(explicit)
    import tempfile

    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return root / f"steerserve-serving-{os.getuid()}-{os.getppid()}"


class ComputeShare:
    """Step-level priority of serving over training on `units` of compute (see the module doc).

    `enabled=False` keeps the accounting (metrics) but never holds a training step back: training and
    serving then share the machine as the OS schedules them (the comparison the co-scheduling
    benchmark makes). `state`: the ServingState of other processes (Triton), if any.
    """

    POLL_S = 0.02  # how often a waiting training step re-checks serving in other processes

    def __init__(self, units: int, serving_units: int, training_units: int = 1, *, enabled: bool = True,
                 state: ServingState | None = None, on_wait: Callable[[float], None] | None = None):
        self.units = max(1, units)
        self.serving_units = min(max(1, serving_units), self.units)
        self.training_units = max(1, training_units)
        self.enabled = enabled
        self.state = state
        self.on_wait = on_wait  # seconds a training step waited for serving (a metric)
        self._cond = threading.Condition()
        self._serving = 0  # requests in flight here
        self._training = 0  # training steps running here
        self.waited_seconds = 0.0
        self.steps = 0

    # -- serving ---------------------------------------------------------------------------------

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around one request: while any is in flight, serving holds its units."""
        with self._cond:
            self._serving += 1
            if self._serving == 1 and self.state is not None:
                self.state.publish(self.serving_units)  # best effort, never raises
        try:
            yield
        finally:
            with self._cond:
                self._serving -= 1
                if self._serving == 0:
                    if self.state is not None:
                        self.state.publish(0)
                    self._cond.notify_all()

    def serving_busy(self) -> int:
        """Units serving holds now (this process and, with a ServingState, the others)."""
        local = self.serving_units if self._serving else 0
        return local + (self.state.others_busy() if self.state is not None else 0)

    # -- training --------------------------------------------------------------------------------

    def _room(self) -> bool:
        busy = self.serving_busy()  # (reads the other processes' files: once per check)
        if self._training == 0 and busy == 0:
            return True
        used = min(self.units, busy) + self._training * self.training_units
        return used + self.training_units <= self.units

    @contextmanager
    def training_step(self, should_stop: Callable[[], bool] | None = None) -> Iterator[None]:
        """Around one optimisation step: waits for room (serving first), then holds training's units.
        Returns early (the step runs) if `should_stop` turns true while waiting, so the caller's own
        stop check ends the job at once."""
        t0 = time.perf_counter()
        with self._cond:
            while self.enabled and not self._room():
                if should_stop is not None and should_stop():
                    break
                self._cond.wait(self.POLL_S)
            self._training += 1
        waited = time.perf_counter() - t0
        self.waited_seconds += waited
        self.steps += 1
        if self.on_wait is not None:
            self.on_wait(waited)
        try:
            yield
        finally:
            with self._cond:
                self._training -= 1
                self._cond.notify_all()


class TurnTaking:
    """A training job's Progress with `step_turn()`: each optimisation step waits for its turn on the
    ComputeShare (service.personalize.TrainingRun calls it). Everything else goes to `progress`."""

    def __init__(self, progress, share: ComputeShare):
        self._progress = progress
        self._share = share

    def step_turn(self):
        return self._share.training_step(self._progress.should_stop)

    def __getattr__(self, name):
        return getattr(self._progress, name)
