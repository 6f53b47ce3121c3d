"""deploy/observability/prometheus-rules.yaml: valid for Prometheus (`promtool check rules`) and doing
what it says on synthetic series (`promtool test rules`). That every metric the rules read exists on a
running gateway + Triton is checked in tests/test_triton.py, which has both running."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parent.parent / "deploy" / "observability" / "prometheus-rules.yaml"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: scripts/setup.sh --test installs it")

# Metrics that exist only on GPU nodes (Triton's NVML metrics): not on this machine's /metrics.
GPU_ONLY = {"nv_gpu_utilization"}


def rule_file(tmp_path: Path) -> Path:
    """The PrometheusRule's spec, as the plain rule file Prometheus itself loads."""
    spec = yaml.safe_load(RULES.read_text())["spec"]
    path = tmp_path / "steerserve.rules.yml"
    path.write_text(yaml.safe_dump(spec))
    return path


def metric_names() -> set[str]:
    """Every raw metric name the rules' expressions read (recording rules' own names have colons)."""
    spec = yaml.safe_load(RULES.read_text())["spec"]
    exprs = " ".join(rule["expr"] for group in spec["groups"] for rule in group["rules"])
    return set(re.findall(r"\b((?:steerserve|nv)_[a-z0-9_]+)\b", exprs))


def test_promtool_accepts_the_rules(tmp_path):
    out = subprocess.run([PROMTOOL, "check", "rules", str(rule_file(tmp_path))], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 13 rules found" in out.stdout, out.stdout


UNIT_TESTS = """
rule_files: [steerserve.rules.yml]
evaluation_interval: 30s
tests:
  # 10 Generate a minute, 1 of them INTERNAL: the error ratio is 10 %, the alert fires after 5 m.
  - interval: 30s
    input_series:
      - series: 'steerserve_rpc_requests_total{method="Generate",code="OK"}'
        values: '0+4.5x30'
      - series: 'steerserve_rpc_requests_total{method="Generate",code="INTERNAL"}'
        values: '0+0.5x30'
      - series: 'steerserve_rpc_requests_total{method="Generate",code="INVALID_ARGUMENT"}'
        values: '0+0x30'
    promql_expr_test:
      - expr: round(steerserve:rpc_errors:ratio_rate5m, 0.001)
        eval_time: 10m
        exp_samples: [{labels: '{}', value: 0.1}]
    alert_rule_test:
      - {alertname: SteerServeHighErrorRate, eval_time: 4m, exp_alerts: []}
      - alertname: SteerServeHighErrorRate
        eval_time: 12m
        exp_alerts: [{exp_labels: {severity: page}, exp_annotations: {summary: "More than 5% of SteerServe RPCs fail on the server side (10%)"}}]
  # Triton down for 1 minute does not page; for 3 minutes it does.
  - interval: 30s
    input_series:
      - series: 'steerserve_triton_up{instance="gw-0"}'
        values: '1 1 0 0 0 0 0 0 0 0 1'
    alert_rule_test:
      - {alertname: SteerServeTritonDown, eval_time: 1m30s, exp_alerts: []}
      - alertname: SteerServeTritonDown
        eval_time: 4m
        exp_alerts: [{exp_labels: {severity: page, instance: gw-0}, exp_annotations: {summary: "The gateway gw-0 has had no ready Triton for 2 minutes"}}]
      - {alertname: SteerServeTritonDown, eval_time: 5m30s, exp_alerts: []}
  # UNet steps queue 3 s per 1 s of compute: the ratio is 3 and the queue alert fires after 10 m.
  - interval: 30s
    input_series:
      - series: 'nv_inference_queue_duration_us{model="unet",version="1"}'
        values: '0+90000000x40'
      - series: 'nv_inference_compute_infer_duration_us{model="unet",version="1"}'
        values: '0+30000000x40'
    promql_expr_test:
      - expr: steerserve:triton_queue_compute:ratio_rate1m
        eval_time: 5m
        exp_samples: [{labels: 'steerserve:triton_queue_compute:ratio_rate1m{model="unet"}', value: 3}]
    alert_rule_test:
      - alertname: SteerServeTritonQueueGrowing
        eval_time: 15m
        exp_alerts: [{exp_labels: {severity: ticket, model: unet}, exp_annotations: {summary: "UNet steps wait 3x longer than they compute; the autoscaler is not keeping up"}}]
  # Jobs queued and none ever finished (the counter has no series yet): stuck after 30 m.
  - interval: 1m
    input_series:
      - series: 'steerserve_jobs_queued{instance="gw-0"}'
        values: '2x70'
    alert_rule_test:
      - {alertname: SteerServeJobsStuck, eval_time: 20m, exp_alerts: []}
      - alertname: SteerServeJobsStuck
        eval_time: 40m
        exp_alerts: [{exp_labels: {severity: ticket}, exp_annotations: {summary: "2 personalization jobs queued and none finished in 30 minutes"}}]
  # ... but not while jobs keep finishing.
  - interval: 1m
    input_series:
      - series: 'steerserve_jobs_queued{instance="gw-0"}'
        values: '2x70'
      - series: 'steerserve_jobs_finished_total{method="CUSTOM_DIFFUSION",state="SUCCEEDED"}'
        values: '0+1x70'
    alert_rule_test:
      - {alertname: SteerServeJobsStuck, eval_time: 60m, exp_alerts: []}
"""


def test_rules_behave_on_synthetic_series(tmp_path):
    rule_file(tmp_path)
    (tmp_path / "tests.yml").write_text(UNIT_TESTS)
    out = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_metric_the_rules_read_is_one_we_know():
    """The names the cross-check in tests/test_triton.py looks up on the running service."""
    names = metric_names()
    assert {"steerserve_rpc_requests_total", "steerserve_triton_up", "nv_inference_queue_duration_us"} <= names
    assert GPU_ONLY <= names
