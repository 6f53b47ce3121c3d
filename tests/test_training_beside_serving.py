"""Serving first, training in the gaps (service/engine/priority.py): the rule at step granularity,
across processes (Triton's model stubs), and inside the trainers' loop (TrainingRun.steps)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from service.engine.priority import ComputeShare, ServingState, TurnTaking
from service.personalize import NoProgress, TrainingSpec, TrainingStopped
from service.personalize.common import TrainingRun


class _Steps:
    """`n` threads each taking one training step on `share`; a step, once in, stays in until
    `release()`. `running` and `peak` are counted under `cond`, and each step's wait is kept."""

    def __init__(self, share: ComputeShare, n: int):
        self.cond = threading.Condition()
        self.running = self.peak = 0
        self.waits: list[float] = []
        self._release = threading.Event()
        self._threads = [threading.Thread(target=self._step, args=(share,), daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()

    def _step(self, share):
        t0 = time.perf_counter()
        with share.training_step():
            with self.cond:
                self.waits.append(time.perf_counter() - t0)
                self.running += 1
                self.peak = max(self.peak, self.running)
                self.cond.notify_all()
            self._release.wait(10)
            with self.cond:
                self.running -= 1

    def reach(self, running: int, timeout: float) -> bool:
        """Whether `running` steps are in at once within `timeout` seconds."""
        with self.cond:
            return self.cond.wait_for(lambda: self.running >= running, timeout)

    def release(self) -> None:
        self._release.set()
        for t in self._threads:
            t.join(10)


def test_training_fills_the_cores_serving_leaves():
    share = ComputeShare(units=2, serving_units=1)
    steps = _Steps(share, 2)
    assert steps.reach(2, timeout=10)  # serving idle: both jobs step at once
    steps.release()
    with share.serving():  # a request in flight holds its model thread's core
        steps = _Steps(share, 2)
        assert steps.reach(1, timeout=10)
        assert not steps.reach(2, timeout=0.3)  # the second waits for the first step's end
        steps.release()
    assert steps.peak == 1
    assert share.steps == 4 and share.waited_seconds > 0.25


def test_on_one_device_training_waits_while_serving_has_work():
    waited = []
    share = ComputeShare(units=1, serving_units=1, on_wait=waited.append)  # a GPU
    entered = threading.Event()

    def train_one_step():
        with share.training_step():
            entered.set()

    with share.serving():
        t = threading.Thread(target=train_one_step)
        t.start()
        assert not entered.wait(0.3)  # held back while the request runs
    assert entered.wait(2)  # the request ended: its turn
    t.join()
    assert waited and waited[0] >= 0.25


def test_without_the_rule_nothing_waits():
    share = ComputeShare(units=1, serving_units=1, enabled=False)
    with share.serving():
        steps = _Steps(share, 2)
        assert steps.reach(2, timeout=10)  # both in, beside a request, on one unit
        steps.release()
    assert steps.peak == 2


def test_a_waiting_step_stops_when_the_job_is_cancelled():
    share = ComputeShare(units=1, serving_units=1)
    waiting = threading.Event()
    stop = threading.Event()
    done = threading.Event()

    def should_stop():
        waiting.set()  # asked while it waits for its turn
        return stop.is_set()

    def job():
        with share.training_step(should_stop):
            done.set()

    with share.serving():
        t = threading.Thread(target=job)
        t.start()
        assert waiting.wait(2) and not done.is_set()  # held back by the request
        stop.set()  # cancelled while it waits: it returns (the job's own check then stops it)
        assert done.wait(2)
    t.join()


def test_serving_in_another_process_holds_training_back(tmp_path):
    """Triton: the generate instance (another process) publishes its busy units in a ServingState
    folder; a training step in this process waits while they are held, and a dead process's file
    stops counting."""
    folder = tmp_path / "serving"
    script = (
        "import sys, time\n"
        "from service.engine.priority import ComputeShare, ServingState\n"
        f"share = ComputeShare(units=1, serving_units=1, state=ServingState({str(folder)!r}))\n"
        "with share.serving():\n"
        "    print('busy', flush=True)\n"
        "    sys.stdin.readline()\n"
        "print('idle', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "busy"
        share = ComputeShare(units=1, serving_units=1, state=ServingState(folder))
        assert share.serving_busy() == 1
        entered = threading.Event()

        def train_one_step():
            with share.training_step():
                entered.set()

        t = threading.Thread(target=train_one_step)
        t.start()
        assert not entered.wait(0.3)
        server.stdin.write("\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "idle"
        assert entered.wait(2)
        t.join()
        # A serving process that dies busy does not hold training back for ever.
        server.kill()
        server.wait()
        (folder / f"serving-{server.pid}").write_bytes((1).to_bytes(4, "little"))
        assert share.serving_busy() == 0 and not (folder / f"serving-{server.pid}").exists()
    finally:
        server.kill()


class _Turns(NoProgress):
    def __init__(self):
        self.turns, self.inside, self.stop_at = 0, False, None
        self.steps_seen = 0

    def step_turn(self):
        progress = self

        class _Turn:
            def __enter__(self):
                progress.turns += 1
                progress.inside = True

            def __exit__(self, *exc):
                progress.inside = False

        return _Turn()

    def step(self, step, total, loss):
        assert self.inside  # reported from inside the turn: the whole step held it
        self.steps_seen = step

    def should_stop(self):
        return self.stop_at is not None and self.steps_seen >= self.stop_at


def _run(progress, steps: int = 3) -> TrainingRun:
    p = torch.nn.Parameter(torch.ones(2))
    spec = TrainingSpec(method="dreambooth-lora", images=[], token="sks", class_word="dog", steps=steps,
                        learning_rate=0.1, rank=1, batch_size=1, checkpoint_every=0)
    run = TrainingRun(spec, progress, {"p": p}, torch.optim.SGD([p], lr=0.1))
    for _ in run.steps():
        run.update((p ** 2).sum())
    return run


def test_every_training_step_runs_inside_its_turn():
    progress = _Turns()
    _run(progress)
    assert progress.turns == 3 and not progress.inside
    progress = _Turns()
    progress.stop_at = 2
    with pytest.raises(TrainingStopped):
        _run(progress, steps=5)
    assert progress.turns == 2 and not progress.inside


def test_turn_taking_wraps_a_jobs_progress():
    share = ComputeShare(units=1, serving_units=1)
    progress = TurnTaking(NoProgress(), share)
    assert progress.should_stop() is False  # the rest goes to the job's own Progress
    _run(progress)
    assert share.steps == 3


def test_units_are_capped_by_the_cgroup_quota(monkeypatch):
    from service.engine import priority

    monkeypatch.setattr(priority, "_cgroup_cpu_quota", lambda: 1)
    assert priority.default_units("cpu") == 1
    monkeypatch.setattr(priority, "_cgroup_cpu_quota", lambda: None)
    assert priority.default_units("cpu") >= 1
    assert priority.default_units("cuda:0") == 1


def test_an_unusable_serving_state_never_fails_a_request(tmp_path):
    from service.engine.priority import open_serving_state

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert open_serving_state(blocker / "sub") is None  # cannot be a folder: logged, no state
    state = ServingState(tmp_path / "ok")
    state._fd = 10**6  # a descriptor that is not open: every write fails
    share = ComputeShare(units=1, serving_units=1, state=state)
    with share.serving():
        pass
    assert share._serving == 0
