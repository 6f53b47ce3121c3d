"""service/gateway/gpu_metrics.py: the NVML collector, with a fake `pynvml` (no GPU here)."""

from __future__ import annotations

import logging
import subprocess
import shutil
import sys
import types
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.gateway.gpu_metrics import NvmlCollector
from service.gateway.metrics import GatewayMetrics

GIB = 1024**3


class NVMLError(Exception):
    pass


def fake_nvml(devices=None, init_error: Exception | None = None, broken: set[int] = frozenset()):
    """A module with pynvml's names; `devices`: (uuid, gpu percent, used bytes, total bytes) each."""
    devices = devices if devices is not None else []
    calls = {"init": 0}

    def nvmlInit():
        calls["init"] += 1
        if init_error is not None:
            raise init_error

    def handle(index):
        if index in broken:
            raise NVMLError("GPU is lost")
        return index

    mod = types.ModuleType("pynvml")
    mod.NVMLError = NVMLError
    mod.nvmlInit = nvmlInit
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = handle
    mod.nvmlDeviceGetUUID = lambda h: devices[h][0].encode() if h == 0 else devices[h][0]  # old pynvml: bytes
    mod.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=devices[h][1], memory=0)
    mod.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=devices[h][2], total=devices[h][3],
                                                            free=devices[h][3] - devices[h][2])
    mod.calls = calls
    return mod


TWO_GPUS = [("GPU-aaaa", 37, 3 * GIB, 80 * GIB), ("GPU-bbbb", 100, 79 * GIB, 80 * GIB)]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples if s.name.startswith("steerserve_gpu_")}


def test_collector_exports_each_gpu(monkeypatch):
    nvml = fake_nvml(TWO_GPUS)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # what `import pynvml` finds
    metrics = GatewayMetrics()  # registers the collector itself
    got = samples(metrics.registry)
    a = (("gpu", "0"), ("gpu_uuid", "GPU-aaaa"))
    b = (("gpu", "1"), ("gpu_uuid", "GPU-bbbb"))
    assert got == {
        ("steerserve_gpu_utilization_ratio", a): 0.37, ("steerserve_gpu_utilization_ratio", b): 1.0,
        ("steerserve_gpu_memory_used_bytes", a): 3 * GIB, ("steerserve_gpu_memory_used_bytes", b): 79 * GIB,
        ("steerserve_gpu_memory_total_bytes", a): 80 * GIB, ("steerserve_gpu_memory_total_bytes", b): 80 * GIB,
    }
    samples(metrics.registry)
    assert nvml.calls["init"] == 1  # initialised once, read at every scrape
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE steerserve_gpu_utilization_ratio gauge" in text
    assert 'steerserve_gpu_memory_used_bytes{gpu="1",gpu_uuid="GPU-bbbb"} 8.482560409' in text


def test_no_nvml_yields_nothing_logs_once_and_never_raises(caplog):
    nvml = fake_nvml(init_error=NVMLError("NVML Shared Library Not Found"))
    registry = CollectorRegistry()
    registry.register(NvmlCollector(nvml))
    with caplog.at_level(logging.INFO, logger="service.gateway.gpu_metrics"):
        for _ in range(3):
            assert samples(registry) == {}
            generate_latest(registry)  # a whole scrape still works
    assert nvml.calls["init"] == 1  # not retried at every scrape
    notes = [r for r in caplog.records if "NVML unavailable" in r.getMessage()]
    assert len(notes) == 1 and "Shared Library Not Found" in notes[0].getMessage()


def test_missing_pynvml_package_yields_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    registry = CollectorRegistry()
    registry.register(NvmlCollector())
    assert samples(registry) == {}


def test_a_failing_device_is_left_out_and_a_failing_read_never_raises():
    nvml = fake_nvml(TWO_GPUS, broken={0})
    registry = CollectorRegistry()
    registry.register(NvmlCollector(nvml))
    got = samples(registry)
    assert {labels for _, labels in got} == {(("gpu", "1"), ("gpu_uuid", "GPU-bbbb"))}

    def count():
        raise NVMLError("driver went away")
    nvml.nvmlDeviceGetCount = count
    assert samples(registry) == {}


def test_this_machine_scrapes_cleanly():
    """The real pynvml here (no GPU): the gateway's registry has no steerserve_gpu_* and scrapes fine."""
    metrics = GatewayMetrics()
    text = generate_latest(metrics.registry).decode()
    assert "steerserve_jobs_oldest_queued_age_seconds 0.0" in text
    if shutil.which("nvidia-smi") is None:
        assert "steerserve_gpu_" not in text
    promtool = shutil.which("promtool")
    if promtool is not None:
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_gpu_families_pass_promtool_lint():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing")
    registry = CollectorRegistry()
    registry.register(NvmlCollector(fake_nvml(TWO_GPUS)))
    out = subprocess.run([promtool, "check", "metrics"], input=generate_latest(registry).decode(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
