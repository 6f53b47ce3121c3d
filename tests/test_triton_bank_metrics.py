"""BankMetrics: what the unet/text_encoder Triton models export of their adapter bank, against a
stand-in for pb_utils' custom-metric API (the real one exists only inside a stub; tests/test_triton.py
reads the real metrics off a running server)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from service.adapters import BankedAdapters, parse_adapter
from service.engine.default_model import default_model_dir
from service.engine.pipeline import Engine
from service.triton.bank_metrics import BankMetrics
from tests.adapter_files import lora_file


class FakeMetric:
    def __init__(self):
        self.value = 0.0

    def set(self, value):
        self.value = value

    def increment(self, value):
        self.value += value


class FakeFamily:
    GAUGE, COUNTER = "gauge", "counter"

    def __init__(self, name, description, kind):
        self.name, self.kind, self.metrics = name, kind, []

    def Metric(self, labels):  # noqa: N802 - pb_utils' name
        metric = FakeMetric()
        self.metrics.append((labels, metric))
        return metric


def test_bank_metrics_follow_the_manager(model_cache):
    model_dir = default_model_dir(model_cache)
    engine = Engine.from_pretrained(model_dir)
    files = {f"a{k}": parse_adapter(lora_file(model_dir, seed=k)) for k in range(3)}
    registry = CollectorRegistry()
    BankedAdapters.attach(engine, files.__getitem__, num_slots=3, max_rank=4, registry=registry)  # 2 adapter slots
    warnings = []
    pb_utils = SimpleNamespace(MetricFamily=FakeFamily, Logger=SimpleNamespace(log_warn=warnings.append))
    metrics = BankMetrics(pb_utils, engine, registry, {"model_name": "unet", "model_instance_name": "unet_0_0"})
    manager = engine.adapters.manager

    with manager.acquire(["a0", "a1"]):
        metrics.update()
        assert metrics._gauges["steerserve_triton_adapter_pinned_slots"].value == 2
    with manager.acquire(["a2"]):  # evicts a0
        pass
    with manager.acquire(["a1"]):  # a hit
        pass
    metrics.update()
    values = {name: m.value for name, m in {**metrics._gauges, **metrics._counters}.items()}
    assert values["steerserve_triton_adapter_pinned_slots"] == 0
    assert values["steerserve_triton_adapter_resident"] == 2
    assert values["steerserve_triton_adapter_cache_misses_total:store"] == 3  # a0, a1, a2 read from the store
    assert values["steerserve_triton_adapter_cache_misses_total:host"] == 0
    assert values["steerserve_triton_adapter_cache_hits_total"] == 1
    assert values["steerserve_triton_adapter_host_cache_bytes"] == sum(files[k].nbytes() for k in files)
    assert values["steerserve_triton_adapter_evictions_total"] == 1
    metrics.update()  # counters move by deltas: no double counting
    assert metrics._counters["steerserve_triton_adapter_cache_misses_total:store"].value == 3

    metrics.manager = None  # a failure inside update() is logged, never raised into execute()
    metrics.update()
    assert warnings and "not updated" in warnings[0]
