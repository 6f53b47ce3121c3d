"""deploy/: every kustomize overlay builds, validates offline, and says what an operator relies on.

No cluster and no Docker daemon: `kubectl kustomize` builds each overlay, `kubernetes_validate` checks
every built object against the Kubernetes OpenAPI schemas (strict: unknown fields are errors) of the
oldest and newest versions we support, and custom resources it has no schema for get a small
structural check of their own (CRD_CHECKS). Then the properties that matter when it runs: GPUs only
where meant, probes and resources everywhere, non-root, every reference resolvable, autoscalers
pointing at real Deployments and at metrics the adapter really exposes, queries that parse, and a
light lint of the Dockerfiles. Takes a second or two.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import required_tool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "gpu-keda")
GPU_OVERLAYS = ("gpu", "gpu-keda")
# Oldest Kubernetes the manifests target (native gRPC probes, preStop `sleep`, autoscaling/v2) and
# the newest schema kubernetes-validate ships: an object must be valid on both.
K8S_VERSIONS = ("1.30.0", "1.37.0")
WORKLOADS = ("Deployment", "StatefulSet", "Job")
ADAPTER_VALUES = DEPLOY / "autoscaling" / "prometheus-adapter" / "values.yaml"
RULES_FILE = DEPLOY / "observability" / "prometheus-rules.yaml"
RATIO_RULE = "steerserve:triton_queue_compute:ratio_rate1m"


# -- building ------------------------------------------------------------------------------------


def kustomize(path: Path) -> list[dict]:
    kubectl = required_tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict]]:
    return {name: kustomize(DEPLOY / "overlays" / name) for name in OVERLAYS}


def objects(build, kind, name=None):
    return [o for o in build if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(build, kind, name):
    found = objects(build, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(obj):
    return obj["spec"]["template"]["spec"]


def containers(obj, init=True):
    spec = pod_spec(obj)
    return list(spec.get("containers", [])) + (list(spec.get("initContainers", [])) if init else [])


def container(obj, name):
    return next(c for c in containers(obj) if c["name"] == name)


def workloads(build):
    return [o for o in build if o["kind"] in WORKLOADS]


def config_data(build) -> dict[str, str]:
    (cm,) = [o for o in objects(build, "ConfigMap") if o["metadata"]["name"].startswith("steerserve-config")]
    return cm["data"]


def env_value(build, obj, container_name, var):
    """A variable's value as the container sees it: its env list, else its ConfigMaps (envFrom)."""
    c = container(obj, container_name)
    for e in c.get("env", []):
        if e["name"] == var:
            return e.get("value", e.get("valueFrom"))
    for src in c.get("envFrom", []):
        cm = one(build, "ConfigMap", src["configMapRef"]["name"])
        if var in cm["data"]:
            return cm["data"][var]
    return None


def test_every_overlay_builds(builds):
    for name, build in builds.items():
        kinds = {o["kind"] for o in build}
        assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds, name
        for o in build:
            if o["kind"] != "Namespace":
                assert o["metadata"].get("namespace") == "steerserve", f"{name}: {o['kind']} {o['metadata']['name']}"


# -- schemas -------------------------------------------------------------------------------------


def _check_prometheus_rule(obj, build):
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    groups = obj["spec"]["groups"]
    assert groups
    for g in groups:
        assert g["name"] and g["rules"]
        for r in g["rules"]:
            assert ("record" in r) != ("alert" in r) and isinstance(r["expr"], str) and r["expr"].strip()


def _check_service_monitor(obj, build):
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    selector = obj["spec"]["selector"]["matchLabels"]
    services = [s for s in objects(build, "Service")
                if selector.items() <= s["metadata"].get("labels", {}).items()]
    assert services, f"ServiceMonitor {obj['metadata']['name']} selects no Service in the build"
    for ep in obj["spec"]["endpoints"]:
        for svc in services:
            assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}, (obj["metadata"]["name"], svc["metadata"]["name"])


def _check_pod_monitor(obj, build):
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["spec"]["selector"] and obj["spec"]["podMetricsEndpoints"]


def _check_scaled_object(obj, build):
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    spec = obj["spec"]
    target = spec["scaleTargetRef"]
    one(build, target.get("kind", "Deployment"), target["name"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert "stabilizationWindowSeconds" in behavior["scaleUp"] and "stabilizationWindowSeconds" in behavior["scaleDown"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        assert trigger.get("metricType", "AverageValue") in ("Value", "AverageValue", "Utilization")
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http") and meta["query"].strip()
        float(meta["threshold"])


# Custom resources kubernetes-validate has no schema for, and the check each gets instead.
CRD_CHECKS = {
    "PrometheusRule": _check_prometheus_rule,
    "ServiceMonitor": _check_service_monitor,
    "PodMonitor": _check_pod_monitor,
    "ScaledObject": _check_scaled_object,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_offline(builds, overlay):
    import kubernetes_validate as kv

    build = builds[overlay]
    errors = []
    for obj in build:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in CRD_CHECKS:
            CRD_CHECKS[obj["kind"]](obj, build)
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.SchemaNotFoundError:
                errors.append(f"{where}: no schema in Kubernetes {version} and no CRD_CHECKS entry")
            except kv.ValidationError as e:
                errors.append(f"{where} (Kubernetes {version}): {e.message} at {'/'.join(map(str, e.path))}")
    assert not errors, "\n".join(errors)


# -- GPU where meant, and only there -------------------------------------------------------------


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_puts_triton_and_engine_build_on_gpus(builds, overlay):
    build = builds[overlay]
    for obj in (one(build, "Deployment", "steerserve-triton"), one(build, "Job", "steerserve-build-unet-plan")):
        spec = pod_spec(obj)
        main = spec["containers"][0]
        assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert main["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    triton = one(build, "Deployment", "steerserve-triton")
    args = container(triton, "triton")["args"]
    assert "--model-config-name=gpu" in args
    # The engine Job writes the repository Triton serves as its second one and its init container waits for.
    assert "--model-repository=/models/engines/repo" in args
    assert "/models/engines/repo/unet_engine/1/model.plan" in " ".join(container(triton, "wait-for-unet-plan")["command"])
    job = one(build, "Job", "steerserve-build-unet-plan")
    assert "build_unet_plan.sh" in " ".join(container(job, "build")["command"])
    assert config_data(build)["STEERSERVE_UNET_RUNTIME"] == "triton_engine"
    # Nothing but Triton and the engine build asks for a GPU.
    for obj in workloads(build):
        if obj["metadata"]["name"] not in ("steerserve-triton", "steerserve-build-unet-plan"):
            assert "nvidia.com/gpu" not in str(pod_spec(obj)), obj["metadata"]["name"]


def test_cpu_overlay_has_no_gpu(builds):
    build = builds["cpu"]
    text = yaml.safe_dump_all(build)
    assert "nvidia.com/gpu" not in text and "--model-config-name=gpu" not in text
    for obj in workloads(build):
        spec = pod_spec(obj)
        assert not spec.get("nodeSelector") and not spec.get("tolerations"), obj["metadata"]["name"]
    assert not objects(build, "Job")
    assert config_data(build)["STEERSERVE_UNET_RUNTIME"] == "auto"  # measured once per hardware, shared (docs/startup.md)


# -- every container sized, probed, non-root -----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_have_resources_and_probes(builds, overlay):
    for obj in workloads(builds[overlay]):
        for c in containers(obj):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), (obj["metadata"]["name"], c["name"], kind)
        if obj["kind"] == "Job":
            continue  # runs to completion: nothing to probe
        for c in containers(obj, init=False):
            assert "readinessProbe" in c and "livenessProbe" in c, (obj["metadata"]["name"], c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_health_apis(builds, overlay):
    build = builds[overlay]
    gateway = container(one(build, "Deployment", "steerserve-gateway"), "gateway")
    # Native gRPC probes on grpc.health.v1: readiness asks the overall status (follows Triton),
    # liveness a service that stays SERVING while the process runs (a Triton outage restarts nothing).
    assert gateway["readinessProbe"]["grpc"] == {"port": 50051}
    assert gateway["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    assert gateway["startupProbe"]["grpc"]["port"] == 50051
    triton = container(one(build, "Deployment", "steerserve-triton"), "triton")
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load takes minutes"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_with_no_capabilities(builds, overlay):
    for obj in workloads(builds[overlay]):
        pod = pod_spec(obj)["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, obj["metadata"]["name"]
        for c in containers(obj):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert sc.get("runAsUser", pod["runAsUser"]) > 0
    gateway = one(builds[overlay], "Deployment", "steerserve-gateway")
    assert container(gateway, "gateway")["securityContext"]["readOnlyRootFilesystem"] is True


# -- references resolve --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_secret_configmap_and_claim_exists(builds, overlay):
    build = builds[overlay]
    secrets = {o["metadata"]["name"]: o.get("data", {}) for o in objects(build, "Secret")}
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects(build, "ConfigMap")}
    claims = {o["metadata"]["name"] for o in objects(build, "PersistentVolumeClaim")}
    used_claims = set()
    for obj in workloads(build):
        spec = pod_spec(obj)
        template_claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (obj["metadata"]["name"], v)
                used_claims.add(v["persistentVolumeClaim"]["claimName"])
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
        for c in containers(obj):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in template_claims, (obj["metadata"]["name"], c["name"], m)
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["key"] in secrets.get(ref["secretKeyRef"]["name"], {}), (c["name"], e)
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in configmaps.get(ref["configMapKeyRef"]["name"], {}), (c["name"], e)
    assert claims == used_claims, f"claims nothing mounts: {claims - used_claims}"


# -- the gateway / Triton split ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_talks_to_every_triton_replica_through_the_headless_service(builds, overlay):
    build = builds[overlay]
    gateway = one(build, "Deployment", "steerserve-gateway")
    assert [c["name"] for c in containers(gateway)] == ["gateway"], "no Triton sidecar in the gateway pod"
    assert env_value(build, gateway, "gateway", "STEERSERVE_BACKEND") == "triton"
    host, port = env_value(build, gateway, "gateway", "STEERSERVE_TRITON_URL").split(":")
    for var, key in (("STEERSERVE_DATABASE_URL", "database-url"), ("STEERSERVE_API_KEYS", "api-keys")):
        ref = env_value(build, gateway, "gateway", var)["secretKeyRef"]
        assert ref["name"].startswith("steerserve-secrets") and ref["key"] == key

    triton_svc = one(build, "Service", host)
    assert triton_svc["spec"]["clusterIP"] == "None", "one A record per replica needs a headless Service"
    ports = {p["name"]: p["port"] for p in triton_svc["spec"]["ports"]}
    assert ports == {"grpc": 8001, "http": 8000, "metrics": 8002} and int(port) == ports["grpc"]
    triton = one(build, "Deployment", "steerserve-triton")
    labels = triton["spec"]["template"]["metadata"]["labels"]
    assert triton_svc["spec"]["selector"].items() <= labels.items()
    assert {p["name"] for p in container(triton, "triton")["ports"]} == set(ports)

    gw_svc = one(build, "Service", "steerserve-gateway")
    assert {p["name"]: p["port"] for p in gw_svc["spec"]["ports"]} == {"grpc": 50051, "metrics": 9464}
    assert gw_svc["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    for name in ("steerserve-gateway", "steerserve-triton"):
        pdb = one(build, "PodDisruptionBudget", name)
        target = one(build, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= target.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_shared_as_documented(builds, overlay):
    build = builds[overlay]
    gateway, triton = (one(build, "Deployment", n) for n in ("steerserve-gateway", "steerserve-triton"))
    data = {c: next(m for m in container(d, c)["volumeMounts"] if m["name"] == "data")
            for d, c in ((gateway, "gateway"), (triton, "triton"))}
    assert data["gateway"]["mountPath"] == data["triton"]["mountPath"] == "/data"
    assert not data["gateway"].get("readOnly") and data["triton"]["readOnly"] is True
    cfg = config_data(build)
    assert cfg["STEERSERVE_DATA_DIR"] == "/data" and cfg["STEERSERVE_ADAPTER_DIR"] == "/data/adapters"
    if overlay in GPU_OVERLAYS:
        assert one(build, "PersistentVolumeClaim", "steerserve-data")["spec"]["accessModes"] == ["ReadWriteMany"]
        for d, c in ((gateway, "gateway"), (triton, "triton")):
            models = next(m for m in container(d, c)["volumeMounts"] if m["name"] == "models")
            assert models["readOnly"] is True and cfg["STEERSERVE_MODEL_DIR"].startswith(models["mountPath"] + "/")
        assert cfg["STEERSERVE_COMPILED_DIR"].startswith("/models/engines/")
    else:
        # The demo serves the model shipped in the gateway image's package (Python 3.11 venv).
        path = cfg["STEERSERVE_MODEL_DIR"]
        prefix = "/opt/steerserve/venv/lib/python3.11/site-packages/"
        assert path.startswith(prefix) and (ROOT / path[len(prefix):] / "model_index.json").is_file()


def test_settings_names_are_ones_the_code_reads(builds):
    """A misspelt STEERSERVE_* name in the ConfigMap would be silently ignored: every one is a
    Settings field (the gateway's and the Triton model instances' settings are the same class)."""
    from service.config import Settings

    for build in builds.values():
        for key in config_data(build):
            assert key.startswith("STEERSERVE_"), key
            assert key.removeprefix("STEERSERVE_").lower() in Settings.model_fields, key


# -- secrets -------------------------------------------------------------------------------------


def _secret(build):
    import base64

    (secret,) = objects(build, "Secret")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_example_secrets_are_marked_and_grant_nothing(builds):
    for overlay in GPU_OVERLAYS:
        s = _secret(builds[overlay])
        # A well-formed digest nothing hashes to: the gateway starts, nobody authenticates.
        assert re.fullmatch(r"sha256:0{64}:replace-me", s["api-keys"])
        assert "REPLACE_ME" in s["database-url"] and s["database-url"].startswith("postgresql://")
    demo = _secret(builds["cpu"])
    assert "REPLACE-ME" in demo["api-keys"]
    # The demo database URL carries the password the demo PostgreSQL is initialised with.
    assert f":{demo['postgres-password']}@steerserve-postgres:5432/" in demo["database-url"]
    one(builds["cpu"], "StatefulSet", "steerserve-postgres")
    one(builds["cpu"], "Service", "steerserve-postgres")


# -- autoscaling ---------------------------------------------------------------------------------


def _adapter_rule():
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_target_existing_deployments_and_own_their_count(builds, overlay):
    build = builds[overlay]
    scaled = []
    for hpa in objects(build, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment"
        one(build, "Deployment", ref["name"])
        behavior = hpa["spec"]["behavior"]
        assert "stabilizationWindowSeconds" in behavior["scaleUp"] and "stabilizationWindowSeconds" in behavior["scaleDown"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]
        scaled.append(ref["name"])
    scaled += [so["spec"]["scaleTargetRef"]["name"] for so in objects(build, "ScaledObject")]
    assert len(scaled) == len(set(scaled)), f"two autoscalers on one Deployment: {scaled}"
    for name in scaled:  # `kubectl apply` must not reset what the autoscaler chose
        assert "replicas" not in one(build, "Deployment", name)["spec"], name
    assert "steerserve-gateway" in scaled
    gw = one(build, "HorizontalPodAutoscaler", "steerserve-gateway")
    assert gw["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    if overlay == "gpu":
        assert "steerserve-triton" in scaled and not objects(build, "ScaledObject")
    elif overlay == "gpu-keda":
        assert one(build, "ScaledObject", "steerserve-triton")
        assert not objects(build, "HorizontalPodAutoscaler", "steerserve-triton")
    else:
        assert "steerserve-triton" not in scaled


def test_triton_hpa_metric_is_one_the_adapter_exposes(builds):
    rule = _adapter_rule()
    hpa = one(builds["gpu"], "HorizontalPodAutoscaler", "steerserve-triton")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"  # the adapter rule maps the pod label onto pods
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
    assert float(metric["pods"]["target"]["averageValue"].removesuffix("m")) / 1000 == 0.5


def _ratio_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(nv_inference_\w+|steerserve_triton_step_\w+)", expr))


def test_scaling_queries_parse_and_match_the_recording_rule(builds, tmp_path):
    """The adapter's and KEDA's queries are the recording rule's ratio (the same counters: the
    generate instances' own step counters and Triton's for the unet model's edit steps), and both
    parse under promtool."""
    rules = yaml.safe_load(RULES_FILE.read_text())["spec"]["groups"]
    recorded = [r["expr"] for g in rules for r in g["rules"] if r.get("record") == RATIO_RULE]
    want = set().union(*map(_ratio_metrics, recorded))
    assert want == {"nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                    "steerserve_triton_step_queue_us_total", "steerserve_triton_step_compute_us_total"}

    # The adapter's template, filled in as prometheus-adapter does for a request about pods.
    adapter = (_adapter_rule()["metricsQuery"]
               .replace("<<.GroupBy>>", "namespace, pod")
               .replace("<<.LabelMatchers>>", 'namespace="steerserve",pod=~"steerserve-triton-.*"'))
    (scaled,) = objects(builds["gpu-keda"], "ScaledObject")
    keda = scaled["spec"]["triggers"][0]
    assert keda["metricType"] == "Value", "a ratio must not be divided by the replica count"
    for expr in (adapter, keda["metadata"]["query"]):
        assert _ratio_metrics(expr) == want and expr.count('model="unet"') == 2, expr
    assert float(keda["metadata"]["threshold"]) == 0.5  # same target as the HPA

    promtool = required_tool("promtool")
    path = tmp_path / "scaling-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "scaling", "rules": [
        {"record": "check:adapter_query", "expr": adapter},
        {"record": "check:keda_query", "expr": keda["metadata"]["query"]},
    ]}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


# -- images --------------------------------------------------------------------------------------


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped; a FROM's
    ${ARG} is the ARG's default (what a build without --build-arg uses)."""
    text = (DEPLOY / "images" / name).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    steps = [(m.group(1).upper(), m.group(2).strip())
             for m in (re.match(r"\s*(\w+)\s+(.*)", ln) for ln in joined.splitlines()) if m]
    defaults = dict(args.split("=", 1) for op, args in steps if op == "ARG" and "=" in args)
    return [(op, re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], args) if op == "FROM" else args)
            for op, args in steps]


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


@pytest.mark.parametrize("name", ["gateway.Dockerfile", "triton.Dockerfile"])
def test_dockerfiles_pin_bases_and_run_non_root(name):
    steps = dockerfile(name)
    stages = set()
    for op, args in steps:
        if op == "FROM":
            image, *alias = args.split()
            assert image in stages or _pinned(image), f"{name}: base image {image} is not pinned"
            if alias:
                stages.add(alias[-1])
    users = [args for op, args in steps if op == "USER"]
    assert users, f"{name} has no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{name}: last USER {uid!r} must be a numeric non-root uid"
    runs = [args for op, args in steps if op == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    package = next(i for i, r in enumerate(runs) if "-c requirements.lock" in r)
    assert torch < package, "torch must be installed first (else the CUDA build is pulled)"
    copies = " ".join(args for op, args in steps if op in ("COPY", "ADD"))
    assert "weights" not in copies and ".safetensors" not in copies, "weights come from the volume"
    assert "latest" not in " ".join(args for op, args in steps if op == "FROM")


def test_gateway_image():
    steps = dockerfile("gateway.Dockerfile")
    froms = [args.split()[0] for op, args in steps if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay in the build stage"
    assert all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", f) for f in froms)
    # torch from the CPU index unless a build names another (scripts/build-images.sh: pip's own config).
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in steps
    assert any("TORCH_INDEX_URL" in args and "torch==2.13.0" in args for op, args in steps if op == "RUN")
    (entry,) = [json.loads(args) for op, args in steps if op == "ENTRYPOINT"]
    assert entry == ["steerserve", "serve", "--backend", "triton"]  # the Deployment adds only --host
    exposed = {p for op, args in steps if op == "EXPOSE" for p in args.split()}
    assert {"50051", "9464"} <= exposed


def test_triton_image_python_fits_the_package():
    steps = dockerfile("triton.Dockerfile")
    (base,) = [args.split()[0] for op, args in steps if op == "FROM"]
    m = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", base)
    assert m, base
    # Ubuntu 24.04-based releases (24.12 documented: Python 3.12); earlier ones ship Python 3.10.
    assert (int(m.group(1)), int(m.group(2))) >= (24, 12)
    env = " ".join(args for op, args in steps if op == "ENV")
    py = re.search(r"PYTHONPATH=/opt/steerserve/venv/lib/python3\.(\d+)/site-packages", env)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert py and requires == ">=3.11,<3.13" and 11 <= int(py.group(1)) < 13
    copies = [args for op, args in steps if op == "COPY"]
    assert any(c.startswith("model_repo/") for c in copies)
    assert any("deploy/tensorrt/build_unet_plan.sh" in c for c in copies)


def test_manifests_use_the_images_built_here(builds):
    known = {"steerserve-gateway", "steerserve-triton", "postgres"}
    for build in builds.values():
        for obj in workloads(build):
            for c in containers(obj):
                image = c["image"]
                assert _pinned(image), image
                assert image.rsplit(":", 1)[0].rsplit("/", 1)[-1] in known, image
    for overlay in GPU_OVERLAYS:
        triton = one(builds[overlay], "Deployment", "steerserve-triton")
        assert container(triton, "triton")["image"].startswith("steerserve-triton:")
    cpu_triton = one(builds["cpu"], "Deployment", "steerserve-triton")
    assert container(cpu_triton, "triton")["image"].startswith("steerserve-gateway:")
    # .dockerignore keeps local state out of the build context but lets the images' inputs in.
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignore and "var" in ignore and ".git" in ignore
    assert not {"service", "model_repo", "pyproject.toml", "requirements.lock", "README.md"} & set(ignore)
    assert "!deploy/tensorrt/build_unet_plan.sh" in ignore


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_pods_share_the_compiled_folder(builds, overlay):
    """The UNet runtime choice and its artefacts live on one volume every Triton pod mounts at
    STEERSERVE_COMPILED_DIR's default place: a pod that autoscaling adds reads them instead of
    measuring again (an emptyDir would make each new pod measure)."""
    build = builds[overlay]
    triton = one(build, "Deployment", "steerserve-triton")
    volumes = {v["name"]: v for v in pod_spec(triton)["volumes"]}
    assert volumes["compiled"]["persistentVolumeClaim"]["claimName"] == "steerserve-compiled"
    mounts = {m["name"]: m for c in containers(triton) for m in c.get("volumeMounts", [])}
    assert mounts["compiled"]["mountPath"] == "/var/cache/steerserve/compiled" and not mounts["compiled"].get("readOnly")
    claim = one(build, "PersistentVolumeClaim", "steerserve-compiled")
    assert claim["spec"]["accessModes"] == (["ReadWriteOnce"] if overlay == "cpu" else ["ReadWriteMany"])
