"""Serving state that cannot go stale (service/engine/priority.ServingState): the folder of busy
units outlives a container restart (Kubernetes keeps /dev/shm for the pod's life) and pids are used
again, so an entry is only believed while its writer is the process that wrote it (start time) and
keeps beating (a lease). Every serving process here is a real one, publishing through ComputeShare."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from service.engine.priority import ComputeShare, ServingState

ROOT = Path(__file__).resolve().parents[1]

# A Triton serving instance, reduced: each line on stdin starts a request that lasts until the next
# line. argv: the state folder, and a lease in seconds (set on the class, as a deployment would).
SERVING = """
import sys
from service.engine.priority import ComputeShare, ServingState
if len(sys.argv) > 2:
    ServingState.LEASE_S = float(sys.argv[2])
share = ComputeShare(units=1, serving_units=1, state=ServingState(sys.argv[1]))
print('ready', flush=True)
while sys.stdin.readline():
    with share.serving():
        print('busy', flush=True)
        sys.stdin.readline()
    print('idle', flush=True)
"""


class _Serving:
    def __init__(self, folder: Path, lease_s: float | None = None):
        args = [sys.executable, "-c", SERVING, str(folder)] + ([str(lease_s)] if lease_s else [])
        self.proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        assert self._line() == "ready"

    def _line(self) -> str:
        return self.proc.stdout.readline().strip()

    def request(self) -> None:
        """Starts a request; returns once it holds its units."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self._line() == "busy"

    def finish(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self._line() == "idle"

    def kill(self, reap: bool = True) -> None:
        self.proc.kill()
        if reap:
            self.proc.wait()


class _TrainingStep:
    """One training step waiting for its turn on `share` in a thread; `stop()` ends the wait."""

    def __init__(self, share: ComputeShare):
        self.entered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._step, args=(share,), daemon=True)
        self._thread.start()

    def _step(self, share):
        with share.training_step(self._stop.is_set):
            if not self._stop.is_set():
                self.entered.set()

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def _poll(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)  # the poll's interval, not a synchronisation: the deadline bounds it
    return condition()


def test_an_entry_left_under_a_pid_now_used_by_another_process_does_not_block(tmp_path):
    """(a) After a restart the pid in a file's name can belong to a live process that is not its writer."""
    folder = tmp_path / "serving"
    earlier = _Serving(folder)
    earlier.request()  # busy when it crashes: its entry holds 1 unit
    earlier.kill()
    left = folder / f"serving-{earlier.pid}"
    assert left.exists()
    # A live process now has the pid the file names (the test cannot make the kernel reuse a pid:
    # it gives the file the live process's pid, as a restart with reused pids does).
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        entry = folder / f"serving-{live.pid}"
        left.rename(entry)
        share = ComputeShare(units=1, serving_units=1, state=ServingState(folder))
        assert share.serving_busy() == 0  # another start time: not the live process's entry
        assert not entry.exists()  # and removed
        # An entry of the old format (4 bytes: units only) cannot say whose it is: stale.
        entry.write_bytes((1).to_bytes(4, "little"))
        assert share.serving_busy() == 0 and not entry.exists()
    finally:
        live.kill()
        live.wait()


def test_a_busy_entry_whose_heartbeat_expired_does_not_block(tmp_path):
    """(b) A live serving process beats while its request runs, however long; one that stops beating
    (here frozen by SIGSTOP: alive, same pid and start time) stops holding training back after its
    lease, and holds it again once it beats again."""
    folder = tmp_path / "serving"
    lease = 1.0
    server = _Serving(folder, lease_s=lease)
    step = None
    try:
        server.request()
        share = ComputeShare(units=1, serving_units=1, state=ServingState(folder))
        assert share.serving_busy() == 1
        step = _TrainingStep(share)
        assert not step.entered.wait(3 * lease)  # a request longer than the lease still holds
        os.kill(server.pid, signal.SIGSTOP)
        assert step.entered.wait(10)  # no heartbeat within the lease: training takes its turn
        assert not (folder / f"serving-{server.pid}").exists()  # the expired entry was removed
        os.kill(server.pid, signal.SIGCONT)
        assert _poll(lambda: share.serving_busy() == 1)  # beating again: its file made again
        server.finish()
        assert share.serving_busy() == 0
    finally:
        if step is not None:
            step.stop()
        server.kill()


def test_a_serving_process_killed_mid_request_and_a_new_one_do_not_block_training(tmp_path):
    """(c) A serving process SIGKILLed mid-request (its pid still there: not yet reaped), a new serving
    process started in the same state folder: training is not blocked."""
    folder = tmp_path / "serving"
    crashed = _Serving(folder)
    restarted = step = None
    try:
        crashed.request()
        share = ComputeShare(units=1, serving_units=1, state=ServingState(folder))
        assert share.serving_busy() == 1
        step = _TrainingStep(share)
        assert not step.entered.wait(0.3)  # serving holds the device
        crashed.kill(reap=False)  # mid-request; its parent has not collected it yet
        restarted = _Serving(folder)
        restarted.request()
        restarted.finish()  # the new process served and is idle
        assert step.entered.wait(30)  # within a lease at most (here at once: the writer is gone)
        assert share.serving_busy() == 0
        assert sorted(p.name for p in folder.glob("serving-*")) == [f"serving-{restarted.pid}"]
        restarted.request()  # the new process's own requests still hold training back
        assert share.serving_busy() == 1
        restarted.finish()
    finally:
        if step is not None:
            step.stop()
        crashed.kill()
        if restarted is not None:
            restarted.kill()


def test_a_closed_state_leaves_nothing_and_its_heartbeat_ends(tmp_path):
    folder = tmp_path / "serving"
    state = ServingState(folder, lease_s=0.2)
    state.publish(1)
    assert state._heartbeat is not None and state._heartbeat.is_alive()
    state.close()
    assert not state._heartbeat.is_alive()
    assert not folder.exists()  # the last serving process to go removes the folder
