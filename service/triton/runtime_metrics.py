"""What a Triton instance that runs the UNet exports on Triton's /metrics beside nv_*: the runtime
it chose (an info metric) and, for `generate`, its in-instance step batching (the load signal).

The instance serves at once (STEERSERVE_UNET_RUNTIME, by default `auto`: eager until the cached or
newly measured winner is warmed up in the background; service/compiled/configure.py). Operators see it on Triton's /metrics beside nv_*;
the gateway reads it back for GetServerInfo (parse_runtime_info).
"""

from __future__ import annotations

import re

METRIC = "steerserve_triton_unet_runtime_info"
_LINE = re.compile(rf'^{METRIC}{{(?P<labels>[^}}]*)}} 1(?:\.0*)?$', re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class RuntimeInfoMetric:
    """One gauge series (value 1) labelled with the runtime and why it was chosen. `auto` serves
    eager while it measures and then switches: `update` (each execute) moves the 1 to the new
    labels and sets the old series to 0."""

    def __init__(self, pb_utils, engine, args: dict):
        self.engine = engine
        self._base_labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        # Triton drops a family whose Python object is collected while its metrics live: keep both.
        self.family = pb_utils.MetricFamily(name=METRIC, description="The UNet runtime a Triton generate or unet instance runs "
                                            "(STEERSERVE_UNET_RUNTIME; auto = the fastest measured).",
                                            kind=pb_utils.MetricFamily.GAUGE)
        self.metrics: dict[tuple[str, str], object] = {}
        self.shown: tuple[str, str] | None = None
        self.update()

    def update(self) -> None:
        runtime, choice = self.engine.unet_runtime, self.engine.unet_runtime_choice
        labels = (runtime.name, choice.describe()[:400] if choice is not None else "")
        if labels == self.shown:
            return
        if self.shown is not None:
            self.metrics[self.shown].set(0)
        if labels not in self.metrics:
            self.metrics[labels] = self.family.Metric(labels={**self._base_labels, "runtime": labels[0],
                                                              "choice": labels[1]})
        self.metrics[labels].set(1)
        self.shown = labels


def parse_runtime_info(text: str) -> tuple[str, str]:
    """(runtime, why) from a /metrics page: the first instance's series ("", "") if none."""
    for match in _LINE.finditer(text):
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(match.group("labels"))}
        return labels.get("runtime", ""), labels.get("choice", "")
    return "", ""


class StepMetrics:
    """The `generate` instance's step batcher as counters: request steps, UNet calls, rows, and per
    step the time queued for a UNet call and the call's compute (microseconds). Its steps never pass
    through a Triton queue, so Triton's nv_inference_queue_duration_us does not see them: these two
    counters are their queue/compute signal (steerserve:triton_queue_compute:ratio_rate1m)."""

    COUNTERS = {
        "steerserve_triton_steps_total": ("steps", 1, "Denoising steps of requests run by a Triton generate instance."),
        "steerserve_triton_unet_calls_total": ("calls", 1, "UNet calls the steps of a Triton generate instance shared."),
        "steerserve_triton_unet_rows_total": ("rows", 1, "UNet rows in those calls."),
        "steerserve_triton_step_queue_us_total": ("queue_seconds", 1e6,
                                                  "Time steps waited for a UNet call in a Triton generate instance (us)."),
        "steerserve_triton_step_compute_us_total": ("compute_seconds", 1e6,
                                                    "Compute time of the UNet calls steps ran in, per step (us)."),
    }

    def __init__(self, pb_utils, batcher, args: dict):
        self._pb_utils = pb_utils
        self.batcher = batcher
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self._families = {name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
                          for name, (_, _, text) in self.COUNTERS.items()}
        self._counters = {name: family.Metric(labels=labels) for name, family in self._families.items()}
        self._seen = {name: 0.0 for name in self.COUNTERS}

    def update(self) -> None:
        try:
            for name, (field, scale, _) in self.COUNTERS.items():
                value = getattr(self.batcher.stats, field) * scale
                if value > self._seen[name]:
                    self._counters[name].increment(value - self._seen[name])
                    self._seen[name] = value
        except Exception as exc:  # noqa: BLE001 - a metrics failure must never fail the requests
            self._pb_utils.Logger.log_warn(f"step metrics not updated: {exc}")
