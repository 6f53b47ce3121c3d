"""The UNet runtime a Triton `unet` instance chose, as an info metric on Triton's /metrics.

The instance decides at start (STEERSERVE_UNET_RUNTIME, by default `auto`: measured, or the cached
measurement; service/compiled/selection.py). Operators see it on Triton's /metrics beside nv_*;
the gateway reads it back for GetServerInfo (parse_runtime_info).
"""

from __future__ import annotations

import re

METRIC = "steerserve_triton_unet_runtime_info"
_LINE = re.compile(rf'^{METRIC}{{(?P<labels>[^}}]*)}} 1(?:\.0*)?$', re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class RuntimeInfoMetric:
    """One gauge series (value 1) labelled with the runtime and why it was chosen."""

    def __init__(self, pb_utils, engine, args: dict):
        runtime, choice = engine.unet_runtime, engine.unet_runtime_choice
        # Triton drops a family whose Python object is collected while its metrics live: keep both.
        self.family = pb_utils.MetricFamily(name=METRIC, description="The UNet runtime a Triton unet instance runs "
                                            "(STEERSERVE_UNET_RUNTIME; auto = the fastest measured).",
                                            kind=pb_utils.MetricFamily.GAUGE)
        self.metric = self.family.Metric(labels={
            "model": args["model_name"], "instance": args["model_instance_name"], "runtime": runtime.name,
            "choice": choice.describe()[:400] if choice is not None else "",
        })
        self.metric.set(1)


def parse_runtime_info(text: str) -> tuple[str, str]:
    """(runtime, why) from a /metrics page: the first instance's series ("", "") if none."""
    for match in _LINE.finditer(text):
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(match.group("labels"))}
        return labels.get("runtime", ""), labels.get("choice", "")
    return "", ""
