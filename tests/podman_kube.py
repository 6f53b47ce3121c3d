"""The CPU overlay's manifests, run with `podman kube play` (tests/test_containers.py).

The manifests are rendered by kustomize exactly as `kubectl apply -k deploy/overlays/cpu` would
send them, with one image replaced (the registry's PostgreSQL cannot be pulled here: the stand-in
tests/containers/postgres-standin.Dockerfile builds). Then each object goes to podman as it is,
or, where podman 4.3 cannot run its kind, is converted or left out, each for a reason listed in
NOT_RUN / CONVERTED below: the pod templates (images, commands, environment, security contexts,
volumes, probes) are the shipped ones, unchanged apart from the host ports added to reach them.

podman does not evaluate readiness or startup probes (it runs a liveness probe as a healthcheck
only); `probe()` evaluates a container's probe as the kubelet does (exec, httpGet, grpc), so the
test waits on the manifests' own probes.

By hand (what the test does; the images from scripts/build-images.sh --postgres-standin):
    python -m tests.podman_kube up      # prints the published ports
    python -m tests.podman_kube down
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OVERLAY = REPO / "deploy" / "overlays" / "cpu"
NETWORK = "steerserve-kube"
# The registry image podman cannot pull here -> the local stand-in (same contract as the overlay uses).
IMAGE_STANDINS = {"postgres": ("localhost/steerserve-test-postgres", "15")}

# Kinds podman kube play (4.3) does not run, and why leaving them out does not change what is tested.
NOT_RUN = {
    "Namespace": "podman has no namespaces: every pod runs in one podman network of its own",
    "Service": "no Service routing: each workload's pod is named after the Service that selects it, and "
               "the network's DNS answers that name with the pod's IP, as a headless Service answers "
               "with its ready pods' (no ClusterIP balancing; the client is given the gateway's host port)",
    "HorizontalPodAutoscaler": "no metrics server or controller: the gateway runs at the overlay's minimum, one",
    "PodDisruptionBudget": "nothing evicts pods here; a replacement is done by the test itself",
    "PrometheusRule": "a Prometheus Operator resource: tests/test_observability_rules.py evaluates the rules with promtool",
    "ServiceMonitor": "a Prometheus Operator resource: the test reads /metrics on the published port instead",
}
CONVERTED = {
    "Deployment": "one Pod of its template (replicas are the HPA's or the overlay's; the test replaces "
                  "pods itself), named after its Service",
    "StatefulSet": "one Pod of its template, named after its Service, with its volumeClaimTemplates as "
                   "PersistentVolumeClaims named <template>-<set>-0, as the controller names them",
    "Secret": "a podman secret holding the Secret's data (podman 4.3's kube play cannot read a Secret "
              "object for secretKeyRef; it reads podman secrets whose JSON maps each key to base64)",
    "emptyDir": "a hostPath to a fresh 0777 folder the test makes for each pod start (under /dev/shm, a "
                "tmpfs, for medium: Memory): podman 4.3 makes emptyDirs root-owned 0755, where Kubernetes "
                "makes them 0777, so the manifests' non-root users could write none of them; sizeLimit "
                "is not enforced",
    "ConfigMap (unused)": "the Grafana dashboard ConfigMap is mounted by Grafana's sidecar, not by a pod "
                          "here: left out (podman would refuse nothing, it is simply not needed)",
}


@dataclass
class Plan:
    """What goes to podman: the kube play documents per pod (each played on its own so one pod can
    be replaced), the shared documents (ConfigMaps, PVCs), the podman secrets, what was left out."""
    shared: list[dict] = field(default_factory=list)
    pods: dict[str, dict] = field(default_factory=dict)        # pod name -> Pod
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> key -> base64 value
    volumes: list[str] = field(default_factory=list)
    not_run: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, why)
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    empty_dirs: dict[str, list[Path]] = field(default_factory=dict)  # pod name -> its emptyDir stand-ins


def render(overlay: Path = OVERLAY) -> list[dict]:
    """`kubectl kustomize` of the overlay, with the stand-in images, as objects."""
    with tempfile.TemporaryDirectory() as tmp:
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(overlay, tmp)],  # kustomize refuses an absolute base
            "images": [{"name": name, "newName": new, "newTag": tag} for name, (new, tag) in IMAGE_STANDINS.items()],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        proc = subprocess.run(["kubectl", "kustomize", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl kustomize {overlay} failed:\n{proc.stderr}")
        out = proc.stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _service_names(docs: list[dict]) -> dict[str, str]:
    """Workload name -> the name of the Service whose selector matches its pod labels."""
    services = [d for d in docs if d["kind"] == "Service"]
    names = {}
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        matching = [s["metadata"]["name"] for s in services
                    if all(labels.get(k) == v for k, v in s["spec"].get("selector", {}).items())]
        if len(matching) != 1:
            raise ValueError(f"{d['kind']} {d['metadata']['name']}: {len(matching)} Services select it, podman can name its pod after one")
        names[d["metadata"]["name"]] = matching[0]
    return names


def plan(docs: list[dict], host_ports: dict[tuple[str, str], int], scratch: Path) -> Plan:
    """host_ports: (pod name, container port name) -> host port to publish it on (127.0.0.1);
    scratch: a folder of the test's own, where the emptyDir stand-ins go."""
    out = Plan()
    pod_names = _service_names(docs)
    used_configmaps = set()
    for d in docs:
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []) if d["kind"] in ("Deployment", "StatefulSet") else []:
            used_configmaps |= {e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e}
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in NOT_RUN:
            out.not_run.append((kind, name, NOT_RUN[kind]))
        elif kind == "ConfigMap":
            if name in used_configmaps:
                out.shared.append(d)
                out.configmaps[name] = dict(d.get("data", {}))
            else:
                out.not_run.append((kind, name, CONVERTED["ConfigMap (unused)"]))
        elif kind == "Secret":
            data = dict(d.get("data", {}))
            data.update({k: base64.b64encode(v.encode()).decode() for k, v in d.get("stringData", {}).items()})
            out.secrets[name] = data
        elif kind == "PersistentVolumeClaim":
            out.shared.append(d)
            out.volumes.append(name)
        elif kind in ("Deployment", "StatefulSet"):
            pod_name = pod_names[name]
            template = copy.deepcopy(d["spec"]["template"])
            spec = template["spec"]
            for claim in d["spec"].get("volumeClaimTemplates", []):
                claim_name = f"{claim['metadata']['name']}-{name}-0"
                out.shared.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                   "metadata": {"name": claim_name}, "spec": claim["spec"]})
                out.volumes.append(claim_name)
                spec.setdefault("volumes", []).append(
                    {"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim_name}})
            out.empty_dirs[pod_name] = []
            for volume in spec.get("volumes", []):
                if "emptyDir" in volume:
                    memory = volume["emptyDir"].get("medium") == "Memory"
                    path = (Path("/dev/shm") / scratch.name if memory else scratch) / pod_name / volume["name"]
                    out.empty_dirs[pod_name].append(path)
                    del volume["emptyDir"]
                    volume["hostPath"] = {"path": str(path), "type": "Directory"}
            for c in spec["containers"]:
                for p in c.get("ports", []):
                    if (pod_name, p.get("name")) in host_ports:
                        p["hostPort"] = host_ports[pod_name, p["name"]]
                        p["hostIP"] = "127.0.0.1"
            out.pods[pod_name] = {"apiVersion": "v1", "kind": "Pod",
                                  "metadata": {"name": pod_name, "labels": template["metadata"].get("labels", {})},
                                  "spec": spec}
        else:
            raise ValueError(f"{kind} {name}: the overlay holds a kind this conversion does not know; decide what podman does with it")
    return out


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def play(doc_list: list[dict]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(doc_list, f)
        f.flush()
        podman("kube", "play", "--network", NETWORK, f.name)


def up(p: Plan) -> None:
    """Everything in the plan, after removing what an earlier run left (same names)."""
    down(p)
    podman("network", "create", NETWORK)
    for name, data in p.secrets.items():
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(data, f)
            f.flush()
            podman("secret", "create", name, f.name)
    play(p.shared)  # ConfigMaps are only read at play time; PVCs become named volumes
    for name in p.pods:
        start_pod(p, name)


def start_pod(p: Plan, name: str) -> None:
    """The pod from its template, with fresh empty folders for its emptyDirs (a new pod's are empty)."""
    for path in p.empty_dirs[name]:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        path.chmod(0o777)
    play([cm for cm in p.shared if cm["kind"] == "ConfigMap"] + [p.pods[name]])


def replace_pod(p: Plan, name: str, stop_timeout_s: int) -> None:
    """What a Deployment does when its pod goes (an eviction, a node drain, a rollout on one
    replica): SIGTERM, up to the grace period, then the pod again from the same template. The
    manifests' preStop pause is not made: it waits for the pod's removal from Service endpoints to
    spread, and there are no Services here."""
    # The containers first, the pod (its infra container, which holds the network) after: as on a
    # kubelet, the pod's network stays up while its containers drain. (`podman pod stop` takes the
    # network down with them: a reply still being drained then never reaches its client, which
    # waits, unanswered, until its deadline.)
    for c in p.pods[name]["spec"]["containers"]:
        podman("stop", "--time", str(stop_timeout_s), container(name, c["name"]), timeout=stop_timeout_s + 60)
    podman("pod", "rm", "--force", name)
    start_pod(p, name)


def down(p: Plan) -> None:
    for name in p.pods:
        podman("pod", "rm", "--force", "--time", "5", name, check=False)
    for name in p.volumes:
        podman("volume", "rm", "--force", name, check=False)
    for name in p.secrets:
        podman("secret", "rm", name, check=False)
    podman("network", "rm", "--force", NETWORK, check=False)
    for paths in p.empty_dirs.values():
        for path in paths:
            shutil.rmtree(path.parent, ignore_errors=True)


def container(pod: str, spec_name: str) -> str:
    """kube play names a pod's container <pod>-<container>."""
    return f"{pod}-{spec_name}"


def probe(p: Plan, pod: str, kind: str = "readinessProbe", container_index: int = 0) -> bool:
    """One evaluation of a container's probe, as the kubelet makes it: exec inside the container,
    httpGet and grpc (grpc.health.v1, the probe's service) against the pod's port, here reached on
    its published host port (so a probe's port must be one the test published)."""
    c = p.pods[pod]["spec"]["containers"][container_index]
    spec = c.get(kind)
    if spec is None:
        raise ValueError(f"{pod}: no {kind}")
    ports = {port.get("name"): port for port in c.get("ports", [])}

    def host_port(port) -> int:
        entry = ports.get(port) if isinstance(port, str) else next((q for q in ports.values() if q["containerPort"] == port), None)
        if entry is None or "hostPort" not in entry:
            raise ValueError(f"{pod}: the probe's port {port} is not published")
        return entry["hostPort"]

    timeout = spec.get("timeoutSeconds", 1)
    if "exec" in spec:
        return podman("exec", container(pod, c["name"]), *spec["exec"]["command"], check=False, timeout=timeout + 30).returncode == 0
    if "httpGet" in spec:
        url = f"http://127.0.0.1:{host_port(spec['httpGet']['port'])}{spec['httpGet'].get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return 200 <= resp.status < 400
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
    if "grpc" in spec:
        return grpc_serving(host_port(spec["grpc"]["port"]), spec["grpc"].get("service", ""), timeout)
    raise ValueError(f"{pod}: a {kind} of a kind this helper does not evaluate: {sorted(spec)}")


def grpc_serving(port: int, service: str = "", timeout: float = 1) -> bool:
    """A grpc.health.v1 Check on 127.0.0.1:port answers SERVING (a kubelet's grpc probe)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def wait_ready(p: Plan, pod: str, timeout_s: float) -> float:
    """Polls the pod's startupProbe (if any) then its readinessProbe at their periods, until both
    pass; returns the seconds it took. Raises with the pod's log tail if the pod exits or time runs out."""
    c = p.pods[pod]["spec"]["containers"][0]
    started = time.monotonic()
    for kind in ("startupProbe", "readinessProbe"):
        if kind not in c:
            continue
        period = c[kind].get("periodSeconds", 10)
        while not probe(p, pod, kind):
            state = podman("inspect", "--format", "{{.State.Status}}", container(pod, c["name"]), check=False).stdout.strip()
            if state not in ("running", "created", "configured", "initialized"):
                raise RuntimeError(f"{pod}: container {state}:\n{logs(pod, c['name'])}")
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{pod}: {kind} not passing after {timeout_s:.0f} s:\n{logs(pod, c['name'])}")
            time.sleep(min(period, 2))  # probe more often than the kubelet: only the test's wait is shorter
    return time.monotonic() - started


def logs(pod: str, spec_name: str, tail: int = 60) -> str:
    proc = podman("logs", "--tail", str(tail), container(pod, spec_name), check=False)
    return proc.stdout + proc.stderr


def main(argv: list[str]) -> int:
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ports = {("steerserve-gateway", "grpc"): free_port(), ("steerserve-gateway", "metrics"): free_port(),
             ("steerserve-triton", "http"): free_port()}
    p = plan(render(), ports, Path(tempfile.gettempdir()) / "steerserve-kube")
    if argv[:1] == ["down"]:
        down(p)
        return 0
    up(p)
    for kind, name, why in p.not_run:
        print(f"not run: {kind} {name}: {why}")
    for pod in ("steerserve-postgres", "steerserve-triton", "steerserve-gateway"):
        print(f"{pod} ready in {wait_ready(p, pod, 900):.0f} s")
    print("gateway: 127.0.0.1:%d (gRPC), http://127.0.0.1:%d/metrics" % (ports["steerserve-gateway", "grpc"], ports["steerserve-gateway", "metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
