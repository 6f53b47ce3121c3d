"""Prometheus metrics of the gateway (base units: seconds, bytes; counters end in _total)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, watch_gpus: bool = True):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc_duration = Histogram(
            "steerserve_rpc_duration_seconds", "Wall time of an RPC in the gateway.", ["method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.rpc_requests = Counter(
            "steerserve_rpc_requests", "RPCs handled, by final gRPC status code.", ["method", "code"], registry=r
        )
        self.rpc_in_flight = Gauge(
            "steerserve_rpc_in_flight_requests", "RPCs being handled right now.", ["method"], registry=r
        )
        self.images = Counter("steerserve_images_generated", "Images returned by Generate and Edit.", registry=r)
        self.denoising_steps = Counter(
            "steerserve_denoising_steps", "Denoising steps run (one per UNet CFG batch per request).", registry=r
        )
        self.edits = Counter("steerserve_edits", "Edits returned, by method (DDS, DREAMSTEERER).", ["method"], registry=r)
        self.queue_wait = Histogram(
            "steerserve_engine_queue_wait_seconds", "Time a request waited for an engine worker.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("steerserve_engine_queue_depth", "Requests waiting for an engine worker.", registry=r)
        self._admission_metrics()
        # Personalization jobs.
        self.jobs_submitted = Counter(
            "steerserve_jobs_submitted", "Personalize jobs accepted.", ["method"], registry=r
        )
        self.jobs_finished = Counter(
            "steerserve_jobs_finished", "Personalize jobs ended, by final state.", ["method", "state"], registry=r
        )
        self.jobs_queued = Gauge("steerserve_jobs_queued", "Personalize jobs waiting for a training worker.", registry=r)
        self.jobs_running = Gauge("steerserve_jobs_running", "Personalize jobs training now.", registry=r)
        # With the job table shared by all gateway replicas, jobs_queued and this report the same
        # store-wide value on each replica: aggregate them with max(), not sum().
        self.jobs_oldest_queued_age = Gauge(
            "steerserve_jobs_oldest_queued_age_seconds",
            "Age of the oldest Personalize job still QUEUED (0 when none is), store-wide.", registry=r)
        self.training_steps = Counter(
            "steerserve_training_steps", "Optimisation steps run by personalization jobs.", ["method"], registry=r
        )
        # Training capacity per replica: the training queue over it is what scales training apart
        # from serving (deploy/observability: steerserve:training_queue_per_worker).
        self.training_capacity = Gauge(
            "steerserve_training_workers", "Jobs this replica trains at once (STEERSERVE_TRAINING_WORKERS).", registry=r)
        self.training_wait = Counter(
            "steerserve_training_wait_seconds",
            "Time training steps waited for serving to leave room (serving first, training in the gaps).", registry=r)
        self.training_seconds = Histogram(
            "steerserve_training_seconds", "Wall time of a job attempt from start to adapter and previews.",
            ["method"], buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200), registry=r,
        )
        if watch_gpus:
            self.watch_gpus()

    def _admission_metrics(self) -> None:
        r = self.registry
        self.admission_queued = Gauge("steerserve_admission_queued_requests",
                                      "Generate/Edit requests waiting for admission, per tenant.", ["tenant"], registry=r)
        self.admission_running = Gauge("steerserve_admission_running_requests",
                                       "Generate/Edit requests admitted and running, per tenant.", ["tenant"], registry=r)
        self.admission_wait = Histogram("steerserve_admission_wait_seconds",
                                        "Time an admitted request waited for its slot, per tenant.", ["tenant"],
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.admission_estimated_wait = Histogram(
            "steerserve_admission_estimated_wait_seconds", "The wait estimated for each request admitted.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.admission_rejections = Counter(
            "steerserve_admission_rejections", "Requests refused at admission (RESOURCE_EXHAUSTED), per tenant and "
            "reason: queue_full, tenant_queue, rate, deadline (the wait would miss it), too_slow (DEADLINE_EXCEEDED: "
            "it would miss it even unqueued).", ["tenant", "reason"], registry=r)
        self.admission_seconds_per_unit = Gauge(
            "steerserve_admission_seconds_per_unit", "Measured seconds per unit of work (UNet row-step), per "
            "kind of request: what wait estimates are made of.", ["kind"], registry=r)
        self.admission_tenants: set[str] = set()  # tenants with series, so they are set back to 0
        self.batch_width = Gauge(
            "steerserve_batch_width", "Requests admission runs at once, whose steps share each UNet call: the "
            "widest that costs each at most 1.4x its time alone, as measured on this device, times the ready "
            "Triton replicas (at most STEERSERVE_ADMISSION_SLOTS).", registry=r)

    def watch_gpus(self, nvml=None) -> None:
        """steerserve_gpu_* per GPU of this node, read through NVML at scrape time (gpu_metrics.py);
        nothing where NVML cannot initialise (no GPU). Done by the constructor unless watch_gpus=False."""
        from .gpu_metrics import NvmlCollector

        self.registry.register(NvmlCollector(nvml))

    def watch_step_batcher(self, batcher) -> None:
        """The in-process step batcher's counters (steps, shared UNet calls, rows, queue/compute)."""
        self.registry.register(_StepBatcherCollector(batcher))

    def watch_unet_runtime(self, engine) -> None:
        """How the in-process engine's UNet runs (service.compiled) and why, read from the engine at
        scrape time (`auto` switches from eager to the measured winner while serving)."""
        self.registry.register(_UNetRuntimeCollector(engine))


class _StepBatcherCollector:
    """The in-process backend's step batcher (service/engine/batching.py), read at scrape time."""

    def __init__(self, batcher):
        self.batcher = batcher

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        st = self.batcher.stats
        yield CounterMetricFamily("steerserve_engine_steps", "Denoising steps of Generate requests run in-process.",
                                  value=st.steps)
        yield CounterMetricFamily("steerserve_engine_unet_calls", "UNet calls those steps shared.", value=st.calls)
        yield CounterMetricFamily("steerserve_engine_unet_rows", "UNet rows in those calls.", value=st.rows)
        yield CounterMetricFamily("steerserve_engine_step_queue_seconds",
                                  "Time steps waited for a UNet call, summed over steps.", value=st.queue_seconds)
        yield CounterMetricFamily("steerserve_engine_step_compute_seconds",
                                  "Compute time of the UNet calls steps ran in, summed over steps.",
                                  value=st.compute_seconds)


class _UNetRuntimeCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        runtime, choice = self.engine.unet_runtime, self.engine.unet_runtime_choice
        stats = runtime.stats
        info = GaugeMetricFamily("steerserve_unet_runtime_info",
                                 "The UNet runtime in use, and how it was chosen (setting, measuring: eager "
                                 "serves meanwhile, measured, cached measurement).", labels=["runtime", "chosen_by"])
        info.add_metric([runtime.name, choice.chosen_by if choice is not None else "setting"], 1)
        yield info
        yield CounterMetricFamily(
            "steerserve_unet_runtime_failures",
            "UNet calls the runtime failed at serving time, answered by eager (that shape stays eager).",
            value=getattr(runtime, "failures", 0))
        speedup = choice.speedup(runtime.name) if choice is not None else None
        if speedup is not None:
            yield GaugeMetricFamily("steerserve_unet_runtime_speedup",
                                    "Eager UNet call time over the chosen runtime's, as measured when it was chosen.",
                                    value=speedup)
        yield CounterMetricFamily("steerserve_unet_runtime_calls", "UNet forwards run by the runtime.",
                                  value=stats.calls)
        yield CounterMetricFamily(
            "steerserve_unet_runtime_fallback_calls",
            "UNet forwards the compiled form did not cover (shape, gradients), run eager.", value=stats.fallback_calls)
        yield GaugeMetricFamily("steerserve_unet_runtime_shapes",
                                "Distinct (rows, height, width) shapes run in the compiled form.",
                                value=len(stats.shapes))
        yield GaugeMetricFamily("steerserve_unet_runtime_warmup_seconds",
                                "Time the UNet runtime took to get ready at start (choosing it included).",
                                value=stats.warmup_seconds)
