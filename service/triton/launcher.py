"""Runs the Triton Inference Server binary that the nvidia-pytriton wheel carries, on loopback ports.

The wheel holds `tritonserver` (Triton 2.51), the python backend library and one
`triton_python_backend_stub` per Python version, but no ready backend directory. `TritonServer`
assembles one in a private work folder (links to the backend library, a copy of the stub for this
interpreter), starts the server with explicit model control, waits until the requested models are
ready, and stops it (SIGTERM, then SIGKILL) waiting for the PID so its ports are free again.

    with TritonServer(model_repository="model_repo", env={...}) as triton:
        triton.grpc_url   # "127.0.0.1:PORT"

Nothing here imports pytriton itself: its client modules need a newer grpcio than the service pins.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger("steerserve.triton")


class TritonStartError(RuntimeError):
    """The server exited or did not become ready in time; the message carries its log tail."""


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the server live inside the installed nvidia-pytriton package."""

    root: Path  # .../site-packages/pytriton/tritonserver

    @classmethod
    def find(cls) -> "TritonDistribution":
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonStartError("nvidia-pytriton is not installed; it carries the Triton server binary")
        root = Path(spec.submodule_search_locations[0]) / "tritonserver"
        dist = cls(root)
        for path in (dist.binary, dist.python_backend_library, dist.stub):
            if not path.exists():
                raise TritonStartError(f"the installed nvidia-pytriton lacks {path}")
        return dist

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend_library(self) -> Path:
        return self.root / "backends" / "python" / "libtriton_python.so"

    @property
    def stub(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"

    @property
    def bundled_libraries(self) -> Path:
        # auditwheel's folder of the server's shared libraries, beside the package.
        return self.root.parent.parent / "nvidia_pytriton.libs"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prepare_backend_directory(dist: TritonDistribution, target: Path) -> Path:
    """`target/python/` with the python backend; returns `target` (for --backend-directory)."""
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (dist.python_backend_library, dist.python_backend_library.with_name("triton_python_backend_utils.py")):
        link = python_dir / source.name
        if not link.exists():
            link.symlink_to(source)
    # The backend starts `<dir>/triton_python_backend_stub` for each model instance; a copy (not a
    # link) so the stub's own $ORIGIN-relative lookups are not redirected into the package.
    stub = python_dir / "triton_python_backend_stub"
    if not stub.exists():
        shutil.copy2(dist.stub, stub)
    return target


def server_environment(dist: TritonDistribution, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The stub embeds Python: it must load this interpreter's libpython (pyenv's), not the system's,
    # and it finds this venv's packages through the `python3` first on PATH.
    libs = [sysconfig.get_config_var("LIBDIR"), str(dist.bundled_libraries)]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # model.py files import the service package; make the repository importable from the stub.
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def missing_libraries(dist: TritonDistribution, extra_env: Mapping[str, str] | None = None) -> list[str]:
    """The shared libraries that the server, its python backend or this interpreter's stub cannot
    find in the environment the server runs in (ldd's "not found" lines). A stub that cannot load
    exits at once for every model instance and the server waits on, never ready: e.g. Debian's
    python3 without its libpython3.11 package (found by the first real image build). Empty where
    there is no ldd to ask."""
    if shutil.which("ldd") is None:
        return []
    env = server_environment(dist, extra_env)
    missing = []
    for path in (dist.binary, dist.python_backend_library, dist.stub):
        out = subprocess.run(["ldd", str(path)], env=env, capture_output=True, text=True, timeout=60)
        missing += [f"{path.name}: {line.strip()}" for line in out.stdout.splitlines() if "not found" in line]
    return missing


def trace_args(url: str, service_name: str = "steerserve-triton") -> list[str]:
    """tritonserver flags for its own OpenTelemetry traces, exported as OTLP/HTTP (the only protocol
    Triton speaks) to `url` (e.g. http://collector:4318/v1/traces). rate=0: only requests that
    carry a `traceparent` (the gateway's, with tracing on) are traced, as children of the
    gateway's backend span; level TIMESTAMPS gives the request, model and compute spans."""
    return ["--trace-config=mode=opentelemetry", "--trace-config=rate=0", "--trace-config=count=-1",
            "--trace-config=level=TIMESTAMPS", f"--trace-config=opentelemetry,url={url}",
            f"--trace-config=opentelemetry,resource=service.name={service_name}"]


class TritonServer:
    """One tritonserver process with explicit model control; a context manager.

    Args:
        model_repository: the folder of models (config.pbtxt + 1/model.py each).
        models: models loaded at start; the server is ready once all of them are.
        env: extra environment for the server and its python-backend stubs (how models are
            configured: STEERSERVE_MODEL_DIR, STEERSERVE_ADAPTER_DIR, ...).
        work_dir: where the backend directory and the log go (a temporary folder by default).
    """

    def __init__(
        self,
        model_repository: str | Path,
        models: Sequence[str] = ("*",),
        env: Mapping[str, str] | None = None,
        work_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        start_timeout_s: float = 120.0,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
    ):
        self.model_repository = Path(model_repository).resolve()
        self.models = list(models)
        self.extra_env = dict(env or {})
        self.host = host
        self._own_work_dir = work_dir is None
        self.work_dir = (Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="steerserve-triton-"))).resolve()
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.start_timeout_s = start_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)  # e.g. --model-config-name=gpu (deploy/)
        self.log_path = self.work_dir / "tritonserver.log"
        # Written once every model has loaded: the instances' background UNet runtime measurement
        # waits for it, so it never times calls while other models load beside it.
        self.ready_file = self.work_dir / "models-ready"
        self.extra_env.setdefault("STEERSERVE_UNET_RUNTIME_READY_FILE", str(self.ready_file.resolve()))
        self.process: subprocess.Popen | None = None
        self._closed = False  # after close(), start() refuses (a supervisor's restart may race it)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def metric(self, name: str, model: str) -> float:
        """A Triton metric (e.g. nv_inference_count) of one model, summed over its series."""
        import re
        import urllib.request

        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        pattern = re.compile(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', re.M)
        return sum(float(v) for v in pattern.findall(text))

    def command(self, dist: TritonDistribution) -> list[str]:
        backends = prepare_backend_directory(dist, self.work_dir / "backends")
        cmd = [
            str(dist.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={dist.root / 'caches'}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in self.models],
            # Every model loads at once (Triton's default is 4 threads: with our six, the last two
            # only began importing torch once the first four were up, a minute later on 2 cores).
            f"--model-load-thread-count={max(4, len(self.models))}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            # Ready only when every loaded model is; stop waits this long for in-flight requests.
            "--strict-readiness=true",
            "--exit-timeout-secs=5",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]
        return cmd

    def start(self) -> "TritonServer":
        if self._closed:
            raise TritonStartError("the server was closed")
        dist = TritonDistribution.find()
        missing = missing_libraries(dist, self.extra_env)
        if missing:  # fail now, not after start_timeout_s of a server whose models never load
            raise TritonStartError("Triton cannot start, shared libraries not found: " + "; ".join(missing))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        log_file = open(self.log_path, "ab")
        # The server and its stubs run in an empty folder of their own: a stub's sys.path starts
        # with its working directory, where any folder is an importable package. In the image
        # (WORKDIR /tmp, --work-dir /tmp/triton) the work dir itself became `import triton`, and
        # torch, finding a "triton" without triton.language, failed every model's load (found on
        # the first real container run).
        cwd = self.work_dir / "cwd"
        cwd.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            self.command(dist),
            cwd=cwd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=server_environment(dist, self.extra_env),
            start_new_session=True,  # its own process group: stubs go down with it, Ctrl-C goes to us
        )
        log_file.close()
        if self._closed:  # close() ran while this start was on its way: take the new child down too
            self.stop()
            raise TritonStartError("the server was closed")
        log.info("started tritonserver pid %d (grpc %s, metrics %s)", self.process.pid, self.grpc_url, self.metrics_url)
        try:
            self.wait_ready(self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ready_file.write_text(str(self.process.pid))
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise TritonStartError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.1)
        raise TritonStartError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and its stubs) and wait: a crash, for tests."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Triton unloads models and exits), SIGKILL past the timeout; waits for the PID."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit in %.0f s; killing it", timeout_s)
            self.kill()
        if proc is not None:
            # Stubs left behind by a killed server would hold memory: take down the group.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def restart(self) -> "TritonServer":
        """Starts again on the same ports (after stop() or kill())."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self._closed = True
        self.stop()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def follow(path: Path, out, stop: threading.Event, poll_s: float = 0.2) -> None:
    """Copies what is appended to `path` (from its start, or as soon as it exists) to `out` until
    `stop` is set, then what is left: the server's log on the launcher's stdout, where a container
    runtime (`kubectl logs`) reads it. The log file stays the launcher's own record (log_tail)."""
    handle = None
    try:
        while True:
            stopping = stop.is_set()
            if handle is None:
                try:
                    handle = open(path, "rb")
                except FileNotFoundError:
                    handle = None
            if handle is not None:
                while chunk := handle.read(65536):
                    out.write(chunk)
                out.flush()
            if stopping:
                return
            stop.wait(poll_s)
    finally:
        if handle is not None:
            handle.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m service.triton.launcher`: serve a model repository in the foreground (deploy/).

    Unknown arguments go to tritonserver as they are (e.g. --model-config-name=gpu).
    """
    import argparse

    ap = argparse.ArgumentParser(description="run the Triton server nvidia-pytriton carries on a model repository")
    ap.add_argument("--model-repository", default=str(Path(__file__).resolve().parents[2] / "model_repo"))
    ap.add_argument("--models", nargs="+", default=["*"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--work-dir")
    ap.add_argument("--check", action="store_true",
                    help="only check that the server, its python backend and stub find their shared libraries (an image build runs it)")
    args, extra = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.check:
        missing = missing_libraries(TritonDistribution.find())
        print("\n".join(missing) if missing else "Triton's shared libraries: all found")
        return 1 if missing else 0
    server = TritonServer(
        args.model_repository, models=args.models, host=args.host, grpc_port=args.grpc_port,
        http_port=args.http_port, metrics_port=args.metrics_port, work_dir=args.work_dir,
        start_timeout_s=600, extra_args=extra,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # The server's own log (model loads, stub errors) on stdout too: in a pod it is what
    # `kubectl logs` shows while a start takes minutes (found on the first container run).
    log_done = threading.Event()
    echo = threading.Thread(target=follow, args=(server.log_path, sys.stdout.buffer, log_done), daemon=True)
    echo.start()
    try:
        with server:
            log.info("Triton ready: grpc %s, metrics %s, log %s", server.grpc_url, server.metrics_url, server.log_path)
            while not stop.wait(1.0):
                if server.process.poll() is not None:
                    log.error("tritonserver exited with code %s", server.process.returncode)
                    return 1
    finally:
        log_done.set()
        echo.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
