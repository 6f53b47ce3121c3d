"""The SteerServe RPC handlers: authenticate, validate, call the backend or a store, answer.

Every handler runs inside `_rpc` (unary or server-streaming alike), which does what all RPCs share:
metrics, request id, trace span and access log, authentication (the handler gets the tenant), and
turning exceptions into gRPC statuses with a message that names the problem (`_status_for`). What
the answers look like on the wire is in messages.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import re
import time
from typing import Callable

import grpc

from service import __version__, tracing
from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from service.adapters import Adapter, AdapterBankFull, AdapterFormatError, AdapterNotFoundError
from service.adapters import parse_adapter, serialize_adapter
from service.admission import Admission, edit_cost, generate_cost
from service.backends import Backend
from service.config import Settings
from service.edit import DREAMSTEERER, EditRefused, EditSpec
from service.edit.spec import overall_progress, phases
from service.errors import Busy, InvalidRequest, Unavailable
from service.engine.pipeline import AdapterUse, GenerationCancelled
from service.image_prompt import stored as image_prompt_store
from service.image_prompt.files import ImagePromptFileError
from service.jobs import JobRunner, NameTaken, QueueFull
from service.personalize import FINESTYLE, SUBJECT_METHODS
from service.personalize.tokens import TokenError
from service.stores import idempotency
from service.stores import (
    AdapterAlreadyExists, AdapterRecord, AdapterStore, JobRecord, NotFound, QuotaExceeded, is_database_unavailable,
    is_disk_full,
)

from . import validation
from .auth import Authenticator
from .errors import ServiceError, invalid, not_found
from .messages import adapter_contents, adapter_message, edit_response, generate_response, job_event, job_message, profile_message
from .metrics import GatewayMetrics

log = logging.getLogger("steerserve.gateway")
access_log = logging.getLogger("steerserve.access")  # a line per RPC when STEERSERVE_ACCESS_LOG is on

_SERVICE = pb.DESCRIPTOR.services_by_name["SteerServe"].full_name

_JOB_POLL_SECONDS = 0.25


def _rpc(handler):
    """Wraps a handler `(self, request, context, tenant)` -- a coroutine for a unary RPC, an async
    generator for a server-streaming one -- in `_served`."""
    name = handler.__name__

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def streaming(self: "SteerServeServicer", request, context: grpc.aio.ServicerContext):
            async with _served(self, name, context) as tenant:
                async for message in handler(self, request, context, tenant):
                    yield message

        return streaming

    @functools.wraps(handler)
    async def unary(self: "SteerServeServicer", request, context: grpc.aio.ServicerContext):
        async with _served(self, name, context) as tenant:
            return await handler(self, request, context, tenant)

    return unary


@contextlib.asynccontextmanager
async def _served(servicer: "SteerServeServicer", name: str, context: grpc.aio.ServicerContext):
    """What every RPC shares, around its handler (which gets the tenant): in-flight, duration and
    per-code metrics, the `_Call` (request id, trace span, access log), authentication, and any
    exception turned into a status (`_status_for`) with the retry-pushback trailer where it has one."""
    m = servicer.metrics
    m.rpc_in_flight.labels(name).inc()
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    call = _Call(name, context)
    try:
        call.tenant = servicer.auth.tenant_for(call.metadata)
        yield call.tenant
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a crash
        code, message = _status_for(exc)
        call.failed(message, exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", name)
        await context.abort(code, message, _pushback(exc) + call.trailer)
    finally:
        m.rpc_in_flight.labels(name).dec()
        m.rpc_duration.labels(name).observe(time.perf_counter() - started)
        m.rpc_requests.labels(name, code.name).inc()
        call.end(code, started)


class _Call:
    """What `_served` keeps of one call beside metrics: its request id (the caller's `x-request-id`
    when well formed, else a new one; sent back as trailing metadata and put on log records), its
    trace span (tracing on only), and the access-log line at its end."""

    __slots__ = ("name", "context", "metadata", "request_id", "trailer", "span", "tenant", "message", "error")

    def __init__(self, name: str, context: grpc.aio.ServicerContext):
        self.name, self.context = name, context
        self.metadata = context.invocation_metadata()
        self.request_id = rid = tracing.request_id(self.metadata)
        tracing.REQUEST_ID.set(rid)  # each RPC runs in its own task (its own context)
        self.trailer = ((tracing.REQUEST_ID_HEADER, rid),)
        context.set_trailing_metadata(self.trailer)
        self.span = tracing.rpc_span(_SERVICE, name, self.metadata, rid)
        self.tenant = self.message = ""
        self.error = None

    def failed(self, message: str, error: BaseException) -> None:
        self.message, self.error = message, error

    def end(self, code: grpc.StatusCode, started: float) -> None:
        if code == grpc.StatusCode.CANCELLED and (self.context.time_remaining() or 1.0) < 0.1:
            # gRPC cancelled it at the caller's deadline (read here a few ms early): log and trace
            # what the caller saw.
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        if access_log.isEnabledFor(logging.INFO):
            seconds = time.perf_counter() - started
            access_log.info("%s %s %.3fs", self.name, code.name, seconds, extra={
                "rpc": self.name, "code": code.name, "duration_s": round(seconds, 6), "tenant": self.tenant})
        if self.span is not None:
            if self.tenant:
                self.span.set_tenant(self.tenant)
            self.span.end(code, self.message, self.error)


def _pushback(exc: Exception) -> tuple[tuple[str, str], ...]:
    """gRPC's standard retry-pushback trailer for a refusal that knows when a retry may succeed
    (admission's wait estimate); clients (steerserve_client, gRPC's own retry policy) wait that long."""
    seconds = getattr(exc, "retry_after_s", None)
    if seconds is None or not math.isfinite(seconds):
        return ()
    return (("grpc-retry-pushback-ms", str(max(1, int(seconds * 1000)))),)


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (AdapterAlreadyExists, NameTaken)):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, (QueueFull, QuotaExceeded)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EditRefused):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, TokenError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"token: {exc}"
    if isinstance(exc, GenerationCancelled):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded: {exc}"
    if isinstance(exc, (Busy, AdapterBankFull)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, AdapterNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, AdapterFormatError):
        # Imports are validated up front, so a stored adapter that fails to load is damaged.
        return grpc.StatusCode.FAILED_PRECONDITION, f"a stored adapter cannot be loaded: {exc}"
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if is_database_unavailable(exc):  # PostgreSQL restarting or unreachable: nothing was committed
        return grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry later"
    if is_disk_full(exc):  # the stores removed what they had begun to write
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server's storage is full ({exc}); nothing was stored"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server logs"


def _names_token(prompt: str, word: str) -> bool:
    """Whether `word` occurs in `prompt` as a whole word (a placeholder such as "<sks>" as is)."""
    if not word:
        return False
    pattern = re.escape(word)
    if word[:1].isalnum():
        pattern = r"(?<!\w)" + pattern
    if word[-1:].isalnum():
        pattern += r"(?!\w)"
    return re.search(pattern, prompt) is not None


IMAGE_PROMPT = "IMAGE_PROMPT"  # the adapter method of a stored image prompt (CreateImagePrompt)


def _imported_method(adapter: Adapter) -> str:
    """What an imported file looks like: a file that says it is a style adapter (our FineStyle
    export) = FineStyle; tokens only = Textual Inversion; LoRA on cross-attention K/V only
    (+ tokens) = Custom Diffusion; any other LoRA = DreamBooth-LoRA."""
    if adapter.kind == "style":
        return FINESTYLE
    if not adapter.lora:
        return "TEXTUAL_INVERSION"
    if all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in adapter.lora):
        return "CUSTOM_DIFFUSION"
    return "DREAMBOOTH_LORA"


class SteerServeServicer(pb_grpc.SteerServeServicer):
    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        adapters: AdapterStore,
        jobs: JobRunner,
        metrics: GatewayMetrics,
        check_adapter: Callable[[Adapter], Adapter],
        admission: Admission | None = None,
    ):
        self.settings = settings
        self.check_adapter = check_adapter  # raises AdapterFormatError for what the model cannot serve
        self.backend = backend
        self.adapter_store = adapters
        self.jobs = jobs
        self.job_store = jobs.store
        self.metrics = metrics
        self.auth = Authenticator(settings.api_keys)
        self.limits = validation.Limits(settings=settings, model=backend.limits)
        # The one request queue (Generate, Edit, and job previews through the job runner).
        self.admission = admission or Admission(settings.admission_limits(backend.name), metrics,
                                                width=getattr(backend, "batch_width", None))

    async def _admitted(self, tenant: str, kind: str, cost: float, context, work):
        """``work(deadline)`` once admission lets it run (RESOURCE_EXHAUSTED at once if it would not
        finish in time or the tenant is over its limits); its queue time includes admission's."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        arrived = time.monotonic()
        started = []
        # From arrival until the work starts (or admission refuses it); the work is its sibling.
        waiting = tracing.start_span("admission.wait", {"steerserve.admission.kind": kind,
                                                        "steerserve.admission.cost": float(cost)})

        async def run():
            started.append(time.monotonic())
            tracing.end_span(waiting)
            return await work(deadline)

        try:
            result = await self.admission.run(tenant, kind, cost, deadline, run)
        except BaseException as exc:
            if not started:
                tracing.end_span(waiting, exc)
            raise
        result.timings["queue_seconds"] = result.timings.get("queue_seconds", 0.0) + started[0] - arrived
        return result

    # -- Generate ------------------------------------------------------------------------------

    @_rpc
    async def Generate(self, request: pb.GenerateRequest, context, tenant: str) -> pb.GenerateResponse:
        with tracing.span("validate"):
            spec, refs = validation.generate_spec(request, self.limits, self.backend.count_tokens)
            # Adapter ids resolve within the tenant only (`_adapter`).
            uses, stored_prompts = [], []
            for i, (adapter_id, weight) in enumerate(refs):
                record = self._adapter(tenant, adapter_id, f"adapters[{i}].adapter_id")
                if record.method == IMAGE_PROMPT:  # tokens, not weights: conditioning of every row
                    # Its weight is its scale; 0 (unset) the profile's, as for reference_images.
                    if request.adapters[i].weight == 0:
                        weight = validation.image_prompt_scale(f"adapters[{i}].weight", 0.0, self.limits)
                    stored_prompts.append((f"adapters[{i}]", record, weight))
                    continue
                uses.append(AdapterUse(key=record.key, weight=weight, style=record.method == FINESTYLE,
                                       tenant=tenant))
            spec.adapters = tuple(uses)
            spec.image_prompt = await self._image_prompt(request, stored_prompts)
            if spec.style_guidance_scale > 0 and not spec.uses_style_guidance:
                raise invalid("style_guidance_scale", "applies to FINESTYLE adapters and none of adapters is one; "
                                                      "leave it 0 or add a style adapter")
        result = await self._admitted(tenant, "generate", generate_cost(spec), context,
                                      lambda deadline: self.backend.generate(spec, deadline))
        self.metrics.images.inc(len(result.images))
        self.metrics.denoising_steps.inc(spec.steps)
        return generate_response(result)

    def _serves_image_prompts(self, field: str) -> str:
        """What stored image prompts belong to, or FAILED_PRECONDITION naming why none are served."""
        model = self.backend.image_prompt_model
        if model is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, (
                f"{field}: this server serves no image prompts (model {self.backend.model_name}): it needs an "
                "IP-Adapter for the model (STEERSERVE_IMAGE_PROMPT_ADAPTER) and STEERSERVE_IMAGE_PROMPTS on"))
        return model

    async def _image_prompt(self, request, stored: list):
        """The request's (Generate's or Edit's) one image prompt: its reference_images encoded now,
        or a stored IMAGE_PROMPT adapter's tokens (weight = scale); None without either."""
        if request.image_prompt_scale and not request.reference_images and not (stored and isinstance(request, pb.EditRequest)):
            raise invalid("image_prompt_scale", "applies to reference_images (a stored image prompt's scale is its weight)")
        if not request.reference_images and not stored:
            return None
        if len(stored) + bool(request.reference_images) > 1:
            raise invalid(stored[-1][0] if stored else "reference_images",
                          "a request takes one image prompt: reference_images or one IMAGE_PROMPT adapter")
        field = "reference_images" if request.reference_images else stored[0][0]
        model = self._serves_image_prompts(field)
        if stored:
            field, record, weight = stored[0]
            if not 0 < weight <= 2.0:
                raise invalid(f"{field}.weight", f"an image prompt's weight is its scale: between 0 and 2 (got {weight})")
            try:
                return image_prompt_store.parse(self.adapter_store.read_blob(record), model, weight)
            except ImagePromptFileError as exc:
                raise invalid(f"{field}.adapter_id", f"image prompt {record.adapter_id!r} was {exc}") from None
        photos = validation.reference_images("reference_images", request.reference_images, self.limits,
                                             self.backend.max_image_prompt_images, required=True)
        scale = validation.image_prompt_scale("image_prompt_scale", request.image_prompt_scale, self.limits)
        return await self.backend.encode_image_prompt(photos, scale)

    # -- Personalize and jobs ------------------------------------------------------------------

    @_rpc
    async def Personalize(self, request: pb.PersonalizeRequest, context, tenant: str) -> pb.Job:
        with tracing.span("validate"):
            validation.personalize_request(request, self.limits, self.backend.count_tokens)
        # Checks the name and token against the tenant's adapters and jobs, then queues: the job
        # row is committed before this returns (or, for a known idempotency key, the key's job).
        with tracing.span("jobs.submit"):
            return job_message(self.jobs.submit(tenant, request, self.backend.tokenizer))

    @_rpc
    async def GetJob(self, request: pb.GetJobRequest, context, tenant: str) -> pb.Job:
        return self._job_with_previews(self.job_store.get(tenant, validation.check_id("job_id", request.job_id)))

    @_rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context, tenant: str) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[job_message(j) for j in self.job_store.list(tenant)])

    @_rpc
    async def CancelJob(self, request: pb.CancelJobRequest, context, tenant: str) -> pb.Job:
        return self._job_with_previews(self.jobs.cancel(tenant, validation.check_id("job_id", request.job_id)))

    @_rpc
    async def WatchJob(self, request: pb.WatchJobRequest, context, tenant: str):
        """Server-streaming: one event per observed change (committed rows, polled), then ends when
        the job finishes; the last event's job carries the previews."""
        job_id = validation.check_id("job_id", request.job_id)
        last = None
        while True:
            job = self.job_store.get(tenant, job_id)
            seen = (job.state, job.step, job.loss, job.error, job.message)
            if seen != last:
                last = seen
                yield job_event(job, self._job_with_previews(job) if job.state.finished else job_message(job))
            if job.state.finished:
                return
            await asyncio.sleep(_JOB_POLL_SECONDS)

    def _job_with_previews(self, job: JobRecord) -> pb.Job:
        return job_message(job, self.job_store.previews(job.job_id))

    # -- Edit ----------------------------------------------------------------------------------

    @_rpc
    async def Edit(self, request: pb.EditRequest, context, tenant: str) -> pb.EditResponse:
        with tracing.span("validate"):
            spec = await self._edit_spec(request, tenant)
        return await self._edit(spec, context, tenant)

    @_rpc
    async def EditStream(self, request: pb.EditRequest, context, tenant: str):
        """Server-streaming Edit: an event per progress report (at most a few a second), then the
        result. Errors end the stream with the same statuses as Edit."""
        with tracing.span("validate"):
            spec = await self._edit_spec(request, tenant)
        plan = phases(spec)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        def progress(phase: str, step: int, total: int) -> None:  # on an engine thread, throttled by the backend
            event = pb.EditEvent(phase=phase, step=step, total_steps=total,
                                 progress=overall_progress(plan, phase, step, total))
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the gateway's loop is closing: progress has no one to reach
                pass

        yield pb.EditEvent(phase="queued", total_steps=0, progress=0.0)
        task = asyncio.ensure_future(self._edit(spec, context, tenant, progress))
        getter = None
        try:
            while not task.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield pb.EditEvent(phase="done", progress=1.0, result=task.result())
        finally:
            if getter is not None:
                getter.cancel()
            task.cancel()  # the client went away: the edit stops at its next step

    async def _edit_spec(self, request: pb.EditRequest, tenant: str) -> EditSpec:
        """The validated spec with the tenant's adapter resolved: NOT_FOUND for an id the tenant
        does not own; FAILED_PRECONDITION for an adapter DreamSteerer cannot steer. DDS takes an
        image prompt (reference_images, or an IMAGE_PROMPT adapter) on its target branch."""
        spec = validation.edit_request(request, self.limits, self.backend.count_tokens)
        record = self._adapter(tenant, request.adapter_id, "adapter_id") if request.adapter_id else None
        # EditRequest has no adapter weight: image_prompt_scale scales a stored image prompt too.
        stored = ([("adapter_id", record, validation.image_prompt_scale("image_prompt_scale", request.image_prompt_scale,
                                                                         self.limits))]
                  if record is not None and record.method == IMAGE_PROMPT else [])
        if request.reference_images or stored or request.image_prompt_scale:
            if spec.method == DREAMSTEERER:
                field = ("reference_images" if request.reference_images else "adapter_id" if stored
                         else "image_prompt_scale")
                raise invalid(field, "DreamSteerer steers a trained subject adapter; an image prompt edits with method DDS")
            if not self.backend.edits_take_image_prompts and (request.reference_images or stored):
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, (
                    f"{'reference_images' if request.reference_images else 'adapter_id'}: edits with an image prompt "
                    f"are served by the in-process backend only (this server's is {self.backend.name})"))
            spec.image_prompt = await self._image_prompt(request, stored)
        if record is None or stored:
            return spec
        if spec.method == DREAMSTEERER and record.method not in SUBJECT_METHODS:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, (
                f"adapter_id: DreamSteerer steers subject adapters (DREAMBOOTH_LORA, TEXTUAL_INVERSION, "
                f"CUSTOM_DIFFUSION); adapter {record.adapter_id!r} is {record.method}"))
        if spec.method == DREAMSTEERER and not record.token:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, (
                f"adapter_id: adapter {record.adapter_id!r} has no token, so no word of the target prompt names "
                "its concept; re-import it with its token"))
        if record.token and not _names_token(request.target_prompt, record.token):
            raise invalid("target_prompt", f"must name the adapter's concept by its token {record.token!r} "
                                           f"(e.g. 'a {record.token} {record.class_word or 'thing'} ...')")
        spec.adapter = AdapterUse(key=record.key, tenant=tenant)
        spec.adapter_method = record.method
        spec.token = record.token
        spec.class_word = record.class_word if _names_token(request.target_prompt, record.class_word) else ""
        return spec

    async def _edit(self, spec: EditSpec, context, tenant: str, progress=None) -> pb.EditResponse:
        edited = await self._admitted(tenant, "edit", edit_cost(spec), context,
                                      lambda deadline: self.backend.edit(spec, deadline, progress))
        self.metrics.edits.labels(spec.method).inc()
        self.metrics.images.inc()
        return edit_response(edited, spec.seed)

    # -- Adapters ------------------------------------------------------------------------------

    def _adapter(self, tenant: str, adapter_id: str, field: str) -> AdapterRecord:
        """The tenant's adapter a request names in `field`: another tenant's id is simply NOT_FOUND."""
        try:
            return self.adapter_store.get(tenant, adapter_id)
        except NotFound:
            raise not_found(f"{field}: adapter {adapter_id!r} not found")

    @_rpc
    async def ImportAdapter(self, request: pb.ImportAdapterRequest, context, tenant: str) -> pb.Adapter:
        name = validation.check_name("name", request.name)
        key = idempotency.check_key(request.idempotency_key) if request.idempotency_key else ""
        if not request.safetensors:
            raise invalid("safetensors", "must hold a LoRA safetensors file (got 0 bytes)")
        if len(request.safetensors) > self.settings.max_adapter_bytes:
            raise invalid("safetensors", f"is {len(request.safetensors)} bytes; at most {self.settings.max_adapter_bytes}")
        if not math.isfinite(request.alpha) or request.alpha < 0:
            raise invalid("alpha", f"must be a positive number (got {request.alpha})")
        token = request.token.strip()
        if any(c.isspace() for c in token):
            raise invalid("token", "must be a single word")
        try:
            adapter = parse_adapter(request.safetensors, default_alpha=request.alpha or None, token=token or None)
            # Checked against the exact layers the serving bank has: a file the model cannot
            # serve is refused here, never stored and never half-loaded later.
            adapter = self.check_adapter(adapter)
        except AdapterFormatError as exc:
            raise invalid("safetensors", str(exc)) from exc
        tokens = list(adapter.token_embeddings)
        active = self.job_store.active(tenant)
        if any(j.name == name for j in active):
            raise NameTaken(f"name: a personalization job named {name!r} is queued or running")
        record = self.adapter_store.create(
            tenant, name, _imported_method(adapter), serialize_adapter(adapter),
            token=token or (tokens[0] if tokens else ""), rank=adapter.max_rank,
            num_parameters=adapter.num_parameters, source="import",
            idempotency=(key, idempotency.fingerprint(request)) if key else None,
        )
        message = adapter_message(record)
        # What was read, for the caller to check (the import check's bank knows which layers are convs).
        bank = getattr(self.check_adapter, "__self__", None)
        message.contents.CopyFrom(adapter_contents(adapter, getattr(bank, "module_shapes", None)))
        return message

    @_rpc
    async def ListAdapters(self, request, context, tenant: str) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=[adapter_message(r) for r in self.adapter_store.list(tenant)])

    @_rpc
    async def GetAdapter(self, request: pb.GetAdapterRequest, context, tenant: str) -> pb.Adapter:
        return adapter_message(self.adapter_store.get(tenant, validation.check_id("adapter_id", request.adapter_id)))

    @_rpc
    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, context, tenant: str) -> pb.DeleteAdapterResponse:
        record = self.adapter_store.delete(tenant, validation.check_id("adapter_id", request.adapter_id))
        # Its slot can go (another tenant holding the same bytes just loads them again).
        self.backend.forget_adapter(record.key)
        return pb.DeleteAdapterResponse()

    @_rpc
    async def ExportAdapter(self, request: pb.ExportAdapterRequest, context, tenant: str) -> pb.ExportAdapterResponse:
        record = self.adapter_store.get(tenant, validation.check_id("adapter_id", request.adapter_id))
        return pb.ExportAdapterResponse(adapter=adapter_message(record), safetensors=self.adapter_store.read_blob(record))

    @_rpc
    async def CreateImagePrompt(self, request: pb.CreateImagePromptRequest, context, tenant: str) -> pb.Adapter:
        """No job: the photos' tokens are the adapter (service/image_prompt/stored.py)."""
        name = validation.check_name("name", request.name)
        model = self._serves_image_prompts("images")
        photos = validation.reference_images("images", request.images, self.limits,
                                             self.backend.max_image_prompt_images, required=True)
        if any(j.name == name for j in self.job_store.active(tenant)):
            raise NameTaken(f"name: a personalization job named {name!r} is queued or running")
        prompt = await self.backend.encode_image_prompt(photos, 1.0)
        record = self.adapter_store.create(
            tenant, name, IMAGE_PROMPT, image_prompt_store.serialize(prompt, model, len(photos)),
            num_parameters=prompt.tokens.numel(), source="image_prompt")
        return adapter_message(record)

    # -- Info ----------------------------------------------------------------------------------

    @_rpc
    async def GetServerInfo(self, request, context, tenant: str) -> pb.ServerInfo:
        s = self.settings
        runtime, choice = await self.backend.unet_runtime()
        return pb.ServerInfo(
            version=__version__,
            base_model=self.backend.model_name,
            default_width=self.backend.limits.default_size,
            default_height=self.backend.limits.default_size,
            max_width=self.limits.max_size,
            max_height=self.limits.max_size,
            default_steps=s.default_steps,
            max_steps=s.max_steps,
            max_num_images=s.max_num_images,
            backend=self.backend.name,
            profile=profile_message(s.profile()),
            unet_runtime=runtime,
            unet_runtime_choice=choice,
            image_prompts=self.backend.image_prompt_model is not None,
            max_image_prompt_images=self.backend.max_image_prompt_images,
        )
