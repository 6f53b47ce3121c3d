"""Shared fixtures: a real gateway (gRPC server on a loopback port, in-process engine) per session."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from service.config import Settings

TOKENS = {"token-alice": "alice", "token-bob": "bob"}

# The service's default UNet runtime is `auto` (measured at start: an ONNX export and a cold
# torch.compile, minutes on CI's 2 cores). Gateways and Triton servers the tests start run eager
# unless a test asks otherwise; `auto` itself is tested in tests/test_compiled_unet.py and,
# end to end from a fresh `serve`, in tests/test_cli.py.
os.environ.setdefault("STEERSERVE_UNET_RUNTIME", "eager")


# Command-line tools scripts/setup.sh --test installs (Debian packages, as root): a test that needs
# one FAILS when it is missing, as the tests on PostgreSQL do (tests/postgres_server.py), rather
# than skipping and passing a run that checked nothing.
SETUP_INSTALLS = {"promtool": "prometheus", "prometheus": "prometheus", "kubectl": "kubectl", "openssl": "openssl"}


def required_tool(name: str) -> str:
    """The path of `name`, one of SETUP_INSTALLS; fails the test when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: scripts/setup.sh --test installs it (Debian package "
                    f"{SETUP_INSTALLS[name]}; needs root and apt)", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningGateway:
    address: str
    metrics_url: str
    settings: Settings
    gateway: object
    loop: asyncio.AbstractEventLoop

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self) -> pb_grpc.SteerServeStub:
        return pb_grpc.SteerServeStub(self.channel())


def auth(token: str = "token-alice") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def start_gateway_in_thread(settings: Settings, backend=None, metrics=None) -> RunningGateway:
    from service.gateway.server import start_gateway

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict = {}

    def run():
        asyncio.set_event_loop(loop)
        try:
            box["gateway"] = loop.run_until_complete(start_gateway(settings, backend=backend, metrics=metrics))
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test
            box["error"] = exc
        ready.set()
        if "gateway" in box:
            loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(120)
    if "error" in box:
        raise box["error"]
    gw = box["gateway"]
    return RunningGateway(
        address=f"127.0.0.1:{gw.port}",
        metrics_url=f"http://127.0.0.1:{gw.metrics_port}/metrics",
        settings=settings,
        gateway=gw,
        loop=loop,
    )


def stop_gateway(running: RunningGateway) -> None:
    asyncio.run_coroutine_threadsafe(running.gateway.stop(grace=1), running.loop).result(30)
    running.loop.call_soon_threadsafe(running.loop.stop)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: the machine's 2 cores are shared, and set_flush_denormal only reaches
    the calling thread, so a second OpenMP worker can crawl through denormals (seen: 10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pipe():
    from bench.reference_adapters import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, model_cache):
    data = tmp_path_factory.mktemp("gateway-data")
    settings = Settings(
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=free_port(),
        api_keys=dict(TOKENS),
        data_dir=data,
        default_steps=3,  # keep the suite fast; tests that care pass steps explicitly
    )
    running = start_gateway_in_thread(settings)
    yield running
    stop_gateway(running)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 15 on a loopback port for the session (tests/postgres_server.py)."""
    from tests.postgres_server import PostgresServer

    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


# -- unit and system tests --------------------------------------------------------------------------
# System tests start real servers or processes (Triton, PostgreSQL, Prometheus/promtool, kubectl,
# the CLI's gateway, processes killed mid-write); they are marked `system`, every other test is a
# unit test. `scripts/run-tests.sh --fast` runs the unit tests that are not `slow`; CI runs all.
SYSTEM_MODULES = {
    "test_triton", "test_triton_configs", "test_triton_supervisor", "test_multi_replica", "test_crash_safety",
    "test_observability_rules", "test_deploy_manifests", "test_metrics_lint", "test_gpu_metrics", "test_tls",
    "test_cli", "test_examples", "test_containers",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        on_postgres = "postgres" in item.fixturenames or "postgresql" in getattr(
            getattr(item, "callspec", None), "params", {}).values()
        if module in SYSTEM_MODULES or on_postgres:
            item.add_marker(pytest.mark.system)
