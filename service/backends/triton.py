"""The Triton backend: Generate runs as the `generate` model of a Triton server (model_repo/), and
personalization jobs as its `personalize` model.

One bidirectional gRPC stream per request (the model is decoupled): the final response holds the
images and, per denoising step, the UNet batch that step ran in and its queue time; when the caller
wants progress, Triton also streams a response per step. Errors map to
gRPC statuses: Triton unreachable or a model not loaded -> BackendUnavailable (UNAVAILABLE), the
caller's deadline -> GenerationCancelled (DEADLINE_EXCEEDED), a bad request -> INVALID_ARGUMENT.

A training job is one stream too: a response per step (progress), per checkpoint (the state the
job runner stores), and the adapter file last. Stopping a job cancels its stream; Triton stops the
training loop before its next step.

Several Triton replicas (a headless Service, or a list of addresses) are one backend: each request
goes to the replica its adapters are most likely resident on, within a load bound (triton_replicas.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from transformers import CLIPTokenizer

from service import tracing
from service.edit import Edited, EditProgress, EditSpec
from service.engine.pipeline import GenerationCancelled, GenerationResult, GenerationSpec
from service.engine.sampling import ModelFacts
from service.engine.width import BatchWidth, ReplicatedWidth
from service.errors import Busy
from service.personalize import Progress, TrainingSpec, TrainingStopped
from service.triton import wire
from service.triton.client import InferenceServerException, aioclient, grpcclient, np_to_triton_dtype
from service.triton.supervisor import OnChange, SupervisorMetrics, TritonSupervisor

from .base import BackendBusy, BackendUnavailable, ImagePromptSide
from .triton_replicas import Replica, ReplicaRouter

_STOP_POLL_SECONDS = 0.2  # how often a training stream checks whether its job must stop
MAX_MESSAGE_BYTES = 2**31 - 1  # tritonclient's own default: images of any allowed size


class TritonMetrics:
    """Per-step series the gateway sees from Triton's responses (beside Triton's own nv_* metrics)."""

    def __init__(self, registry: CollectorRegistry):
        self.step_batch_size = Histogram(
            "steerserve_triton_step_batch_size",
            "UNet rows (predictions: 2 per image under CFG, 3 under style guidance) in the call a denoising step of a request ran in (step-level batching).",
            buckets=(2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128), registry=registry,
        )
        self.step_queue = Histogram(
            "steerserve_triton_step_queue_seconds",
            "Time a denoising step waited in Triton (round trip to the unet model minus its compute).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=registry,
        )
        self.errors = Counter(
            "steerserve_triton_errors", "Generate calls to Triton that failed, by mapped gRPC code.", ["code"],
            registry=registry,
        )


def _inputs(message: wire.Tensors) -> list[grpcclient.InferInput]:
    """A wire message as tritonclient inputs."""
    out = []
    for name, array in message.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _read_url(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def _time_left(deadline: float | None) -> float | None:
    """Seconds to the caller's deadline (the generate and edit models stop by it); None without one.
    Raises GenerationCancelled when it has already passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise GenerationCancelled("deadline passed before the request reached Triton")
    return left


def _trace_headers(model: str, replica: Replica) -> dict[str, str] | None:
    """The current span's W3C trace context for a request to Triton (None when tracing is off),
    after naming the model and replica on that span."""
    if not tracing.enabled():
        return None
    tracing.set_current({"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                         "rpc.method": "ModelStreamInfer", "server.address": replica.address, "triton.model": model})
    return tracing.inject_headers()


class TritonBackend(ImagePromptSide):
    name = "triton"
    # The edit model's text_encoder part takes no image prompts yet (wire.encode_call refuses them).
    edits_take_image_prompts = False

    def __init__(self, url: str, model_dir: str | Path, metrics=None, server=None, adapter_slots: int = 16,
                 image_prompt_files: tuple[Path, Path] | None = None):
        """`url`: Triton's gRPC address, or several (host:port,...; a name with several addresses
        is several replicas); `model_dir`: the diffusers folder the models serve (the gateway reads
        its tokenizer and configs for validation); `server`: a TritonServer this backend owns and
        stops on close (the embedded default), or None for external ones; `adapter_slots`: each
        replica's adapter bank size, slot 0 included (STEERSERVE_ADAPTER_SLOTS)."""
        self.url = url
        self.server = server
        self.model_dir = Path(model_dir)
        facts = ModelFacts.from_dir(model_dir)
        self.model_name = facts.name
        # Photos become image-prompt tokens here, in the gateway (the image encoder and the file's
        # projection, no UNet); the tokens travel with the Generate request to the `generate` model,
        # whose UNet has the same file's K/V installed: both read the same settings (the embedded
        # server gets them from the launcher, deploy/ from the one ConfigMap). None: the model
        # serves no image prompts.
        if image_prompt_files is not None:
            from service.image_prompt.served import ImagePromptEncoder

            unet_config = json.loads((self.model_dir / "unet" / "config.json").read_text())
            self.image_prompt_encoder = ImagePromptEncoder.from_files(*image_prompt_files,
                                                                      width=unet_config["cross_attention_dim"])
        self.limits = facts.limits
        self.tokenizer = CLIPTokenizer.from_pretrained(Path(model_dir) / "tokenizer", local_files_only=True)
        self.triton_metrics = TritonMetrics(metrics.registry) if metrics is not None else None
        self._registry = metrics.registry if metrics is not None else None
        # The router remembers as many adapters per replica as its bank holds (slot 0 is the base).
        self.router = ReplicaRouter(url, max(1, adapter_slots - 1), registry=self._registry)
        self.router.on_removed = self._close_replica
        self.supervisor: TritonSupervisor | None = None
        # The generate instances measure what a step costs by width and send it with each result:
        # admission runs that many requests at once per ready replica (service/engine/width.py).
        self._width = BatchWidth()
        self.batch_width = ReplicatedWidth(self._width, lambda: sum(r.ready for r in self.router.replicas.values()))

    async def unet_runtime(self) -> tuple[str, str]:
        """What the `unet` model's instances chose, from the info metric they export on Triton's
        /metrics (service/triton/runtime_metrics.py): only where this gateway knows that endpoint
        (the embedded server); ("", "") otherwise."""
        if self.server is None:
            return "", ""
        from service.triton.runtime_metrics import parse_runtime_info

        try:
            text = await asyncio.to_thread(_read_url, self.server.metrics_url)
        except OSError:
            return "", ""
        return parse_runtime_info(text)

    # -- supervision -----------------------------------------------------------------------------

    def start_supervision(self, on_change: OnChange | None = None, **options) -> TritonSupervisor:
        """Watches the server (and restarts it, when this backend owns it) from the running event
        loop; `on_change(up, reason)` hears every change (the gateway's health)."""
        metrics = SupervisorMetrics(self._registry) if self._registry is not None else None

        stale = False  # the child exited: the channel to it is dead, and may sit in reconnect backoff

        async def changed(up: bool, reason: str) -> None:
            nonlocal stale
            if not up and self.supervisor.exited:
                stale = True
            if up and stale:
                # Nothing can be in flight on the dead server's channel: replace it with a fresh one.
                # (A server that was only "not ready" keeps its channel: requests may be running on it.)
                stale = False
                for replica in list(self.router.replicas.values()):
                    if replica.client is not None:
                        client, replica.client = replica.client, None
                        await client.close()
            if on_change is not None:
                result = on_change(up, reason)
                if asyncio.iscoroutine(result):
                    await result

        self.supervisor = TritonSupervisor(self._probe, self.server, changed, metrics, **options).start()
        if self.server is None:  # external replicas: follow the names as pods come and go
            self.router.start()
        return self.supervisor

    async def _probe(self) -> bool:
        """Up when any replica is ready; each replica's readiness steers the router."""
        if self.server is not None:  # our child: its HTTP readiness endpoint
            ready = await asyncio.to_thread(self.server.is_ready)
            for replica in self.router.replicas.values():
                self.router.set_ready(replica, ready)
            return ready
        replicas = list(self.router.replicas.values())
        answers = await asyncio.gather(*(self._probe_replica(r) for r in replicas))
        for replica, ready in zip(replicas, answers):
            self.router.set_ready(replica, ready)
        return any(answers)

    async def _probe_replica(self, replica: Replica) -> bool:
        if replica.probe is None:
            # Its own channel, retrying every second at most: readiness is seen within a second of
            # the server coming back, not after grpc's default reconnect backoff (up to 2 minutes).
            replica.probe = aioclient.InferenceServerClient(replica.address, channel_args=[
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ])
        try:
            return bool(await replica.probe.is_server_ready(client_timeout=2.0))
        except Exception:  # noqa: BLE001 - any failure to answer is "not ready"
            return False

    async def _close_replica(self, replica: Replica) -> None:
        for client in (replica.client, replica.probe):
            if client is not None:
                await client.close()
        replica.client = replica.probe = None

    async def wait_available(self) -> None:
        """Returns once the server is ready (at once when no supervisor watches it)."""
        if self.supervisor is not None:
            await self.supervisor.wait_up()

    def _ensure_available(self) -> None:
        """Fails at once while the supervised child is down or restarting, rather than on a dead channel."""
        if self.supervisor is not None and self.supervisor.exited:
            self._count("UNAVAILABLE")
            raise BackendUnavailable(f"the Triton model server at {self.url} is unavailable: "
                                     f"{self.supervisor.reason}; retry later")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def forget_adapter(self, key: str) -> None:
        """Model instances keep a deleted adapter's slot until LRU evicts it: a key names bytes,
        and a request reaches them only through a row some tenant still owns."""

    def preload_adapter(self, key: str, tenant: str) -> None:
        """Nothing beyond the job's previews: they run through `generate` on the replica the router
        sends this adapter's requests to (adapter affinity), which loads it there."""

    def client(self, replica: Replica) -> aioclient.InferenceServerClient:
        # Created on first use so its channel belongs to the gateway's event loop.
        if replica.client is None:
            replica.client = aioclient.InferenceServerClient(replica.address, channel_args=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # Channels to one address share grpc's global subchannel, and with it the reconnect
                # backoff of a Triton that was down; a private one lets a fresh client connect at once.
                ("grpc.use_local_subchannel_pool", 1),
            ])
        return replica.client

    async def generate(
        self, spec: GenerationSpec, deadline: float | None, on_step: Callable[[int, int], None] | None = None
    ) -> GenerationResult:
        self._ensure_available()
        inputs = _inputs(wire.generate_request(spec, on_step is not None, _time_left(deadline)))
        with tracing.span("backend.generate", kind="client") as span:
            if span.is_recording():
                span.set_attributes(tracing.generation_attributes(spec, self.name))
            return await self._stream(
                wire.GENERATE, inputs, [use.key for use in spec.adapters], deadline,
                lambda stream, replica: self._collect(stream, spec, on_step, replica),
                f"no result from Triton within the deadline ({spec.steps} steps)",
            )

    async def _stream(self, model: str, inputs: list, keys: list[str], deadline: float | None, collect,
                      late: str):
        """One request stream to `model` on the replica chosen for adapter `keys`; `collect(stream,
        replica)` reads its responses. The caller's deadline (DEADLINE_EXCEEDED, message `late`) and
        cancellation cancel the stream: Triton stops the loop at its next step. With tracing on the
        stream carries the current span's `traceparent` (Triton's OpenTelemetry trace joins it)."""

        async def requests():
            yield {"model_name": model, "inputs": inputs}

        replica = self.router.pick(keys)
        with self.router.using(replica):
            try:
                stream = self.client(replica).stream_infer(requests(), headers=_trace_headers(model, replica))
            except InferenceServerException as exc:
                raise self._unavailable(str(exc), replica) from exc
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                return await asyncio.wait_for(collect(stream, replica), timeout)
            except asyncio.TimeoutError:
                stream.cancel()
                self._count("DEADLINE_EXCEEDED")
                raise GenerationCancelled(late) from None
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except grpc.aio.AioRpcError as exc:
                raise self._unavailable(f"{exc.code().name}: {exc.details()}", replica) from exc

    async def _collect(self, stream, spec: GenerationSpec, on_step, replica: Replica) -> GenerationResult:
        async for result, error in stream:
            if error is not None:
                raise self._mapped(str(error), replica)
            response = wire.read_generate_response(result.as_numpy)
            if response.result is None:  # a progress response: one denoising step done
                if on_step is not None:
                    on_step(response.step, spec.steps)
                continue
            if response.step_cost is not None:
                fixed, per_row = response.step_cost
                self._width.seed({2.0: fixed + 2 * per_row, 16.0: fixed + 16 * per_row}, "Triton generate")
            if self.triton_metrics is not None:
                for size, queue in zip(response.step_batch_sizes, response.step_queue_seconds):
                    self.triton_metrics.step_batch_size.observe(size)
                    self.triton_metrics.step_queue.observe(queue)
            return response.result
        raise self._unavailable("Triton closed the stream before the result", replica)

    async def edit(self, spec: EditSpec, deadline: float | None, progress: EditProgress | None = None) -> Edited:
        """One stream to the `edit` model: progress responses (when asked, or when tracing is on:
        they make the edit's phase spans), then the edited image."""
        self._ensure_available()
        with tracing.span("backend.edit", kind="client") as span:
            if span.is_recording():
                span.set_attributes(tracing.edit_attributes(spec, self.name))
            reports = tracing.edit_phases(progress)
            inputs = _inputs(wire.edit_request(spec, reports is not None, _time_left(deadline)))

            async def collect(stream, replica: Replica) -> Edited:
                async for result, error in stream:
                    if error is not None:
                        raise self._mapped(str(error), replica)
                    response = wire.read_edit_response(result.as_numpy, spec.seed)
                    if response.result is None:
                        if reports is not None:
                            reports(*response.progress)
                        continue
                    return response.result
                raise self._unavailable("Triton closed the edit stream before the result", replica)

            keys = [spec.adapter.key] if spec.adapter is not None else []
            try:
                return await self._stream(wire.EDIT, inputs, keys, deadline, collect,
                                          "no edit from Triton within the deadline")
            finally:
                tracing.close_phases(reports)

    async def personalize(self, spec: TrainingSpec, resume: bytes | None, progress: Progress) -> bytes:
        self._ensure_available()
        replica = self.router.pick()  # no adapter to be near: the least loaded
        with self.router.using(replica), tracing.span("backend.personalize", kind="client") as span:
            if span.is_recording():
                span.set_attributes(tracing.training_attributes(spec, self.name, resume))
                progress = tracing.traced_progress(progress, span)
            return await self._personalize(replica, spec, resume, progress)

    async def _personalize(self, replica: Replica, spec: TrainingSpec, resume: bytes | None, progress: Progress) -> bytes:
        inputs = _inputs(wire.training_request(spec, resume))

        async def requests():
            yield {"model_name": wire.PERSONALIZE, "inputs": inputs}

        try:
            stream = self.client(replica).stream_infer(requests(), headers=_trace_headers(wire.PERSONALIZE, replica))
        except InferenceServerException as exc:
            raise self._unavailable(str(exc), replica) from exc
        stopped = False

        async def stop_when_told():
            nonlocal stopped
            while not progress.should_stop():
                await asyncio.sleep(_STOP_POLL_SECONDS)
            stopped = True
            stream.cancel()  # the model sees request.is_cancelled() before its next step

        watcher = asyncio.get_running_loop().create_task(stop_when_told())
        try:
            async for result, error in stream:
                if error is not None:
                    exc = self._mapped(str(error), replica)
                    raise TrainingStopped(str(exc)) if stopped or isinstance(exc, GenerationCancelled) else exc
                response = wire.read_training_response(result.as_numpy)
                if response.adapter is not None:
                    return response.adapter
                if response.checkpoint is not None:
                    await asyncio.to_thread(progress.checkpoint, response.step, response.checkpoint)
                else:
                    progress.step(response.step, spec.steps, response.loss)
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as exc:
            if stopped:
                raise TrainingStopped("the job was stopped") from None
            if isinstance(exc, asyncio.CancelledError):
                stream.cancel()
                raise
            raise self._unavailable(f"{exc.code().name}: {exc.details()}", replica) from exc
        finally:
            watcher.cancel()
        if stopped:
            raise TrainingStopped("the job was stopped")
        raise self._unavailable("Triton closed the training stream before the adapter", replica)

    def _count(self, code: str) -> None:
        if self.triton_metrics is not None:
            self.triton_metrics.errors.labels(code).inc()

    def _unavailable(self, detail: str, replica: Replica) -> BackendUnavailable:
        self._count("UNAVAILABLE")
        # A channel that failed to connect backs off for up to minutes before trying again; a fresh
        # one connects as soon as Triton is back. Other replicas take the new requests until the
        # probe sees this one ready again.
        if replica.client is not None:
            asyncio.get_running_loop().create_task(replica.client.close())
            replica.client = None
        self.router.set_ready(replica, False)
        return BackendUnavailable(f"the Triton model server at {replica.address} is unavailable ({detail}); retry later")

    def _mapped(self, message: str, replica: Replica) -> Exception:
        """The domain error of a model's error message (wire.py's status form)."""
        code, detail = wire.parse_status(message)
        if code == "UNAVAILABLE":  # a model not loaded: this replica is not ready
            return self._unavailable(message, replica)
        self._count(code)
        error = wire.error_for(code, detail, message)
        if isinstance(error, Busy):
            return BackendBusy(str(error))
        return error

    async def close(self) -> None:
        if self.supervisor is not None:  # first: it must not restart the server closed below
            await self.supervisor.stop()
        await self.router.stop()
        for replica in list(self.router.replicas.values()):
            await self._close_replica(replica)
        if self.server is not None:
            await asyncio.to_thread(self.server.close)
