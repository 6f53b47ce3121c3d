"""OpenTelemetry tracing and structured logs for the gateway.

Off unless the standard OpenTelemetry variables ask for it (`wanted`):

    OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317       # or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    OTEL_TRACES_EXPORTER=otlp                               # (the default with an endpoint set); console; none
    OTEL_SDK_DISABLED=true                                  # off whatever else is set
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*,
    OTEL_EXPORTER_OTLP_(TRACES_)HEADERS / _INSECURE / _CERTIFICATE / _TIMEOUT / _COMPRESSION,
    OTEL_PROPAGATORS                                        # read by the SDK and the OTLP exporter as usual

When off, no provider exists and every helper here returns at once: `span()` hands back one shared
do-nothing context manager, `edit_phases()` its argument, `inject_headers()` None (measured in
bench/bench_tracing.py). When on, spans go through a BatchSpanProcessor to an OTLP/gRPC exporter
(OTLP/HTTP, Triton's only protocol, is not installed: point the gateway at the collector's gRPC port).

The provider is this module's own (not the OpenTelemetry global, which can be set once per process):
the gateway configures it at start (`configure`) and flushes it at stop (`shutdown`).

Request ids: every RPC has one (the caller's `x-request-id` metadata when well formed, else a new
one), sent back as trailing metadata and held in a context variable that log records read
(`LogContext`); with tracing on they also carry the current trace and span ids. `setup_logging`
installs it with a text or JSON (one object a line) formatter.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time
from typing import Any, Iterable, Mapping

log = logging.getLogger("steerserve.tracing")

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}")
_PROPAGATION_HEADERS = ("traceparent", "tracestate", "baggage")

# The request id of the RPC being served ("" outside one); log records read it.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("steerserve_request_id", default="")

_provider = None  # the SDK TracerProvider while tracing is on
_tracer = None  # its tracer for this package
_enabled = False


# -- configuration ------------------------------------------------------------------------------


def _exporters(env: Mapping[str, str]) -> list[str]:
    """The span exporters the standard variables ask for ([] = tracing off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if named:
        return [] if "none" in named else named
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ["otlp"]
    return []


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the standard variables turn tracing on."""
    return bool(_exporters(os.environ if env is None else env))


def _exporter(name: str, env: Mapping[str, str]):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not available here; use otlp, console or none")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip()
    if protocol != "grpc":
        raise ValueError(f"OTLP protocol {protocol!r} is not installed; the gateway exports OTLP over gRPC "
                         "(set OTEL_EXPORTER_OTLP_PROTOCOL=grpc and the collector's gRPC port, usually 4317)")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # Headers, certificates, timeout and compression come from the variables themselves; the
    # endpoint and plaintext switch from `env` (the same variables unless a caller passes its own).
    insecure = env.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE") or env.get("OTEL_EXPORTER_OTLP_INSECURE")
    return OTLPSpanExporter(
        endpoint=env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
        insecure=None if insecure is None else insecure.strip().lower() == "true")


def configure(service_name: str = "steerserve-gateway", env: Mapping[str, str] | None = None) -> bool:
    """Turns tracing on when the standard variables ask for it (see the module's docstring); True
    when it is on. Idempotent: a second call while on keeps the provider it has."""
    global _provider, _tracer, _enabled
    env = os.environ if env is None else env
    if _enabled:
        return True
    names = _exporters(env)
    if not names:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    try:
        exporters = [_exporter(name, env) for name in names]
    except ValueError as exc:
        log.error("tracing stays off: %s", exc)
        return False
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over the name given here.
    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER (parent-based, always on)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* sizes and delays
    from service import __version__

    _provider, _tracer, _enabled = provider, provider.get_tracer("steerserve", __version__), True
    log.info("tracing on: %s spans of %s", "+".join(names), resource.attributes.get(SERVICE_NAME))
    return True


def shutdown(timeout_s: float = 10.0) -> None:
    """Exports what is buffered and turns tracing off (the gateway's stop)."""
    global _provider, _tracer, _enabled
    provider, _provider, _tracer, _enabled = _provider, None, None, False
    if provider is not None:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()


def enabled() -> bool:
    return _enabled


def flush(timeout_s: float = 10.0) -> bool:
    """Exports the spans ended so far (tests, benchmarks)."""
    return _provider.force_flush(int(timeout_s * 1000)) if _provider is not None else True


# -- spans --------------------------------------------------------------------------------------


class _NoSpan:
    """The do-nothing stand-in `span()` yields when tracing is off: attribute setters do nothing."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_attribute(self, key, value):
        pass

    def set_attributes(self, attributes):
        pass

    def add_event(self, name, attributes=None, timestamp=None):
        pass

    def is_recording(self) -> bool:
        return False


NO_SPAN = _NoSpan()


def span(name: str, attributes: Mapping[str, Any] | None = None, kind: str = "internal", links_to: str = ""):
    """A child span of the current one around a `with` block (an exception in it marks the span as
    failed and passes on); `kind` "internal" or "client" (a call to another server); `links_to`: a
    W3C traceparent this span links to (a job attempt -> the Personalize call that queued it: work
    that outlives its request gets its own trace, linked, as OpenTelemetry advises). The shared
    NO_SPAN when tracing is off: build costly attributes under `if span.is_recording():`."""
    if not _enabled:
        return NO_SPAN
    from opentelemetry.trace import Link, SpanKind, get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    links = None
    if links_to:
        linked = get_current_span(TraceContextTextMapPropagator().extract({"traceparent": links_to})).get_span_context()
        links = [Link(linked)] if linked.is_valid else None
    return _tracer.start_as_current_span(name, kind=SpanKind.CLIENT if kind == "client" else SpanKind.INTERNAL,
                                         attributes=attributes, links=links)


def start_span(name: str, attributes: Mapping[str, Any] | None = None):
    """A child span of the current one that the caller ends (`end_span`); None when off."""
    if not _enabled:
        return None
    return _tracer.start_span(name, attributes=attributes)


def end_span(span_, error: BaseException | None = None) -> None:
    if span_ is None or not span_.is_recording():
        return
    if error is not None:
        _fail(span_, error)
    span_.end()


def _fail(span_, error: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span_.record_exception(error)
    span_.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def inject_headers() -> dict[str, str] | None:
    """W3C trace context (`traceparent`, `tracestate`) of the current span, as headers for an
    outgoing call (Triton's requests); None when tracing is off."""
    if not _enabled:
        return None
    from opentelemetry import propagate

    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


def set_current(attributes: Mapping[str, Any]) -> None:
    """Attributes on the current span (nothing when off)."""
    if _enabled:
        from opentelemetry import trace

        trace.get_current_span().set_attributes(attributes)


def generation_attributes(spec, backend: str) -> dict[str, Any]:
    """A backend span's attributes for a GenerationSpec (no prompt text: it is the tenant's data)."""
    return {"steerserve.backend": backend, "steerserve.steps": spec.steps, "steerserve.width": spec.width,
            "steerserve.height": spec.height, "steerserve.num_images": spec.num_images,
            "steerserve.adapters": len(spec.adapters), "steerserve.style_guidance": spec.uses_style_guidance,
            "steerserve.image_prompt": spec.image_prompt is not None}


def edit_attributes(spec, backend: str) -> dict[str, Any]:
    return {"steerserve.backend": backend, "steerserve.edit.method": spec.method,
            "steerserve.steps": spec.options.iterations, "steerserve.width": spec.width,
            "steerserve.height": spec.height, "steerserve.adapter_method": spec.adapter_method}


def training_attributes(spec, backend: str, resume) -> dict[str, Any]:
    return {"steerserve.backend": backend, "steerserve.training.method": spec.method,
            "steerserve.training.steps": spec.steps, "steerserve.training.resumed": resume is not None}


# -- the RPC span -------------------------------------------------------------------------------


def request_id(metadata: Iterable[tuple[str, str]] | None) -> str:
    """The caller's `x-request-id` when well formed (1-128 of [A-Za-z0-9._:/+=@-], starting
    alphanumeric), else a new one (32 hex digits)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            if isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value):
                return value
            break
    return os.urandom(16).hex()


class RpcSpan:
    """The SERVER span of one RPC, current until `end`: continues the caller's trace (W3C
    `traceparent` metadata), named `<package.Service>/<Method>` with the rpc.* attributes."""

    __slots__ = ("span", "_token")

    def __init__(self, service: str, method: str, metadata, request_id_: str):
        from opentelemetry import context, propagate, trace
        from opentelemetry.trace import SpanKind

        carrier = {key: value for key, value in metadata or () if key in _PROPAGATION_HEADERS}
        parent = propagate.extract(carrier) if carrier else context.Context()
        self.span = _tracer.start_span(f"{service}/{method}", context=parent, kind=SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": method, "steerserve.request_id": request_id_,
        })
        self._token = context.attach(trace.set_span_in_context(self.span, parent))

    def set_tenant(self, tenant: str) -> None:
        self.span.set_attribute("steerserve.tenant", tenant)

    def end(self, code, message: str = "", error: BaseException | None = None) -> None:
        """Records the gRPC status (`code`, a grpc.StatusCode) and ends the span. Per OpenTelemetry's
        gRPC conventions a server span is an error only for the server's own failures (UNKNOWN,
        DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS); the caller's
        (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED ...) show in rpc.grpc.status_code only."""
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        s = self.span
        s.set_attribute("rpc.grpc.status_code", code.value[0])
        if code.name in _SERVER_ERRORS:
            if error is not None and code.name in ("UNKNOWN", "INTERNAL"):
                s.record_exception(error)
            s.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}" if message else code.name))
        elif code.name != "OK" and message:
            s.set_attribute("steerserve.status_message", message)
        try:
            context.detach(self._token)
        except Exception:  # noqa: BLE001 - a stream closed from another context: the span still ends
            pass
        s.end()


_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


def rpc_span(service: str, method: str, metadata, request_id_: str) -> RpcSpan | None:
    """The RPC's SERVER span, current until its `end`; None when tracing is off."""
    if not _enabled:
        return None
    return RpcSpan(service, method, metadata, request_id_)


# -- the edit phases ----------------------------------------------------------------------------


class _EditPhases:
    """An EditProgress that turns the phases an edit reports into child spans `edit.<phase>` of
    the span current where it was made (then passes every report on). Phases run one after another
    and each reports its last step (service.edit.spec.throttled), so a phase runs from the previous
    phase's last report (the first: from this object's creation) to its own last report."""

    def __init__(self, inner):
        from opentelemetry import context

        self.inner = inner
        self.parent = context.get_current()
        self.phase: str | None = None
        self.span = None
        self.last = time.time_ns()

    def __call__(self, phase: str, step: int, total: int) -> None:
        now = time.time_ns()
        if phase != self.phase:
            if self.span is not None:
                self.span.end(end_time=self.last)
            self.span = _tracer.start_span(f"edit.{phase}", context=self.parent, start_time=self.last,
                                           attributes={"steerserve.edit.phase": phase, "steerserve.edit.steps": total})
            self.phase = phase
        self.last = now
        if self.inner is not None:
            self.inner(phase, step, total)

    def close(self) -> None:
        if self.span is not None:
            self.span.end(end_time=self.last)
            self.span = None


def edit_phases(progress):
    """`progress` with a span per edit phase when tracing is on (close it with `close_phases`);
    `progress` itself (possibly None) when off."""
    if not _enabled:
        return progress
    return _EditPhases(progress)


def close_phases(progress) -> None:
    if isinstance(progress, _EditPhases):
        progress.close()


class TracedProgress:
    """A personalize.Progress that adds an event to the current span per checkpoint (and at the
    first step: the setup before it, e.g. a model copy loading, shows as the gap)."""

    def __init__(self, inner, span_):
        self.inner, self.span, self._first = inner, span_, True

    def step(self, step: int, total: int, loss: float) -> None:
        if self._first:
            self._first = False
            self.span.add_event("first step", {"steerserve.training.step": step})
        self.inner.step(step, total, loss)

    def checkpoint(self, step: int, state: bytes) -> None:
        self.span.add_event("checkpoint", {"steerserve.training.step": step, "steerserve.training.bytes": len(state)})
        self.inner.checkpoint(step, state)

    def should_stop(self) -> bool:
        return self.inner.should_stop()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def traced_progress(progress, span_):
    return TracedProgress(progress, span_) if span_ is not None and span_.is_recording() else progress


# -- logs ---------------------------------------------------------------------------------------


class LogContext(logging.Filter):
    """Puts `request_id`, `trace_id` and `span_id` ("" when none) on every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.trace_id = record.span_id = ""
        if _enabled:
            from opentelemetry import trace

            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                record.trace_id, record.span_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        return True


_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "request_id", "trace_id", "span_id", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id, trace_id,
    span_id (each when set), the exception when there is one, and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_handler(fmt: str = "text", stream=None) -> logging.Handler:
    """A stream handler with the LogContext filter and the `fmt` ("text" or "json") formatter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(LogContext())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def setup_logging(fmt: str = "text", level: int = logging.INFO, access_log: bool = False) -> None:
    """The root logger to stderr as `fmt` ("text" or "json", STEERSERVE_LOG_FORMAT); `access_log`:
    a line per RPC on logger steerserve.access (STEERSERVE_ACCESS_LOG)."""
    logging.basicConfig(level=level, handlers=[log_handler(fmt)], force=True)
    logging.getLogger("steerserve.access").setLevel(logging.INFO if access_log else logging.WARNING)

