"""OpenTelemetry tracing end to end: a real gateway (in-process backend) exporting OTLP/gRPC to an
in-process receiver (the collector's TraceService), request ids, JSON logs, and tracing off.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from PIL import Image

from service import tracing
from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.config import Settings
from service.research.world.generator import Scene, WorldObject, render
from tests.adapter_files import lora_file, served_model_dir
from tests.conftest import TOKENS, auth, free_port, start_gateway_in_thread, stop_gateway

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SERVER, CLIENT, INTERNAL = 2, 3, 1  # OTLP span kinds
UNSET, ERROR = 0, 2  # OTLP status codes


def caller(request_id: str = "req-trace-1", trace_id: str = CALLER_TRACE) -> list[tuple[str, str]]:
    return auth() + [("traceparent", f"00-{trace_id}-{CALLER_SPAN}-01"), ("x-request-id", request_id)]


# -- the receiver -----------------------------------------------------------------------------------


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint on a loopback port that keeps every span it is sent."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self.spans.append({
                            "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(), "kind": s.kind, "status": s.status.code,
                            "status_message": s.status.message, "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano, "attributes": {a.key: _value(a.value) for a in s.attributes},
                            "events": [e.name for e in s.events], "service": resource.get("service.name"),
                            "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        })
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str, until=lambda spans: True, timeout: float = 20.0) -> list[dict]:
        """The spans of `trace_id` once `until(spans)` holds (flushing the gateway's exporter)."""
        deadline = time.monotonic() + timeout
        while True:
            tracing.flush()
            with self.lock:
                spans = [s for s in self.spans if s["trace_id"] == trace_id]
            if until(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.05)


def named(spans: list[dict], name: str) -> dict:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, (name, [s["name"] for s in spans])
    return found[0]


def has(*names):
    return lambda spans: set(names) <= {s["name"] for s in spans}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.stop(0)


@pytest.fixture(scope="module")
def logs():
    """The gateway's log records as JSON lines (with the access log on)."""
    buf = io.StringIO()
    handler = tracing.log_handler("json", buf)
    root, access = logging.getLogger("steerserve"), logging.getLogger("steerserve.access")
    old_level = access.level
    root.addHandler(handler)
    access.setLevel(logging.INFO)
    yield buf
    root.removeHandler(handler)
    access.setLevel(old_level)


@pytest.fixture(scope="module")
def traced(receiver, logs, tmp_path_factory, one_torch_thread):
    """A gateway started with OTEL_EXPORTER_OTLP_ENDPOINT pointing at the receiver."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_SERVICE_NAME": "steerserve-test",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("OTEL_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=free_port(), api_keys=dict(TOKENS),
                            data_dir=tmp_path_factory.mktemp("tracing-data"), default_steps=2, checkpoint_every=2,
                            job_previews=1)
        running = start_gateway_in_thread(settings)
        assert tracing.enabled()
        yield running
        stop_gateway(running)
    assert not tracing.enabled()


def log_lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


# -- tests --------------------------------------------------------------------------------------------


def test_generate_is_one_trace_continuing_the_callers(traced, receiver, logs):
    response, call = traced.stub().Generate.with_call(
        pb.GenerateRequest(prompt="a red circle on a blue background", steps=2, seed=1, width=32, height=32),
        metadata=caller("req-generate-1"))
    assert len(response.images) == 1
    assert ("x-request-id", "req-generate-1") in tuple(call.trailing_metadata())

    spans = receiver.trace(CALLER_TRACE, has("steerserve.v1.SteerServe/Generate", "validate", "admission.wait",
                                             "backend.generate"))
    rpc = named(spans, "steerserve.v1.SteerServe/Generate")
    assert rpc["kind"] == SERVER and rpc["parent"] == CALLER_SPAN  # the caller's trace goes on
    assert rpc["service"] == "steerserve-test"
    expected = {"rpc.system": "grpc", "rpc.service": "steerserve.v1.SteerServe", "rpc.method": "Generate",
                "rpc.grpc.status_code": 0, "steerserve.tenant": "alice", "steerserve.request_id": "req-generate-1"}
    assert {key: rpc["attributes"].get(key) for key in expected} == expected
    for child in ("validate", "admission.wait", "backend.generate"):
        span = named(spans, child)
        assert span["parent"] == rpc["span_id"], child
        assert rpc["start"] <= span["start"] <= span["end"] <= rpc["end"], child
    wait, backend = named(spans, "admission.wait"), named(spans, "backend.generate")
    assert wait["attributes"]["steerserve.admission.kind"] == "generate"
    assert wait["end"] <= backend["end"]
    assert backend["attributes"]["steerserve.steps"] == 2 and backend["attributes"]["steerserve.backend"] == "inprocess"
    assert all(s["status"] == UNSET for s in spans)

    # The access log line: JSON with the same trace and request ids, and the RPC span's id.
    lines = [line for line in log_lines(logs) if line.get("request_id") == "req-generate-1"]
    access = [line for line in lines if line["logger"] == "steerserve.access"]
    assert len(access) == 1
    assert access[0]["trace_id"] == CALLER_TRACE and access[0]["span_id"] == rpc["span_id"]
    assert access[0]["rpc"] == "Generate" and access[0]["code"] == "OK" and access[0]["tenant"] == "alice"
    assert {"time", "level", "logger", "message"} <= set(access[0])


def test_dds_edit_has_its_phase_under_the_backend_span(traced, receiver):
    source = render(Scene("stripes", "blue", (WorldObject("square", "red", "solid", 0.5, 0.5, 0.28),)))
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    request = pb.EditRequest(method=pb.DDS, steps=3, seed=1, source_image=pb.Image(data=_png(source.image)),
                             source_prompt=source.caption, target_prompt="a yellow star on a blue striped background")
    traced.stub().Edit(request, metadata=caller("req-edit-1", trace_id), timeout=120)
    spans = receiver.trace(trace_id, has("steerserve.v1.SteerServe/Edit", "edit.dds"))
    rpc = named(spans, "steerserve.v1.SteerServe/Edit")
    assert rpc["parent"] == CALLER_SPAN and rpc["attributes"]["rpc.grpc.status_code"] == 0
    for child in ("validate", "admission.wait", "backend.edit"):
        assert named(spans, child)["parent"] == rpc["span_id"], child
    backend, dds = named(spans, "backend.edit"), named(spans, "edit.dds")
    assert backend["attributes"]["steerserve.edit.method"] == "DDS"
    assert dds["parent"] == backend["span_id"] and backend["start"] <= dds["start"] <= dds["end"] <= backend["end"]
    assert dds["attributes"]["steerserve.edit.steps"] == 3


def test_dreamsteerer_edit_stream_has_a_span_per_phase(traced, receiver):
    """EditStream, DreamSteerer on an imported (random) Custom Diffusion-shaped LoRA: every phase
    is a child span of backend.edit, in order, without overlap."""
    stub = traced.stub()
    adapter = stub.ImportAdapter(pb.ImportAdapterRequest(name="traced-lora", token="sks",
                                                         safetensors=lora_file(served_model_dir(traced), scale=0.1)),
                                 metadata=auth())
    source = render(Scene("stripes", "blue", (WorldObject("square", "red", "solid", 0.5, 0.5, 0.28),)))
    trace_id = "6bf92f3577b34da6a3ce929d0e0e4738"
    request = pb.EditRequest(
        method=pb.DREAMSTEERER, steps=2, seed=1, source_image=pb.Image(data=_png(source.image)),
        source_prompt=source.caption, target_prompt="a sks square on a blue striped background",
        adapter_id=adapter.adapter_id,
        options=pb.EditOptions(steer_steps=2, preliminary_iterations=2, guided_samples=1, guided_steps=2))
    events = list(stub.EditStream(request, metadata=caller("req-stream-1", trace_id), timeout=300))
    assert events[-1].phase == "done"
    phases = ["edit.mask", "edit.guided", "edit.preliminary", "edit.steer", "edit.dds"]
    spans = receiver.trace(trace_id, has("steerserve.v1.SteerServe/EditStream", *phases))
    backend = named(spans, "backend.edit")
    previous_end = backend["start"]
    for name in phases:
        span = named(spans, name)
        assert span["parent"] == backend["span_id"], name
        assert previous_end <= span["start"] <= span["end"] <= backend["end"], name
        previous_end = span["end"]


def test_errors_mark_the_span_that_failed(traced, receiver, logs, monkeypatch):
    stub = traced.stub()
    # The caller's mistake: INVALID_ARGUMENT on the RPC span (not an error of the server's), the
    # validate span failed; a malformed x-request-id is replaced by a generated one.
    trace_id = "7bf92f3577b34da6a3ce929d0e0e4739"
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="", steps=2), metadata=caller("bad id <with spaces>", trace_id))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    returned = dict(err.value.trailing_metadata())["x-request-id"]
    assert returned != "bad id <with spaces>" and len(returned) == 32
    spans = receiver.trace(trace_id, has("steerserve.v1.SteerServe/Generate", "validate"))
    rpc, validate = named(spans, "steerserve.v1.SteerServe/Generate"), named(spans, "validate")
    assert rpc["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rpc["attributes"]["steerserve.request_id"] == returned
    assert rpc["status"] == UNSET and validate["status"] == ERROR and validate["parent"] == rpc["span_id"]
    assert "backend.generate" not in {s["name"] for s in spans}

    # The server's failure: INTERNAL is an error status on the RPC span (with the exception as an
    # event); the traceback's log line carries the trace.
    async def broken(spec, deadline, on_step=None):
        raise RuntimeError("the engine fell over")

    monkeypatch.setattr(traced.gateway.servicer.backend, "generate", broken)
    trace_id = "8bf92f3577b34da6a3ce929d0e0e473a"
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(prompt="a heart", steps=2, seed=1), metadata=caller("req-broken", trace_id))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    spans = receiver.trace(trace_id, has("steerserve.v1.SteerServe/Generate", "admission.wait"))
    rpc = named(spans, "steerserve.v1.SteerServe/Generate")
    assert rpc["status"] == ERROR and rpc["attributes"]["rpc.grpc.status_code"] == 13
    assert "exception" in rpc["events"] and rpc["status_message"].startswith("INTERNAL")
    lines = [line for line in log_lines(logs) if line.get("request_id") == "req-broken"]
    failure = [line for line in lines if line["logger"] == "steerserve.gateway"]
    assert failure and failure[0]["level"] == "ERROR" and "the engine fell over" in failure[0]["exception"]
    assert failure[0]["trace_id"] == trace_id and failure[0]["span_id"] == rpc["span_id"]
    access = [line for line in lines if line["logger"] == "steerserve.access"]
    assert access and access[-1]["code"] == "INTERNAL" and access[-1]["trace_id"] == trace_id


def test_a_call_cancelled_at_its_deadline_is_logged_as_deadline_exceeded(caplog):
    from service.gateway.servicer import _Call

    class Context:
        def __init__(self, remaining):
            self.remaining = remaining

        def invocation_metadata(self):
            return (("x-request-id", "req-unit"),)

        def set_trailing_metadata(self, metadata):
            self.trailer = metadata

        def time_remaining(self):
            return self.remaining

    def one(remaining):  # in a context of its own, as each RPC's task has
        context = Context(remaining)
        call = _Call("Generate", context)
        assert context.trailer == (("x-request-id", "req-unit"),) and call.request_id == "req-unit"
        assert tracing.REQUEST_ID.get() == "req-unit"
        call.end(grpc.StatusCode.CANCELLED, time.perf_counter())

    with caplog.at_level(logging.INFO, logger="steerserve.access"):
        for remaining in (0.004, 5.0, None):
            contextvars.copy_context().run(one, remaining)
    assert tracing.REQUEST_ID.get() == ""
    assert [r.code for r in caplog.records] == ["DEADLINE_EXCEEDED", "CANCELLED", "CANCELLED"]


def test_a_call_without_traceparent_starts_its_own_trace(traced, receiver):
    _, call = traced.stub().GetServerInfo.with_call(pb.GetServerInfoRequest(), metadata=auth())
    rid = dict(call.trailing_metadata())["x-request-id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        tracing.flush()
        with receiver.lock:
            mine = [s for s in receiver.spans if s["attributes"].get("steerserve.request_id") == rid]
        if mine:
            break
        time.sleep(0.05)
    assert len(mine) == 1 and mine[0]["parent"] == "" and mine[0]["name"] == "steerserve.v1.SteerServe/GetServerInfo"


@pytest.fixture
def off(monkeypatch):
    """Tracing off for one test (the module's traced gateway keeps its provider for the others) and
    no OTEL_* variables."""
    tracing.flush()
    for name in ("_enabled", "_provider", "_tracer"):
        monkeypatch.setattr(tracing, name, False if name == "_enabled" else None)
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)


def test_tracing_is_off_without_the_standard_variables(off):
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_SERVICE_NAME": "x", "OTEL_RESOURCE_ATTRIBUTES": "a=b"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    # An OTLP protocol this build does not have: off, with an error logged, rather than a wrong wire.
    assert not tracing.configure(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                      "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert not tracing.configure(env={})
    assert not tracing.enabled()
    # Off: the helpers hand back their do-nothing forms.
    assert tracing.span("x") is tracing.NO_SPAN and tracing.start_span("x") is None
    assert tracing.rpc_span("s", "m", (), "r") is None and tracing.inject_headers() is None
    progress = object()
    assert tracing.edit_phases(progress) is progress and tracing.edit_phases(None) is None


def test_untraced_gateway_exports_nothing_and_still_returns_request_ids(off, receiver, monkeypatch, tmp_path,
                                                                       one_torch_thread):
    """A gateway started with the receiver's address configured but the SDK disabled (set before it
    starts: it reads them at start, as a deployment's would): tracing stays off, a call exports no
    span to that receiver, the request id still comes back. (With OTEL_SDK_DISABLED=false instead,
    the call's spans reach the receiver and the last assertion trips: it can fail.)"""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=free_port(), api_keys=dict(TOKENS),
                        data_dir=tmp_path / "untraced-data", default_steps=1)
    running = start_gateway_in_thread(settings)
    trace_id = "9bf92f3577b34da6a3ce929d0e0e473b"
    try:
        assert not tracing.enabled()
        _, call = running.stub().Generate.with_call(
            pb.GenerateRequest(prompt="a ring", steps=1, seed=2, width=32, height=32),
            metadata=caller("req-off-1", trace_id))
        assert ("x-request-id", "req-off-1") in tuple(call.trailing_metadata())
    finally:
        stop_gateway(running)  # its stop exports whatever its tracer holds (tracing.shutdown): then nothing is pending
    assert not tracing.enabled()
    with receiver.lock:
        exported = [s["name"] for s in receiver.spans
                    if s["trace_id"] == trace_id or s["attributes"].get("steerserve.request_id") == "req-off-1"]
    assert exported == []


def test_json_formatter_fields():
    record = logging.LogRecord("steerserve.x", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    tracing.LogContext().filter(record)
    line = json.loads(tracing.JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["level"] == "WARNING" and line["logger"] == "steerserve.x"
    assert line["time"].endswith("Z") and "request_id" not in line and "trace_id" not in line
    token = tracing.REQUEST_ID.set("req-x")
    try:
        tracing.LogContext().filter(record)
    finally:
        tracing.REQUEST_ID.reset(token)
    assert json.loads(tracing.JsonFormatter().format(record))["request_id"] == "req-x"


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_job_attempt_is_a_trace_of_training_and_previews(traced, receiver):
    from tests.test_personalize_jobs import request, wait_for

    stub = traced.stub()
    caller_trace = "7" * 32
    job = stub.Personalize(request("traced-job", steps=3), metadata=caller("job-call", caller_trace))
    [rpc] = [s for s in receiver.trace(caller_trace, has("jobs.submit"))
             if s["name"] == "steerserve.v1.SteerServe/Personalize"]
    done = wait_for(stub, job.job_id, lambda j: j.state in (pb.SUCCEEDED, pb.FAILED))
    assert done.state == pb.SUCCEEDED, done.error
    deadline = time.monotonic() + 20
    while True:
        tracing.flush()
        with receiver.lock:
            attempt = [s for s in receiver.spans
                       if s["name"] == "job.attempt" and s["attributes"].get("steerserve.job.id") == job.job_id]
        if attempt or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [attempt] = attempt
    assert attempt["parent"] == "" and attempt["attributes"]["steerserve.job.method"] == "DREAMBOOTH_LORA"
    assert attempt["attributes"]["steerserve.job.steps"] == 3 and attempt["attributes"]["steerserve.job.attempt"] == 1
    # Its own trace (training outlives the call), linked to the jobs.submit span of the call that queued it.
    [submit] = [s for s in receiver.trace(caller_trace) if s["name"] == "jobs.submit"]
    assert submit["parent"] == rpc["span_id"] and attempt["trace_id"] != caller_trace
    assert attempt["links"] == [(caller_trace, submit["span_id"])]
    spans = receiver.trace(attempt["trace_id"], has("backend.personalize", "backend.generate"))
    training, previews = named(spans, "backend.personalize"), named(spans, "backend.generate")
    assert training["parent"] == previews["parent"] == attempt["span_id"]
    assert training["end"] <= previews["start"]
    assert training["attributes"]["steerserve.training.steps"] == 3
    assert training["events"] == ["first step", "checkpoint"]  # checkpoint_every=2: after step 2 of 3


# -- Triton: the trace context travels with each request ------------------------------------------


def test_triton_requests_carry_the_backend_spans_traceparent(traced, receiver):
    """TritonBackend against a stand-in Triton (a real gRPC server speaking GRPCInferenceService):
    the ModelStreamInfer call's metadata holds `traceparent` naming the backend.generate span, the
    parent Triton's own OpenTelemetry spans take (`--trace-config mode=opentelemetry`)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from service.backends.triton import TritonBackend
    from service.engine.pipeline import GenerationSpec
    from tests.test_triton_replicas import StandInTriton

    class Recording(StandInTriton):
        def __init__(self):
            super().__init__()
            self.metadata: list[dict] = []

        def ModelStreamInfer(self, request_iterator, context):
            self.metadata.append(dict(context.invocation_metadata()))
            yield from super().ModelStreamInfer(request_iterator, context)

    from tritonclient.grpc import service_pb2_grpc

    stand_in, port = Recording(), free_port()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(stand_in, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    metrics = type("Metrics", (), {"registry": CollectorRegistry()})()

    async def scenario():
        backend = TritonBackend(f"127.0.0.1:{port}", served_model_dir(traced), metrics=metrics)
        try:
            with tracing.span("test.caller") as parent:
                await backend.generate(GenerationSpec(prompt="a photo", steps=2, seed=1), deadline=None)
                return f"{parent.get_span_context().trace_id:032x}"
        finally:
            await backend.close()

    try:
        trace_id = asyncio.new_event_loop().run_until_complete(scenario())
    finally:
        server.stop(0)
    spans = receiver.trace(trace_id, has("test.caller", "backend.generate"))
    call = named(spans, "backend.generate")
    assert call["kind"] == CLIENT and call["parent"] == named(spans, "test.caller")["span_id"]
    assert call["attributes"]["server.address"] == f"127.0.0.1:{port}"
    assert call["attributes"]["triton.model"] == "generate" and call["attributes"]["steerserve.backend"] == "triton"
    [seen] = stand_in.metadata
    version, traced_id, parent_id, flags = seen["traceparent"].split("-")
    assert (version, traced_id, parent_id) == ("00", trace_id, call["span_id"]) and int(flags, 16) & 1  # sampled


class HttpReceiver:
    """An OTLP/HTTP trace endpoint (Triton's exporter: OTLP/JSON over HTTP) on a loopback port."""

    def __init__(self):
        import http.server

        spans = self.spans = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if "json" in self.headers.get("Content-Type", ""):
                    for rs in json.loads(body).get("resourceSpans", []):
                        for ss in rs.get("scopeSpans", []):
                            spans.extend({"name": s["name"], "trace_id": s["traceId"], "span_id": s["spanId"],
                                          "parent": s.get("parentSpanId", "")} for s in ss.get("spans", []))
                else:
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    spans.extend({"name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                  "parent": s.parent_span_id.hex()}
                                 for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


STUB_GENERATE = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("IMAGES", np.zeros((1, 8, 8, 3), np.uint8)),
            pb_utils.Tensor("SEEDS", np.array([7], np.int64)),
            pb_utils.Tensor("TIMINGS", np.array([json.dumps({"total_seconds": 0.01}).encode()], dtype=object)),
            pb_utils.Tensor("STEP_BATCH_SIZES", np.array([2], np.int32)),
            pb_utils.Tensor("STEP_QUEUE_US", np.array([5], np.int64))]) for _ in requests]
'''


@pytest.mark.system
def test_a_real_tritons_own_trace_joins_the_gateways(traced, receiver, tmp_path):
    """A real tritonserver started with service.triton.launcher.trace_args (its OpenTelemetry mode,
    OTLP/HTTP to a receiver here) serving a stand-in `generate` model (model_repo's config, a python
    model answering a fixed image): Triton's InferRequest span is a child of backend.generate, in
    the same trace."""
    import asyncio
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from service.backends.triton import TritonBackend
    from service.engine.pipeline import GenerationSpec
    from service.gateway.server import MODEL_REPOSITORY
    from service.triton.launcher import TritonServer, trace_args

    (tmp_path / "repo" / "generate" / "1").mkdir(parents=True)
    config = (Path(MODEL_REPOSITORY) / "generate" / "config.pbtxt").read_text()
    (tmp_path / "repo" / "generate" / "config.pbtxt").write_text(
        config.replace("model_transaction_policy { decoupled: true }", ""))
    (tmp_path / "repo" / "generate" / "1" / "model.py").write_text(STUB_GENERATE)
    collector = HttpReceiver()
    triton = TritonServer(tmp_path / "repo", models=["generate"], work_dir=tmp_path / "work", start_timeout_s=120,
                          extra_args=trace_args(collector.url) + ["--trace-config=opentelemetry,bsp_schedule_delay=100"])
    metrics = type("Metrics", (), {"registry": CollectorRegistry()})()

    async def scenario():
        backend = TritonBackend(triton.grpc_url, served_model_dir(traced), metrics=metrics)
        try:
            with tracing.span("test.caller") as parent:
                result = await backend.generate(GenerationSpec(prompt="a photo", steps=2, seed=1), deadline=None)
                assert result.seeds == [7]
                return f"{parent.get_span_context().trace_id:032x}"
        finally:
            await backend.close()

    try:
        triton.start()
        trace_id = asyncio.new_event_loop().run_until_complete(scenario())
        deadline = time.monotonic() + 20
        while not any(s["name"] == "InferRequest" for s in collector.spans) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        triton.close()
        collector.server.shutdown()
    ours = named(receiver.trace(trace_id, has("backend.generate")), "backend.generate")
    theirs = [s for s in collector.spans if s["trace_id"] == trace_id]
    request = named(theirs, "InferRequest")
    assert request["parent"] == ours["span_id"]
    assert {"generate", "compute"} <= {s["name"] for s in theirs}
