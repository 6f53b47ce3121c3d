"""Builds and runs the gateway: gRPC server (SteerServe + health + reflection) and metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from service import tracing
from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from service.adapters.bank import CONV_LAYERS
from service.adapters.loading import adapter_checker
from service.admission import Admission
from service.backends import Backend, InProcessBackend
from service.config import Settings
from service.engine import families
from service.jobs import JobRunner
from service.serving import build_engine
from service.stores import AdapterStore, CheckpointStore, JobStore, open_database

from .metrics import GatewayMetrics
from .servicer import SteerServeServicer

log = logging.getLogger("steerserve.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SteerServe"].full_name
LIVENESS = "liveness"  # the health service name Kubernetes probes liveness with


def build_inprocess_backend(settings: Settings, metrics: GatewayMetrics) -> Backend:
    if settings.unet_runtime == "triton_engine":
        raise ValueError("unet_runtime 'triton_engine' runs only inside Triton's unet model (backend 'triton'); "
                         "in-process, use auto, eager, compile or onnx")
    # The engine is built (and `auto` measures) with the threads it will serve with on its model
    # thread (batching._model_thread): one team of `torch_threads`, measured as it will run.
    import torch

    torch.set_num_threads(settings.torch_threads)
    # Rows of one request: 2 per image under CFG, 3 under style guidance, with room to spare.
    engine = build_engine(settings, 4 * settings.max_num_images, registry=metrics.registry, image_prompts=True)
    metrics.watch_unet_runtime(engine)
    backend = InProcessBackend(engine, settings.resolved_model_dir(), workers=settings.engine_workers, metrics=metrics,
                               training_workers=settings.training_workers, torch_threads=settings.torch_threads,
                               serving_first=settings.serving_first, compute_units=settings.compute_units)
    metrics.watch_step_batcher(backend.batcher)
    return backend


MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repo"
TRITON_MODELS = ("text_encoder", "unet", "vae_decode", "generate", "personalize", "edit")


def triton_model_environment(settings: Settings, model_dir: Path) -> dict[str, str]:
    """How the models in model_repo/ are configured: the Settings they read (service/triton/parts.py),
    as the environment of the server and its stubs."""
    return {
        "STEERSERVE_MODEL_DIR": str(model_dir.resolve()),
        "STEERSERVE_ADAPTER_DIR": str(settings.adapters_path().resolve()),
        "STEERSERVE_REQUEST_ADAPTER_DIR": str(settings.request_adapters_path().resolve()),
        "STEERSERVE_ADAPTER_SLOTS": str(settings.adapter_slots),
        "STEERSERVE_ADAPTER_MAX_RANK": str(settings.adapter_max_rank),
        "STEERSERVE_ADAPTER_CONV_LAYERS": settings.adapter_conv_layers,
        "STEERSERVE_ADAPTER_HOST_CACHE": str(settings.adapter_host_cache),
        "STEERSERVE_ADAPTER_HOST_CACHE_BYTES": str(settings.adapter_host_cache_bytes),
        "STEERSERVE_UNET_RUNTIME": settings.unet_runtime,
        "STEERSERVE_UNET_RUNTIME_CANDIDATES": ",".join(settings.unet_runtime_candidates),
        "STEERSERVE_UNET_BATCH_BUCKETS": ",".join(map(str, settings.unet_batch_buckets)),
        "STEERSERVE_UNET_COMPILE_MODE": settings.unet_compile_mode,
        "STEERSERVE_UNET_WARMUP": "1" if settings.unet_warmup else "0",
        "STEERSERVE_COMPILED_DIR": str(settings.compiled_path().resolve()),
        "STEERSERVE_TORCH_THREADS": str(settings.torch_threads),
        "STEERSERVE_TRAINING_WORKERS": str(settings.training_workers),
        "STEERSERVE_SERVING_FIRST": "1" if settings.serving_first else "0",
        "STEERSERVE_COMPUTE_UNITS": str(settings.compute_units),
        # An IP-Adapter named by the settings (the embedded model's own is found from the model folder).
        "STEERSERVE_IMAGE_PROMPTS": "1" if settings.image_prompts else "0",
        **({"STEERSERVE_IMAGE_PROMPT_ADAPTER": str(Path(settings.image_prompt_adapter).resolve()),
            "STEERSERVE_IMAGE_ENCODER_DIR": str(Path(settings.image_encoder_dir).resolve())}
           if settings.image_prompt_adapter is not None and settings.image_encoder_dir is not None else {}),
    }


async def build_triton_backend(settings: Settings, metrics: GatewayMetrics) -> Backend:
    """Connects to settings.triton_url, or starts the embedded Triton and waits until its models
    are ready (the backend stops it on close)."""
    from service.backends.triton import TritonBackend
    from service.triton.launcher import TritonServer, trace_args

    model_dir = settings.resolved_model_dir()
    url = settings.triton_url
    server = None
    if not url:
        server = TritonServer(
            MODEL_REPOSITORY, models=TRITON_MODELS, env=triton_model_environment(settings, model_dir),
            work_dir=Path(settings.data_dir) / "triton", start_timeout_s=settings.triton_start_timeout_s,
            extra_args=trace_args(settings.triton_trace_url) if settings.triton_trace_url else (),
        )
        await asyncio.to_thread(server.start)
        log.info("Triton ready at %s (metrics %s)", server.grpc_url, server.metrics_url)
        url = server.grpc_url
    return TritonBackend(url, model_dir, metrics=metrics, server=server, adapter_slots=settings.adapter_slots,
                         image_prompt_files=settings.image_prompt_files())


async def build_backend(settings: Settings, metrics: GatewayMetrics) -> Backend:
    # A folder of an architecture not served is refused here, in one line, before Triton or any
    # weight is loaded (families.UnsupportedModel names what was found and what is served).
    families.detect(settings.resolved_model_dir())
    if settings.backend == "triton":
        return await build_triton_backend(settings, metrics)
    if settings.backend == "inprocess":
        return build_inprocess_backend(settings, metrics)
    raise ValueError(f"unknown backend {settings.backend!r}; use 'inprocess' or 'triton'")


def ensure_dev_token(settings: Settings) -> str | None:
    """Development mode: with no keys configured, mint a token for tenant 'dev' (printed at start)."""
    if settings.api_keys or not settings.dev_token:
        return None
    token = "dev-" + secrets.token_urlsafe(18)
    settings.api_keys = {token: "dev"}
    return token


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    servicer: SteerServeServicer
    health: health.aio.HealthServicer
    metrics: GatewayMetrics
    metrics_http: object | None  # prometheus_client's HTTP server, or None when disabled

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.server_port if self.metrics_http is not None else None

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        # Running jobs stop at their next step and stay queued, to resume from their checkpoint.
        await self.servicer.jobs.close()
        await self.servicer.backend.close()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
        await asyncio.to_thread(tracing.shutdown)  # exports the spans still buffered


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from the configured PEM files; with a client CA, clients must present a certificate it
    signed (mutual TLS). None: plaintext."""
    if settings.tls_cert_file is None:
        return None
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None,
    )


async def start_gateway(
    settings: Settings, backend: Backend | None = None, metrics: GatewayMetrics | None = None
) -> Gateway:
    # OpenTelemetry tracing when the standard OTEL_* variables ask for it (service/tracing.py).
    tracing.configure("steerserve-gateway")
    metrics = metrics or GatewayMetrics()
    backend = backend or await build_backend(settings, metrics)
    # SQLite in the data folder (one gateway), or PostgreSQL shared by every replica (the data
    # folder then is one volume they all mount: adapter blobs and training checkpoints).
    db = open_database(settings.database_url or Path(settings.data_dir) / "steerserve.sqlite3")
    log.info("stores: %r, blobs and checkpoints in %s", db, settings.data_dir)
    adapters = AdapterStore(db, settings.adapters_path(), max_adapters=settings.tenant_max_adapters,
                            max_bytes=settings.tenant_max_adapter_bytes)
    # Files a crash left between writing a blob and registering it (on a shared volume, only old
    # ones: a young one may be another replica's create in progress).
    swept = adapters.sweep()
    if swept:
        log.warning("removed %d unregistered adapter files left by an interrupted write", len(swept))
    check = adapter_checker(backend.model_dir, settings.adapter_max_rank,
                            conv_target_modules=CONV_LAYERS[settings.adapter_conv_layers])
    # The one request queue: Generate and Edit calls, and finished jobs' previews.
    admission = Admission(settings.admission_limits(backend.name), metrics, width=backend.batch_width)
    metrics.training_capacity.set(settings.training_workers)
    runner = JobRunner(
        settings, JobStore(db), adapters, CheckpointStore(Path(settings.data_dir) / "checkpoints"), backend, check, metrics,
        admission=admission,
    )
    await runner.start()
    servicer = SteerServeServicer(settings, backend, adapters, runner, metrics, check_adapter=check, admission=admission)

    limit = settings.max_request_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    pb_grpc.add_SteerServeServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = f"{settings.host}:{settings.grpc_port}"
    credentials = server_credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC port {settings.host}:{settings.grpc_port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    # "liveness": this process answers (Kubernetes' liveness and startup probes). It never follows
    # Triton: a model server that is down makes the gateway not ready (""), not dead, so it is
    # taken out of the Service rather than restarted in a loop.
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    async def model_server_changed(up: bool, reason: str) -> None:  # backend "triton": health follows it
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    backend.start_supervision(model_server_changed, backoff_s=(1.0, settings.triton_restart_backoff_max_s))

    metrics_http = None
    if settings.metrics_port:
        metrics_http, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
    return Gateway(server, port, servicer, health_servicer, metrics, metrics_http)


async def serve(settings: Settings, on_ready=None) -> None:
    """Runs until SIGINT/SIGTERM, then drains in-flight RPCs and exits."""
    gateway = await start_gateway(settings)
    if on_ready is not None:
        on_ready(gateway)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight RPCs for up to %.0f s", settings.shutdown_grace_s)
    await gateway.stop(settings.shutdown_grace_s)
