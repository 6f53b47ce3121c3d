"""The Triton supervisor's logic against a stand-in child process (a real `sleep`), in seconds.

The real thing (kill -9 of a real Triton, restart, health, jobs resuming) is the last test of
tests/test_triton.py.
"""

from __future__ import annotations

import asyncio
import subprocess

from prometheus_client import CollectorRegistry

from service.triton.launcher import TritonStartError
from service.triton.supervisor import SupervisorMetrics, TritonSupervisor


class StandInServer:
    """What the supervisor uses of a TritonServer: .process, .restart(), .log_tail()."""

    def __init__(self, failures: int = 0):
        self.process = subprocess.Popen(["sleep", "60"])
        self.failures = failures  # restarts that fail before one succeeds
        self.restart_calls = 0

    def restart(self):
        self.restart_calls += 1
        if self.restart_calls <= self.failures:
            self.process = subprocess.Popen(["true"])
            self.process.wait()
            raise TritonStartError("stand-in: failed to start")
        self.process = subprocess.Popen(["sleep", "60"])
        return self

    def is_ready(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return ""

    def close(self):
        self.process.kill()
        self.process.wait()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_dead_child_is_restarted_with_backoff_and_reported():
    async def scenario():
        server = StandInServer(failures=2)
        changes = []
        registry = CollectorRegistry()

        async def probe():
            return server.is_ready()

        sup = TritonSupervisor(probe, server, lambda up, why: changes.append((up, why)), SupervisorMetrics(registry),
                               poll_s=0.02, backoff_s=(0.05, 0.2)).start()
        try:
            server.process.kill()
            while sup.up or not sup.exited:
                await asyncio.sleep(0.01)
            assert "exited with code -9" in sup.reason
            assert registry.get_sample_value("steerserve_triton_up") == 0
            await asyncio.wait_for(sup.wait_up(), 10)
            assert not sup.exited and server.restart_calls == 3  # two failed starts, then back
            assert changes[0][0] is False and changes[-1] == (True, "")
            assert registry.get_sample_value("steerserve_triton_restarts_total", {"outcome": "failed"}) == 2
            assert registry.get_sample_value("steerserve_triton_restarts_total", {"outcome": "succeeded"}) == 1
            assert registry.get_sample_value("steerserve_triton_up") == 1
            assert registry.get_sample_value("steerserve_triton_down_seconds_total") > 0
            assert sup._backoff == 0.2  # doubled per restart, capped
        finally:
            await sup.stop()
            server.close()

    run(scenario())


def test_an_external_server_that_is_not_ready_is_reported_not_restarted():
    async def scenario():
        ready = {"value": True}
        changes = []
        probes = {"n": 0}

        async def probe():
            probes["n"] += 1
            return ready["value"]

        sup = TritonSupervisor(probe, None, lambda up, why: changes.append(up), poll_s=0.02).start()
        try:
            ready["value"] = False
            while sup.up:
                await asyncio.sleep(0.01)
            assert not sup.exited  # requests still go to it: its own errors say what is missing
            waiter = asyncio.ensure_future(sup.wait_up())
            seen = probes["n"]
            while probes["n"] < seen + 3:  # three more not-ready answers have been seen (run(): 30 s limit)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)  # and anything they woke has run
            assert not waiter.done()
            ready["value"] = True
            await asyncio.wait_for(waiter, 5)
            assert changes == [False, True]
        finally:
            await sup.stop()

    run(scenario())


def test_a_failing_probe_does_not_stop_the_watch():
    async def scenario():
        calls = {"n": 0}

        async def probe():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("probe blew up")
            return calls["n"] < 4

        sup = TritonSupervisor(probe, None, poll_s=0.02).start()
        try:
            while sup.up:
                await asyncio.sleep(0.01)
            assert calls["n"] >= 4
        finally:
            await sup.stop()

    run(scenario())
