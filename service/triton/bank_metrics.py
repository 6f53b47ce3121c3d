"""A Triton model instance's adapter bank, as custom metrics on Triton's own /metrics endpoint."""

from __future__ import annotations

from service.engine.pipeline import Engine


class BankMetrics:
    """One model instance's adapter bank, exported through Triton's own /metrics as custom metrics
    (the stub process has no HTTP endpoint of its own): residency, pins, host cache, and the
    manager's hit/miss/eviction counters. `update()` after each execute; at rest every pin must be
    back to zero, which the soak benchmark checks.

    `pb_utils` is passed in (it exists only inside a stub), so this stays importable in tests.
    """

    GAUGES = {
        "steerserve_triton_adapter_resident": "Adapters resident in the bank slots of a Triton model instance.",
        "steerserve_triton_adapter_pinned_slots": "Bank slots pinned by requests in flight in a Triton model instance.",
        "steerserve_triton_adapter_host_cached": "Parsed adapters kept in host memory by a Triton model instance.",
        "steerserve_triton_adapter_host_cache_bytes": "Bytes of parsed adapters kept in host memory by a Triton model instance.",
    }
    # Triton metric -> the manager's series it mirrors (in the instance's own registry), and the
    # values of that series' `source` label kept apart (misses: from host memory or the store).
    COUNTERS = {
        "steerserve_triton_adapter_cache_hits_total": ("steerserve_adapter_cache_hits_total", ()),
        "steerserve_triton_adapter_cache_misses_total": ("steerserve_adapter_cache_misses_total", ("host", "store")),
        "steerserve_triton_adapter_evictions_total": ("steerserve_adapter_evictions_total", ()),
        "steerserve_triton_adapter_prefetched_total": ("steerserve_adapter_prefetched_total", ()),
    }

    def __init__(self, pb_utils, engine: Engine, registry, args: dict):
        self._pb_utils = pb_utils
        self.manager = engine.adapters.manager
        self.registry = registry
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        # Triton drops a family whose Python object is collected while its metrics live: keep both.
        self._families = {
            **{name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.GAUGE)
               for name, text in self.GAUGES.items()},
            **{name: pb_utils.MetricFamily(name=name, description=f"{source} of a Triton model instance's adapter bank.",
                                           kind=pb_utils.MetricFamily.COUNTER)
               for name, (source, _) in self.COUNTERS.items()},
        }
        self._gauges = {name: self._families[name].Metric(labels=labels) for name in self.GAUGES}
        # One Triton metric per (name, source): keys "name" or "name:source".
        self._counters = {}
        for name, (_, sources) in self.COUNTERS.items():
            for source in sources or (None,):
                key = f"{name}:{source}" if source else name
                self._counters[key] = self._families[name].Metric(labels=dict(labels, source=source) if source else labels)
        self._seen = {key: 0.0 for key in self._counters}

    def values(self) -> dict[str, float]:
        values = {
            "steerserve_triton_adapter_resident": len(self.manager.resident()),
            "steerserve_triton_adapter_pinned_slots": sum(1 for n in self.manager.pinned().values() if n > 0),
            "steerserve_triton_adapter_host_cached": len(self.manager.host_cached()),
            "steerserve_triton_adapter_host_cache_bytes": self.manager.metrics.host_cache_bytes._value.get(),
        }
        samples = [sample for metric in self.registry.collect() for sample in metric.samples]
        for name, (series, sources) in self.COUNTERS.items():
            for source in sources or (None,):
                key = f"{name}:{source}" if source else name
                values[key] = sum(s.value for s in samples
                                  if s.name == series and (source is None or s.labels.get("source") == source))
        return values

    def update(self) -> None:
        try:
            self._update()
        except Exception as exc:  # noqa: BLE001 - a metrics failure must never fail the requests
            self._pb_utils.Logger.log_warn(f"adapter bank metrics not updated: {exc}")

    def _update(self) -> None:
        values = self.values()
        for name, gauge in self._gauges.items():
            gauge.set(values[name])
        for name, counter in self._counters.items():
            delta = values[name] - self._seen[name]
            if delta > 0:
                counter.increment(delta)
                self._seen[name] = values[name]
