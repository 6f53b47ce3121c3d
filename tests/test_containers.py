"""The images built and run for real, and the CPU overlay run as pods (podman; no registry, no cluster).

- `scripts/build-images.sh --postgres-standin` builds the gateway image (the CPU overlay's Triton
  runs from it too) on a Debian root filesystem it makes itself, and the test-only PostgreSQL
  stand-in; podman's layer cache makes a second build take seconds, and a changed input rebuilds
  from the first layer that reads it.
- The CPU overlay, rendered by kustomize as `kubectl apply -k` would send it, runs with
  `podman kube play` (tests/podman_kube.py: what podman 4.3 cannot run is listed there, each with
  why); the test waits on the manifests' own startup and readiness probes, evaluated as the kubelet
  does, and calls Generate, /metrics and a Personalize job through the Python client.
- The gateway image runs once more with `podman run`, as the manifests run it (uid 10001, read-only
  root filesystem, no capabilities, the overlay's ConfigMap and Secret as its environment): a second
  replica on the same PostgreSQL and data volume.
- The gateway pod is replaced (SIGTERM, the pod's grace period, the pod again from its template)
  while a client loops Generate and a job trains: every call returns (the client retries the
  UNAVAILABLE it sees meanwhile), the job finishes, and no job or adapter row is lost.
"""

from __future__ import annotations

import base64
import fcntl
import io
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests import podman_kube as kube

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GATEWAY, TRITON, POSTGRES = "steerserve-gateway", "steerserve-triton", "steerserve-postgres"
PROMPT = "a red dotted star on a blue striped background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def images():
    """name -> (bytes, build seconds), from the build script's own report."""
    proc = subprocess.run(["bash", "scripts/build-images.sh", "--postgres-standin"], cwd=REPO,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = {}
    for line in proc.stdout.splitlines():
        name, size, seconds = line.split()
        built[name] = (int(size), int(seconds))
    assert set(built) == {"localhost/steerserve-gateway:0.1.0", "localhost/steerserve-test-postgres:15"}, proc.stdout
    return built


@pytest.fixture(scope="module")
def cluster(images, tmp_path_factory):
    # One run at a time on a machine: the overlay's names (pods, volumes, secrets) are podman-global.
    lock = open(Path(tempfile.gettempdir()) / "steerserve-kube.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    ports = {(GATEWAY, "grpc"): free_port(), (GATEWAY, "metrics"): free_port(), (TRITON, "http"): free_port()}
    plan = kube.plan(kube.render(), ports, tmp_path_factory.mktemp("steerserve-kube"))
    try:
        kube.up(plan)
        ready_s = {pod: kube.wait_ready(plan, pod, 900) for pod in (POSTGRES, TRITON, GATEWAY)}
        yield plan, ports, ready_s
    finally:
        kube.down(plan)
        lock.close()


def client(port: int, **kwargs):
    from steerserve_client import Client

    # The overlay's demo credentials (deploy/overlays/cpu: a throwaway cluster's).
    return Client(f"127.0.0.1:{port}", token="demo-token-REPLACE-ME", tls=False, **kwargs)


def psql(query: str) -> str:
    return kube.podman("exec", kube.container(POSTGRES, "postgres"), "psql", "-U", "steerserve", "-d", "steerserve",
                       "-tAc", query).stdout.strip()


def photos(n: int = 3) -> list[bytes]:
    from service.research.world.heldout import CONCEPTS

    out = []
    for sample in CONCEPTS["yellow-crescent"].references(n, seed=0):
        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_the_overlay_runs_as_rendered_with_what_podman_cannot_run_listed(cluster):
    plan, _, ready_s = cluster
    assert set(plan.pods) == {GATEWAY, TRITON, POSTGRES}
    assert {kind for kind, _, _ in plan.not_run} <= set(kube.NOT_RUN) | {"ConfigMap"}
    # The pods run with the manifests' security contexts: podman applied them, nothing was relaxed.
    for pod, name, uid in ((GATEWAY, "gateway", "10001"), (TRITON, "triton", "10001"), (POSTGRES, "postgres", "999")):
        info = kube.podman("inspect", "--format", "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}",
                           kube.container(pod, name)).stdout.split(maxsplit=2)
        assert info[0].split(":")[0] == uid and info[1] == "true", (pod, info)
        assert kube.podman("exec", kube.container(pod, name), "sh", "-c", "touch /probe-write 2>&1 || true").stdout \
            .find("Read-only file system") >= 0, pod
    print(f"ready after kube play: {ready_s}")


def test_generate_metrics_and_a_personalize_job_through_the_overlay(cluster):
    plan, ports, _ = cluster
    with client(ports[GATEWAY, "grpc"]) as c:
        image = c.generate(PROMPT, steps=10, seed=1).images[0]
        assert Image.open(io.BytesIO(image.data)).size == (64, 64)
        job = c.personalize("custom-diffusion", "kube-crescent", photos(), class_word="circle", steps=20, seed=4)
        done = job.wait(timeout=600)
        assert done.state == "SUCCEEDED" and done.adapter_id
        with_adapter = c.generate(f"a {done.token} circle", adapters=[done.adapter_id], steps=10, seed=1).images[0]
        assert with_adapter.data != c.generate(f"a {done.token} circle", steps=10, seed=1).images[0].data
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports[GATEWAY, 'metrics']}/metrics", timeout=10).read().decode()
    assert "steerserve_triton_up 1.0" in metrics
    # The Triton server's own log reaches the container's stdout (what `kubectl logs` shows).
    assert "successfully loaded 'generate'" in kube.logs(TRITON, "triton", tail=100000)


def test_the_gateway_image_runs_with_podman_run_as_the_manifests_run_it(cluster):
    """`podman run` with the gateway container's settings from the rendered manifests: a second
    gateway replica beside the pod, on the same PostgreSQL and data volume."""
    plan, _, _ = cluster
    spec = plan.pods[GATEWAY]["spec"]
    c = spec["containers"][0]
    env = {}
    for source in c["envFrom"]:
        env.update(plan.configmaps[source["configMapRef"]["name"]])
    for item in c["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = base64.b64decode(plan.secrets[ref["name"]][ref["key"]]).decode()
    grpc_port, metrics_port = free_port(), free_port()
    name = "steerserve-test-gateway-run"
    kube.podman("rm", "--force", name, check=False)
    args = ["run", "--detach", "--name", name, "--network", kube.NETWORK,
            "--user", f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--volume", "steerserve-data:/data",
            "--publish", f"127.0.0.1:{grpc_port}:50051", "--publish", f"127.0.0.1:{metrics_port}:9464"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    kube.podman(*args, c["image"], *c["args"])
    try:
        deadline = time.monotonic() + 180
        while not kube.grpc_serving(grpc_port, timeout=2):  # the manifest's readiness probe, as it asks
            running = kube.podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true"
            assert running and time.monotonic() < deadline, kube.podman("logs", name, check=False).stderr[-3000:]
            time.sleep(0.5)
        with client(grpc_port) as replica:
            assert Image.open(io.BytesIO(replica.generate(PROMPT, steps=10, seed=1).images[0].data)).size == (64, 64)
            # The same PostgreSQL as the pod: both list the same adapters (those trained through the pod).
            with client(cluster[1][GATEWAY, "grpc"]) as pod:
                assert {a.adapter_id for a in replica.adapters.list()} == {a.adapter_id for a in pod.adapters.list()}
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "steerserve_triton_up 1.0" in metrics
    finally:
        kube.podman("rm", "--force", "--time", "5", name, check=False)


def test_replacing_the_gateway_pod_loses_no_request_job_or_adapter(cluster):
    from steerserve_client import RetryPolicy

    plan, ports, _ = cluster
    grace = plan.pods[GATEWAY]["spec"]["terminationGracePeriodSeconds"]
    # Retries long enough to span a pod's replacement (the default policy gives up after ~8 s).
    patient = RetryPolicy(max_attempts=20, initial_backoff_s=0.5, max_backoff_s=3.0)
    jobs_before, adapters_before = int(psql("select count(*) from jobs")), int(psql("select count(*) from adapters"))

    with client(ports[GATEWAY, "grpc"], retry=patient) as c:
        job = c.personalize("custom-diffusion", "kube-replaced", photos(), class_word="circle", steps=120, seed=5)
        results, errors, stop = [], [], threading.Event()

        def loop():
            with client(ports[GATEWAY, "grpc"], retry=patient) as looping:
                while not stop.is_set():
                    try:
                        results.append(looping.generate(PROMPT, steps=4, seed=len(results)).images[0].data)
                    except Exception as err:  # a lost request: what this test exists to catch
                        errors.append(err)

        looper = threading.Thread(target=loop)
        looper.start()
        try:
            deadline = time.monotonic() + 300
            while c.jobs.get(job.job_id).step < 5:  # training, with a checkpoint or more to resume from
                assert time.monotonic() < deadline, "the job never started"
                time.sleep(0.5)
            assert c.jobs.get(job.job_id).state == "RUNNING"  # the pod goes mid-training
            before = len(results)
            kube.replace_pod(plan, GATEWAY, grace)
            replaced_in = kube.wait_ready(plan, GATEWAY, 300)
            while len(results) < before + 3:  # calls answered by the new pod
                assert looper.is_alive() and time.monotonic() < deadline + 300, errors
                time.sleep(0.5)
        finally:
            stop.set()
            looper.join(120)
        done = job.wait(timeout=900)
    assert not errors, errors
    assert done.state == "SUCCEEDED" and done.adapter_id
    assert int(psql("select count(*) from jobs")) == jobs_before + 1
    assert int(psql("select count(*) from adapters")) == adapters_before + 1
    assert psql(f"select state from jobs where job_id = '{job.job_id}'") == "SUCCEEDED"
    print(f"gateway replaced, ready again in {replaced_in:.0f} s; {len(results)} Generate calls, none lost")
