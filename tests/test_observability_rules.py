"""deploy/observability/: the PrometheusRule is valid for Prometheus (`promtool check rules`) and does
what it says on synthetic series (`promtool test rules`); the ServiceMonitors, the Grafana dashboard
and its ConfigMap are well-formed and consistent with the rules (`kubectl kustomize`, structure).

That every metric the rules, the dashboard and the prometheus-adapter rules read exists on a running
gateway + Triton, and that a real Prometheus scraping them evaluates every rule, is checked in
tests/test_triton.py, which has both running. The helpers here (metric_names, GPU_ONLY, ...) are
what it uses."""

from __future__ import annotations

import glob
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import required_tool

ROOT = Path(__file__).resolve().parent.parent
OBSERVABILITY = ROOT / "deploy" / "observability"
RULES = OBSERVABILITY / "prometheus-rules.yaml"
DASHBOARD = OBSERVABILITY / "grafana" / "steerserve.json"
DOCS = ROOT / "docs" / "observability.md"
# promtool and kubectl: scripts/setup.sh --test installs them; a test that needs one fails without it.

# Metrics that exist only on GPU nodes: Triton's NVML metrics and our own NVML collector's
# (service/gateway/gpu_metrics.py). Never on this machine's /metrics.
GPU_ONLY = {
    "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
    "steerserve_gpu_utilization_ratio", "steerserve_gpu_memory_used_bytes", "steerserve_gpu_memory_total_bytes",
}
# The gateway's own adapter bank: only with --backend inprocess (with Triton the banks live in Triton,
# steerserve_triton_adapter_*), so not on tests/test_triton.py's gateway. Checked below on the
# gateway's registry, and live in tests/test_gateway_adapters.py.
INPROCESS_ONLY = {"steerserve_adapter_cache_hits_total", "steerserve_adapter_cache_misses_total"}
# Store-wide gauges (the job table is shared by the gateway replicas): aggregate with max(), never sum().
STORE_WIDE = {"steerserve_jobs_queued", "steerserve_jobs_oldest_queued_age_seconds"}

_RAW = re.compile(r"\b((?:steerserve|nv)_[a-z0-9_]+)\b")
_RECORDED = re.compile(r"\b(steerserve:[a-zA-Z0-9_:]+)")


def spec() -> dict:
    return yaml.safe_load(RULES.read_text())["spec"]


def rule_file(tmp_path: Path, interval: str | None = None) -> Path:
    """The PrometheusRule's spec, as the plain rule file Prometheus itself loads (`interval`: replace
    each group's evaluation interval, e.g. None -> the shipped one)."""
    groups = spec()
    if interval is not None:
        for group in groups["groups"]:
            group["interval"] = interval
    path = tmp_path / "steerserve.rules.yml"
    path.write_text(yaml.safe_dump(groups))
    return path


def rules() -> list[dict]:
    return [rule for group in spec()["groups"] for rule in group["rules"]]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in rules()]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold theirs
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def _yaml_docs(text: str) -> list:
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return []


def _adapter_rules(node) -> list[dict]:
    """prometheus-adapter rule items (seriesQuery / metricsQuery) anywhere in a YAML tree, also
    inside a ConfigMap's or a Helm values file's embedded YAML strings."""
    found = []
    if isinstance(node, dict):
        if "seriesQuery" in node or "metricsQuery" in node:
            found.append(node)
        for value in node.values():
            found.extend(_adapter_rules(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_adapter_rules(value))
    elif isinstance(node, str) and ("seriesQuery" in node or "metricsQuery" in node):
        for doc in _yaml_docs(node):
            found.extend(_adapter_rules(doc))
    return found


def adapter_exprs() -> list[str]:
    """The seriesQuery/metricsQuery strings of any prometheus-adapter config under deploy/ (written
    by the autoscaling work; none yet is fine)."""
    exprs = []
    for name in sorted(glob.glob(str(ROOT / "deploy" / "**" / "*.yaml"), recursive=True)
                       + glob.glob(str(ROOT / "deploy" / "**" / "*.yml"), recursive=True)):
        for doc in _yaml_docs(Path(name).read_text()):
            for rule in _adapter_rules(doc):
                exprs.extend(str(rule[key]) for key in ("seriesQuery", "metricsQuery") if key in rule)
    return exprs


def _keda_queries(node) -> list[str]:
    """The PromQL of KEDA `prometheus` triggers anywhere in a YAML tree."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == "prometheus" and isinstance(node.get("metadata"), dict) and "query" in node["metadata"]:
            found.append(str(node["metadata"]["query"]))
        for value in node.values():
            found.extend(_keda_queries(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_keda_queries(value))
    return found


def keda_exprs() -> list[str]:
    """The queries of any KEDA ScaledObject under deploy/ (none is fine)."""
    exprs = []
    for name in sorted(glob.glob(str(ROOT / "deploy" / "**" / "*.yaml"), recursive=True)
                       + glob.glob(str(ROOT / "deploy" / "**" / "*.yml"), recursive=True)):
        for doc in _yaml_docs(Path(name).read_text()):
            exprs.extend(_keda_queries(doc))
    return exprs


def autoscaling_promql() -> list[str]:
    """The autoscalers' queries as plain PromQL: prometheus-adapter's metricsQuery templates filled in
    (<<.Series>>: the seriesQuery's metric, <<.LabelMatchers>>: a matcher, <<.GroupBy>>: a label)."""
    queries = list(keda_exprs())
    for name in sorted(glob.glob(str(ROOT / "deploy" / "**" / "*.yaml"), recursive=True)):
        for doc in _yaml_docs(Path(name).read_text()):
            for rule in _adapter_rules(doc):
                if "metricsQuery" not in rule:
                    continue
                series = _RAW.findall(str(rule.get("seriesQuery", ""))) or ["up"]
                queries.append(str(rule["metricsQuery"]).replace("<<.Series>>", series[0])
                               .replace("<<.LabelMatchers>>", 'job!=""').replace("<<.GroupBy>>", "job"))
    return queries


def raw_names(exprs) -> set[str]:
    """Raw metric names read by expressions (recording rules' own names have colons)."""
    return set(_RAW.findall(" ".join(exprs)))


def metric_names() -> set[str]:
    """Every raw metric name the rules read."""
    return raw_names(rule_exprs())


def all_metric_names() -> dict[str, set[str]]:
    """Raw metric names read by each shipped consumer: what must exist on the running service."""
    return {"rules": metric_names(), "dashboard": raw_names(dashboard_exprs()),
            "prometheus-adapter": raw_names(adapter_exprs()), "keda": raw_names(keda_exprs())}


# --- the rules -------------------------------------------------------------------------------------


def test_promtool_accepts_the_rules(tmp_path):
    out = subprocess.run([required_tool("promtool"), "check", "rules", str(rule_file(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout, out.stdout
    assert len(recorded()) == 14 and len(alerts()) == 10


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
      - expr: round(steerserve:rpc_requests:rate1m, 0.0001)
        eval_time: 10m
        exp_samples:
          - {labels: '{method="Generate",code="OK"}', value: 0.15}
          - {labels: '{method="Generate",code="INTERNAL"}', value: 0.0167}
          - {labels: '{method="Generate",code="INVALID_ARGUMENT"}', value: 0}
    alert_rule_test:
      - {alertname: SteerServeHighErrorRate, eval_time: 4m, exp_alerts: []}
      - alertname: SteerServeHighErrorRate
        eval_time: 12m
        exp_alerts: [{exp_labels: {severity: page}, exp_annotations: {summary: "More than 5% of SteerServe RPCs fail on the server side (10%)"}}]
  # Two replicas: images/s is summed over them.
  - interval: 1m
    input_series:
      - series: 'steerserve_images_generated_total{instance="gw-0"}'
        values: '0+60x20'
      - series: 'steerserve_images_generated_total{instance="gw-1"}'
        values: '0+30x20'
    promql_expr_test:
      - expr: steerserve:images_generated:rate1m
        eval_time: 10m
        exp_samples: [{labels: 'steerserve:images_generated:rate1m', value: 1.5}]
  # p95 per method: 9 of 10 Generate answers took 10..30 s, every Status under 0.1 s.
  - interval: 30s
    input_series:
      - series: 'steerserve_rpc_duration_seconds_bucket{method="Generate",le="10",instance="gw-0"}'
        values: '0+1x40'
      - series: 'steerserve_rpc_duration_seconds_bucket{method="Generate",le="30",instance="gw-0"}'
        values: '0+10x40'
      - series: 'steerserve_rpc_duration_seconds_bucket{method="Generate",le="+Inf",instance="gw-0"}'
        values: '0+10x40'
      - series: 'steerserve_rpc_duration_seconds_bucket{method="Status",le="0.1",instance="gw-0"}'
        values: '0+10x40'
      - series: 'steerserve_rpc_duration_seconds_bucket{method="Status",le="+Inf",instance="gw-0"}'
        values: '0+10x40'
    promql_expr_test:
      - expr: round(steerserve:rpc_duration_seconds:p95_5m, 0.001)
        eval_time: 10m
        exp_samples:
          - {labels: '{method="Generate"}', value: 28.889}
          - {labels: '{method="Status"}', value: 0.095}
    alert_rule_test:
      - {alertname: SteerServeGenerateLatencySLO, eval_time: 9m, exp_alerts: []}
      - alertname: SteerServeGenerateLatencySLO
        eval_time: 15m
        exp_alerts: [{exp_labels: {severity: ticket, method: Generate}, exp_annotations: {summary: "Generate p95 latency 28.89s is above the 10 s objective"}}]
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
  # Prometheus loses Triton's and the gateway's metrics endpoints.
  - interval: 30s
    input_series:
      - series: 'up{job="steerserve-triton",instance="10.0.0.7:8002"}'
        values: '1 1 0x10'
      - series: 'up{job="steerserve-gateway",instance="10.0.0.7:9464"}'
        values: '1x4 0x10'
    alert_rule_test:
      - {alertname: SteerServeTritonScrapeDown, eval_time: 1m30s, exp_alerts: []}
      - alertname: SteerServeTritonScrapeDown
        eval_time: 4m
        exp_alerts: [{exp_labels: {severity: page, job: steerserve-triton, instance: "10.0.0.7:8002"}, exp_annotations: {summary: "Prometheus cannot scrape Triton at 10.0.0.7:8002"}}]
      - {alertname: SteerServeGatewayScrapeDown, eval_time: 3m, exp_alerts: []}
      - alertname: SteerServeGatewayScrapeDown
        eval_time: 5m
        exp_alerts: [{exp_labels: {severity: page, job: steerserve-gateway, instance: "10.0.0.7:9464"}, exp_annotations: {summary: "Prometheus cannot scrape the gateway at 10.0.0.7:9464"}}]
  # Three restarts within a few minutes: a ticket; none in the last 15 minutes: resolved.
  - interval: 1m
    input_series:
      - series: 'steerserve_triton_restarts_total{instance="gw-0",outcome="succeeded"}'
        values: '0 1 2 3x40'
    alert_rule_test:
      - {alertname: SteerServeTritonRestarting, eval_time: 2m, exp_alerts: []}
      - alertname: SteerServeTritonRestarting
        eval_time: 8m
        exp_alerts: [{exp_labels: {severity: ticket, instance: gw-0, outcome: succeeded}, exp_annotations: {summary: "Triton behind gw-0 restarted more than twice in 15 minutes"}}]
      - {alertname: SteerServeTritonRestarting, eval_time: 30m, exp_alerts: []}
  # UNet steps queue 3 s per 1 s of compute: the ratio is 3 and the queue alert fires after 10 m.
  # Edits' steps through Triton's unet queue (nv_*); Generate's in the generate instance's own
  # batcher (its step counters; Triton's nv_* for generate, ~0 queue, must not count).
  - interval: 30s
    input_series:
      - series: 'nv_inference_queue_duration_us{model="unet",version="1"}'
        values: '0+90000000x40'
      - series: 'nv_inference_compute_infer_duration_us{model="unet",version="1"}'
        values: '0+30000000x40'
      - series: 'nv_inference_queue_duration_us{model="generate",version="1"}'
        values: '0+1000x40'
      - series: 'nv_inference_compute_infer_duration_us{model="generate",version="1"}'
        values: '0+60000000x40'
      - series: 'steerserve_triton_step_queue_us_total{model="generate",instance="generate_0_0"}'
        values: '0+30000000x40'
      - series: 'steerserve_triton_step_compute_us_total{model="generate",instance="generate_0_0"}'
        values: '0+20000000x40'
    promql_expr_test:
      - expr: steerserve:triton_queue_compute:ratio_rate1m
        eval_time: 5m
        exp_samples:
          - {labels: 'steerserve:triton_queue_compute:ratio_rate1m{model="unet"}', value: 3}
          - {labels: 'steerserve:triton_queue_compute:ratio_rate1m{model="generate"}', value: 1.5}
    alert_rule_test:
      - alertname: SteerServeTritonQueueGrowing
        eval_time: 15m
        exp_alerts: [{exp_labels: {severity: ticket, model: unet}, exp_annotations: {summary: "UNet steps wait 3x longer than they compute; the autoscaler is not keeping up"}}]
  # Adapter cache hit ratios: Triton's generate bank (the serving path), per Triton model, the gateway's own bank.
  - interval: 1m
    input_series:
      - series: 'steerserve_triton_adapter_cache_hits_total{model="generate",instance="t-0",job="steerserve-triton"}'
        values: '0+30x20'
      - series: 'steerserve_triton_adapter_cache_misses_total{model="generate",instance="t-0",job="steerserve-triton"}'
        values: '0+10x20'
      - series: 'steerserve_triton_adapter_cache_hits_total{model="text_encoder",instance="t-0",job="steerserve-triton"}'
        values: '0+10x20'
      - series: 'steerserve_triton_adapter_cache_misses_total{model="text_encoder",instance="t-0",job="steerserve-triton"}'
        values: '0+10x20'
      - series: 'steerserve_adapter_cache_hits_total{instance="gw-0"}'
        values: '0+9x20'
      - series: 'steerserve_adapter_cache_misses_total{instance="gw-0",source="store"}'
        values: '0+1x20'
    promql_expr_test:
      - expr: round(steerserve:adapter_cache_hit:ratio_rate5m, 0.001)
        eval_time: 10m
        exp_samples: [{labels: '{}', value: 0.75}]
      - expr: round(steerserve:triton_adapter_cache_hit:ratio_rate5m, 0.001)
        eval_time: 10m
        exp_samples:
          - {labels: '{model="generate"}', value: 0.75}
          - {labels: '{model="text_encoder"}', value: 0.5}
      - expr: round(steerserve:gateway_adapter_cache_hit:ratio_rate5m, 0.001)
        eval_time: 10m
        exp_samples: [{labels: '{}', value: 0.9}]
  # GPU utilisation per target: Triton's two GPUs averaged; the gateway's NVML reading.
  - interval: 1m
    input_series:
      - series: 'nv_gpu_utilization{instance="t-0:8002",gpu_uuid="GPU-a"}'
        values: '0.5x10'
      - series: 'nv_gpu_utilization{instance="t-0:8002",gpu_uuid="GPU-b"}'
        values: '1x10'
      - series: 'steerserve_gpu_utilization_ratio{instance="gw-0:9464",gpu="0",gpu_uuid="GPU-a"}'
        values: '0.25x10'
    promql_expr_test:
      - expr: steerserve:gpu_utilization:avg
        eval_time: 5m
        exp_samples: [{labels: 'steerserve:gpu_utilization:avg{instance="t-0:8002"}', value: 0.75}]
      - expr: steerserve:gpu_utilization_nvml:avg
        eval_time: 5m
        exp_samples: [{labels: 'steerserve:gpu_utilization_nvml:avg{instance="gw-0:9464"}', value: 0.25}]
  # Two replicas report the same store-wide job queue: max, not sum. The oldest queued job ages a
  # minute a minute: stuck once it is 30 m old, for 5 m. (Alerts read the recorded series: checked
  # half-way between samples, where it is the same whichever group is evaluated first.)
  - interval: 1m
    input_series:
      - series: 'steerserve_jobs_queued{instance="gw-0"}'
        values: '3x70'
      - series: 'steerserve_jobs_queued{instance="gw-1"}'
        values: '3x70'
      - series: 'steerserve_jobs_oldest_queued_age_seconds{instance="gw-0"}'
        values: '0+60x70'
      - series: 'steerserve_jobs_oldest_queued_age_seconds{instance="gw-1"}'
        values: '0+60x70'
    promql_expr_test:
      - expr: steerserve:jobs_queued:max
        eval_time: 10m
        exp_samples: [{labels: 'steerserve:jobs_queued:max', value: 3}]
      - expr: steerserve:jobs_oldest_queued_age_seconds:max
        eval_time: 10m
        exp_samples: [{labels: 'steerserve:jobs_oldest_queued_age_seconds:max', value: 600}]
    alert_rule_test:
      - {alertname: SteerServeJobsStuck, eval_time: 33m, exp_alerts: []}
      - alertname: SteerServeJobsStuck
        eval_time: 40m30s
        exp_alerts: [{exp_labels: {severity: ticket}, exp_annotations: {summary: "The oldest queued personalization job has waited 40m 0s"}}]
      - {alertname: SteerServeJobQueueGrowing, eval_time: 60m, exp_alerts: []}
  # ... but not while the workers keep taking jobs (the oldest is taken at 20 m; the next is younger).
  - interval: 1m
    input_series:
      - series: 'steerserve_jobs_oldest_queued_age_seconds{instance="gw-0"}'
        values: '0+60x20 0+60x50'
    alert_rule_test:
      - {alertname: SteerServeJobsStuck, eval_time: 45m, exp_alerts: []}
  # The job queue grows by one a minute: once over 10, and still growing for 15 m, a ticket. (At
  # 30m30s the recorded value is 30 whichever group the evaluation runs first.)
  - interval: 1m
    input_series:
      - series: 'steerserve_jobs_queued{instance="gw-0"}'
        values: '0+1x70'
      - series: 'steerserve_jobs_queued{instance="gw-1"}'
        values: '0+1x70'
    alert_rule_test:
      - {alertname: SteerServeJobQueueGrowing, eval_time: 20m, exp_alerts: []}
      - alertname: SteerServeJobQueueGrowing
        eval_time: 30m30s
        exp_alerts: [{exp_labels: {severity: ticket}, exp_annotations: {summary: "30 personalization jobs queued and the queue keeps growing"}}]
  # The training queue per job slot: 6 queued (store-wide, the same on both gateways) over 2 + 2 slots.
  # Two jobs run; their steps wait 0.8 s of each second for serving: crowded out, a ticket after 30 m.
  - interval: 1m
    input_series:
      - series: 'steerserve_jobs_queued{instance="gw-0"}'
        values: '6x60'
      - series: 'steerserve_jobs_queued{instance="gw-1"}'
        values: '6x60'
      - series: 'steerserve_training_workers{instance="gw-0"}'
        values: '2x60'
      - series: 'steerserve_training_workers{instance="gw-1"}'
        values: '2x60'
      - series: 'steerserve_jobs_running{instance="gw-0"}'
        values: '1x60'
      - series: 'steerserve_jobs_running{instance="gw-1"}'
        values: '1x60'
      - series: 'steerserve_training_wait_seconds_total{instance="gw-0"}'
        values: '0+48x60'
      - series: 'steerserve_training_wait_seconds_total{instance="gw-1"}'
        values: '0+48x60'
    promql_expr_test:
      - expr: steerserve:training_queue_per_worker:ratio
        eval_time: 10m
        exp_samples: [{labels: 'steerserve:training_queue_per_worker:ratio', value: 1.5}]
      - expr: steerserve:training_wait:ratio_rate5m
        eval_time: 10m
        exp_samples: [{labels: 'steerserve:training_wait:ratio_rate5m', value: 0.8}]
    alert_rule_test:
      - {alertname: SteerServeTrainingCrowdedOut, eval_time: 20m, exp_alerts: []}
      - alertname: SteerServeTrainingCrowdedOut
        eval_time: 45m
        exp_alerts: [{exp_labels: {severity: ticket}, exp_annotations: {summary: "Training steps wait for serving 80% of the time while jobs queue"}}]
  # Waiting as much, but no job queues beyond the slots: serving simply comes first; no alert.
  - interval: 1m
    input_series:
      - series: 'steerserve_jobs_queued{instance="gw-0"}'
        values: '1x60'
      - series: 'steerserve_training_workers{instance="gw-0"}'
        values: '2x60'
      - series: 'steerserve_jobs_running{instance="gw-0"}'
        values: '2x60'
      - series: 'steerserve_training_wait_seconds_total{instance="gw-0"}'
        values: '0+96x60'
    alert_rule_test:
      - {alertname: SteerServeTrainingCrowdedOut, eval_time: 45m, exp_alerts: []}
"""


def unit_tests() -> str:
    """UNIT_TESTS with each expected alert's static annotations (description, runbook_url) added
    from the rules: promtool compares the whole annotation set."""
    tests = yaml.safe_load(UNIT_TESTS)
    static = {name: {k: v for k, v in rule.get("annotations", {}).items() if "{{" not in v}
              for name, rule in alerts().items()}
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            for alert in check["exp_alerts"]:
                alert["exp_annotations"] = {**static[check["alertname"]], **alert["exp_annotations"]}
    return yaml.safe_dump(tests, sort_keys=False)


def test_rules_behave_on_synthetic_series(tmp_path):
    rule_file(tmp_path)
    (tmp_path / "tests.yml").write_text(unit_tests())
    out = subprocess.run([required_tool("promtool"), "test", "rules", "tests.yml"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_and_recording_rule_is_tested_and_documented():
    tests = yaml.safe_load(UNIT_TESTS)["tests"]
    fired = {check["alertname"] for case in tests for check in case.get("alert_rule_test", []) if check["exp_alerts"]}
    evaluated = set(_RECORDED.findall(" ".join(t["expr"] for case in tests for t in case.get("promql_expr_test", []))))
    assert fired == set(alerts()), set(alerts()) - fired
    assert evaluated == recorded(), recorded() - evaluated
    docs = DOCS.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", docs, re.M)}
    for name, rule in alerts().items():
        assert "for" in rule and rule["labels"]["severity"] in {"page", "ticket"}, name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/observability.md" and anchor in anchors, (name, anchor)
    for name in recorded():
        assert f"`{name}`" in docs, f"{name} not described in docs/observability.md"


def test_store_wide_job_gauges_are_aggregated_with_max():
    """With the job table shared by the replicas every replica reports the same value: a sum would
    count the queue once per replica."""
    for expr in rule_exprs() + dashboard_exprs() + adapter_exprs() + keda_exprs():
        for name in STORE_WIDE & raw_names([expr]):
            assert re.search(rf"\bmax(_over_time)?\s*(by\s*\([^)]*\)\s*)?\(\s*{name}\b", expr), expr
    assert "max(steerserve_jobs_queued)" in rule_exprs()
    assert "max(steerserve_jobs_oldest_queued_age_seconds)" in rule_exprs()


def test_every_metric_the_rules_read_is_one_we_know():
    """The names the cross-check in tests/test_triton.py looks up on the running service."""
    names = metric_names()
    assert {"steerserve_rpc_requests_total", "steerserve_triton_up", "nv_inference_queue_duration_us",
            "steerserve_jobs_oldest_queued_age_seconds", "steerserve_triton_adapter_cache_hits_total"} <= names
    assert {"nv_gpu_utilization", "steerserve_gpu_utilization_ratio"} <= names
    used = set().union(*all_metric_names().values())
    assert used & GPU_ONLY and used & INPROCESS_ONLY


def test_names_not_on_the_triton_stack_are_declared_by_our_code():
    """GPU-only and in-process-only names cannot be seen on tests/test_triton.py's CPU gateway: they
    must at least be what our collectors export (NVML through a fake pynvml; the gateway's bank)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from service.adapters.manager import AdapterMetrics
    from service.gateway.gpu_metrics import NvmlCollector
    from tests.test_gpu_metrics import TWO_GPUS, fake_nvml

    registry = CollectorRegistry()
    AdapterMetrics(registry).misses.labels("store").inc()
    registry.register(NvmlCollector(fake_nvml(TWO_GPUS)))
    exposed = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", generate_latest(registry).decode(), re.M))
    used = set().union(*all_metric_names().values())
    ours = {n for n in (GPU_ONLY | INPROCESS_ONLY) & used if n.startswith("steerserve_")}
    assert ours and ours <= exposed, ours - exposed
    assert not {n for n in used if n.startswith("nv_gpu_")} - GPU_ONLY  # Triton's: listed, checked on a GPU only


# --- the dashboard ---------------------------------------------------------------------------------


def test_dashboard_is_a_well_formed_grafana_dashboard():
    dash = dashboard()
    assert dash["uid"] == "steerserve" and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["type"] == "timeseries" and p["title"] and p["description"], p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]


def test_dashboard_expressions_parse_and_read_recorded_series(tmp_path):
    """Every panel query is valid PromQL (checked by promtool as a recording rule) and every
    steerserve:* series it reads is one the rules record; every recording rule is on the dashboard."""
    exprs = dashboard_exprs()
    (tmp_path / "dash.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                      for i, e in enumerate(exprs)]}]}))
    out = subprocess.run([required_tool("promtool"), "check", "rules", str(tmp_path / "dash.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    used = set(_RECORDED.findall(" ".join(exprs)))
    assert used <= recorded(), used - recorded()
    assert recorded() <= used, recorded() - used


def test_autoscaler_queries_are_valid_and_read_recorded_or_raw_series(tmp_path):
    """Whatever prometheus-adapter rules and KEDA triggers deploy/ ships (none is fine) are valid
    PromQL (promtool, adapter templates filled in) and read only steerserve:* series the rules
    record; their raw names are cross-checked live in tests/test_triton.py."""
    exprs = adapter_exprs() + keda_exprs()
    used = set(_RECORDED.findall(" ".join(exprs)))
    assert used <= recorded(), used - recorded()
    queries = autoscaling_promql()
    if not queries:
        pytest.skip("no autoscaler queries under deploy/")
    (tmp_path / "autoscaling.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "autoscaling", "rules": [{"record": f"autoscaling:q{i}", "expr": q}
                                                        for i, q in enumerate(queries)]}]}))
    out = subprocess.run([required_tool("promtool"), "check", "rules", str(tmp_path / "autoscaling.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the manifests ---------------------------------------------------------------------------------


def _kustomize(path: Path) -> list[dict]:
    out = subprocess.run([required_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomization_builds_rules_monitors_and_dashboard_configmap():
    docs = _kustomize(OBSERVABILITY)
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    assert sorted(by_kind) == ["ConfigMap", "PrometheusRule", "ServiceMonitor"]
    assert all(d["apiVersion"] == "monitoring.coreos.com/v1" for d in by_kind["PrometheusRule"] + by_kind["ServiceMonitor"])
    assert by_kind["PrometheusRule"][0]["spec"] == spec()
    monitors = {d["metadata"]["name"]: d for d in by_kind["ServiceMonitor"]}
    assert set(monitors) == {"steerserve-gateway", "steerserve-triton"}
    for component in ("gateway", "triton"):
        m = monitors[f"steerserve-{component}"]
        assert m["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "steerserve",
                                                        "app.kubernetes.io/component": component}
        assert [e["port"] for e in m["spec"]["endpoints"]] == ["metrics"]
    (cm,) = by_kind["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["steerserve.json"]) == dashboard()


@pytest.mark.parametrize("overlay", sorted(p.parent.name for p in (ROOT / "deploy" / "overlays").glob("*/kustomization.yaml")))
def test_service_monitors_select_the_overlays_services(overlay):
    """Where an overlay includes this directory (the deployment work does), each ServiceMonitor
    selects exactly the Service of its name, which has a port named `metrics` on the right number."""
    docs = _kustomize(ROOT / "deploy" / "overlays" / overlay)
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    if not monitors:
        pytest.skip(f"deploy/overlays/{overlay} does not include ../../observability yet")
    services = [d for d in docs if d["kind"] == "Service"]
    ports = {"steerserve-gateway": 9464, "steerserve-triton": 8002}
    for m in monitors:
        selector = m["spec"]["selector"]["matchLabels"]
        chosen = [s for s in services if selector.items() <= s["metadata"].get("labels", {}).items()]
        # the overlay may prefix/suffix names (namePrefix), the ServiceMonitor's along with the Service's
        assert [s["metadata"]["name"] for s in chosen] == [m["metadata"]["name"]], (m["metadata"]["name"], chosen)
        base_name = next(n for n in ports if n in m["metadata"]["name"])
        named = {p.get("name"): p["port"] for p in chosen[0]["spec"]["ports"]}
        assert named.get("metrics") == ports[base_name], named
