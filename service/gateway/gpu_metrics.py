"""GPU figures of the node this process runs on, read through NVML (`pynvml`, package nvidia-ml-py)
at scrape time: a prometheus_client custom collector.

Exported per GPU (labels `gpu`: NVML index, `gpu_uuid`: as Triton's nv_gpu_* label it, so the two
can be joined):

- `steerserve_gpu_utilization_ratio`: fraction of the last sample period a kernel ran (0..1; NVML's
  percent / 100, the same scale as Triton's `nv_gpu_utilization`);
- `steerserve_gpu_memory_used_bytes`, `steerserve_gpu_memory_total_bytes`: device memory.

Where NVML cannot initialise (no GPU or driver, as on CPU nodes; nvidia-ml-py not installed) the
collector yields nothing and logs that once; a scrape never raises because of it. A device that fails
during a scrape (e.g. "GPU is lost") is left out of that scrape only.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

UTILIZATION = "steerserve_gpu_utilization_ratio"
MEMORY_USED = "steerserve_gpu_memory_used_bytes"
MEMORY_TOTAL = "steerserve_gpu_memory_total_bytes"
LABELS = ("gpu", "gpu_uuid")
_HELP = {
    UTILIZATION: "Fraction of the last NVML sample period during which a kernel ran on the GPU (0..1).",
    MEMORY_USED: "GPU device memory in use (all processes), from NVML.",
    MEMORY_TOTAL: "GPU device memory installed, from NVML.",
}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlCollector:
    """Registered once per registry; NVML is initialised on the first scrape, not at import or
    registration, so building metrics costs nothing where no scrape ever happens (tests, CLIs)."""

    def __init__(self, nvml=None):
        self._nvml = nvml  # the pynvml module (tests pass a fake); imported lazily otherwise
        self._lock = threading.Lock()
        self._state = "new"  # new -> ready | unavailable
        self._device_errors_logged: set[int] = set()

    def describe(self):
        # The families this collector may yield (for the registry's duplicate-name check); no samples.
        return self._families()

    @staticmethod
    def _families():
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily(name, _HELP[name], labels=list(LABELS)) for name in (UTILIZATION, MEMORY_USED,
                                                                                          MEMORY_TOTAL)]

    def _ready(self):
        """The NVML module once initialised, or None (logged once) where it cannot be."""
        with self._lock:
            if self._state == "new":
                try:
                    if self._nvml is None:
                        import pynvml

                        self._nvml = pynvml
                    self._nvml.nvmlInit()
                    self._state = "ready"
                    log.info("NVML initialised: exporting steerserve_gpu_* for %d GPU(s)",
                             self._nvml.nvmlDeviceGetCount())
                except Exception as exc:  # noqa: BLE001 - no GPU / driver / package: no GPU metrics
                    self._state = "unavailable"
                    log.info("NVML unavailable (%s: %s): no steerserve_gpu_* metrics from this process",
                             type(exc).__name__, exc)
            return self._nvml if self._state == "ready" else None

    def collect(self):
        try:
            nvml = self._ready()
            if nvml is None:
                return
            samples = self._read(nvml)
        except Exception as exc:  # noqa: BLE001 - a scrape must never fail because of the GPU
            log.warning("NVML read failed: %s", exc)
            return
        if not samples:
            return
        util, used, total = self._families()
        for labels, (u, m_used, m_total) in samples:
            util.add_metric(labels, u)
            used.add_metric(labels, m_used)
            total.add_metric(labels, m_total)
        yield from (util, used, total)

    def _read(self, nvml) -> list[tuple[list[str], tuple[float, float, float]]]:
        samples = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                samples.append(([str(index), uuid], (rates.gpu / 100.0, float(memory.used), float(memory.total))))
            except Exception as exc:  # noqa: BLE001 - leave this device out of this scrape
                if index not in self._device_errors_logged:
                    self._device_errors_logged.add(index)
                    log.warning("NVML: GPU %d not read (%s: %s); left out of the metrics", index,
                                type(exc).__name__, exc)
        return samples
