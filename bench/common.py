"""What the benchmarks share: a real `steerserve serve` process to call through the public API, the
serving engine with an adapter bank over adapters trained in the run, and `--set` overrides."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict:
    """This environment without any STEERSERVE_* or OTEL_* setting: the servers run on defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("STEERSERVE_", "OTEL_"))}


def stop_group(server: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the server's process group (Triton and its stubs too), SIGKILL past the grace."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
    except ProcessLookupError:
        pass


@dataclass
class Served:
    """A running `steerserve serve` process and where to reach it."""
    process: subprocess.Popen
    start_seconds: float
    address: str  # gRPC, host:port
    metrics_url: str  # the gateway's Prometheus endpoint


@contextmanager
def serve_process(model_dir, log_path: Path, ready_timeout_s: float, label: str, *, backend: str, data_dir: Path,
                  api_keys: dict[str, str], settings: dict[str, str] | None = None):
    """`python -m service serve --model-dir MODEL_DIR` on `backend` ("inprocess" or "triton"), its data in
    `data_dir`, tokens to tenants `api_keys`, on free loopback ports, every other setting at its
    default but `settings`; in its own session, its output in `log_path`. Yields a `Served` once it
    logs that it listens (raises with the log's end if it exits or takes longer); stopped with its
    process group at the end."""
    port, metrics_port = free_port(), free_port()
    env = clean_env()
    env.update(STEERSERVE_DATA_DIR=str(data_dir), STEERSERVE_GRPC_PORT=str(port),
               STEERSERVE_METRICS_PORT=str(metrics_port), STEERSERVE_HOST="127.0.0.1",
               STEERSERVE_API_KEYS=",".join(f"{token}:{tenant}" for token, tenant in api_keys.items()),
               PYTHONUNBUFFERED="1")
    if backend == "triton":
        env.update(STEERSERVE_BACKEND="triton", STEERSERVE_TRITON_START_TIMEOUT_S=str(int(ready_timeout_s)))
    # A benchmark times what serves: `auto` measures before the server reports ready, rather than in
    # the background while the load runs (the service's default).
    env.setdefault("STEERSERVE_UNET_RUNTIME_MEASURE", "blocking")
    env.update(settings or {})
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--model-dir", str(model_dir)], env=env,
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    try:
        while "listening on" not in Path(log_path).read_text():
            if server.poll() is not None or time.monotonic() - started > ready_timeout_s:
                raise RuntimeError(f"{label}: serve did not come up:\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.5)
        yield Served(server, time.monotonic() - started, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        stop_group(server, grace_s=120)


@contextmanager
def served_gateway(ready_timeout_s: float = 120.0):
    """A `steerserve serve` process (in-process backend, default settings, a temporary data folder)
    on a free loopback port; yields (stub, metadata, pb) once it answers, stops it after."""
    import grpc

    from service._generated.steerserve.v1 import steerserve_pb2 as pb
    from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    md = [("authorization", "Bearer bench-token")]
    with tempfile.TemporaryDirectory() as data:
        env = dict(os.environ, STEERSERVE_API_KEYS="bench-token:bench", STEERSERVE_DATA_DIR=data,
                   STEERSERVE_GRPC_PORT=str(port), STEERSERVE_METRICS_PORT="0")
        server = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            stub = pb_grpc.SteerServeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            deadline = time.monotonic() + ready_timeout_s
            while True:
                try:
                    stub.ListJobs(pb.ListJobsRequest(), metadata=md, timeout=1)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("the benchmark's steerserve process did not come up")
                    time.sleep(0.2)
            yield stub, md, pb
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)


def add_run_arguments(parser) -> None:
    """--threads and --out-dir, which every benchmark takes."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))


def start_run(args) -> float:
    """Torch set up as the benchmarks measure it (thread count, denormals flushed); the start time."""
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    return time.time()


def write_results(out_dir, stem: str, report: dict, markdown: str) -> None:
    """`<out_dir>/<stem>.json` (the figures) and `<stem>.md` (the table the README points to);
    prints the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    print(markdown)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope(xs, ys) -> float:
    """Least-squares slope of ys over xs (how fast memory grows per request)."""
    import statistics

    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def serving_engine(model_dir, adapters: dict, max_rows: int, num_slots: int = 4, max_rank: int = 16):
    """The serving path (service/serving.py, eager UNet): an Engine with the adapter bank, loading
    adapters from `adapters` by key."""
    from service.config import Settings
    from service.serving import build_engine

    settings = Settings(adapter_slots=num_slots, adapter_max_rank=max_rank)
    return build_engine(settings, max_rows, model_dir=model_dir, loader=adapters.__getitem__, unet_runtime=False,
                        registry=CollectorRegistry())


def apply_overrides(spec, items) -> None:
    """`--set FIELD=VALUE` (VALUE as JSON): a TrainingSpec field, or `extra.KEY` for a method switch."""
    for item in items:
        key, value = item.split("=", 1)
        value = json.loads(value)
        if key.startswith("extra."):
            spec.extra[key[6:]] = value
        else:
            setattr(spec, key, value)
