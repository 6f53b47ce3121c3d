"""What OpenTelemetry tracing costs a request, off and on, side by side in one run.

    python -m bench.bench_tracing          # writes bench/results/tracing.{json,md}

One process: a real gateway (gRPC on loopback, in-process backend, the embedded model) called
through the generated stubs. Tracing is switched between
- off: no OTEL_* variables, so no provider (service/tracing.py hands back its do-nothing forms);
- on: OTLP/gRPC export (BatchSpanProcessor, default settings) to an in-process receiver (the
  collector's TraceService on another loopback port, in this same process: its CPU is counted too),
in alternating blocks, on the same server. Measured per RPC, median and p90 over every call:
GetServerInfo (the cheapest RPC: the instrumentation's share of it is the largest there is) and a
tiny Generate (1 step, 32x32).

Then the instrumentation alone, timed in a loop: what one Generate's worth of calls into
service/tracing.py costs (the RPC span, validate, admission.wait, the backend span, the context
copy to the engine thread, the access-log check), off and on (on: with a do-nothing exporter), and
the per-RPC request id (always on: the caller's x-request-id or a new one, the trailing metadata,
the log context).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import statistics
import tempfile
import threading
import time
import timeit
from concurrent import futures
from pathlib import Path

import grpc

from bench.common import add_run_arguments, start_run, write_results
from service import tracing


def _receiver():
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        spans = 0

        def Export(self, request, context):
            Receiver.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, Receiver


def _start_gateway(settings):
    from service.gateway.server import start_gateway

    loop = asyncio.new_event_loop()
    box, ready = {}, threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        box["gateway"] = loop.run_until_complete(start_gateway(settings))
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(300)
    return box["gateway"], loop


def _set_mode(mode: str, endpoint: str) -> None:
    tracing.shutdown()
    if mode == "on":
        assert tracing.configure("steerserve-bench", env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                                          "OTEL_EXPORTER_OTLP_INSECURE": "true"})


def rpc_latencies(args, stub, pb, endpoint: str) -> dict:
    md = [("authorization", "Bearer bench-token")]
    calls = {
        "GetServerInfo": (lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md), args.info_calls),
        "Generate": (lambda: stub.Generate(pb.GenerateRequest(prompt="a red circle on a blue background", steps=1,
                                                              width=32, height=32, seed=1), metadata=md),
                     args.generate_calls),
    }
    out = {}
    for name, (call, n) in calls.items():
        for _ in range(max(3, n // 10)):  # warm up
            call()
        seconds = {"off": [], "on": []}
        per_block = max(1, n // args.blocks)
        for _ in range(args.blocks):
            for mode in ("off", "on"):
                _set_mode(mode, endpoint)
                for _ in range(per_block):
                    t0 = time.perf_counter()
                    call()
                    seconds[mode].append(time.perf_counter() - t0)
        tracing.shutdown()
        row = {}
        for mode, values in seconds.items():
            values.sort()
            row[mode] = {"calls": len(values), "median_ms": statistics.median(values) * 1e3,
                         "p90_ms": values[int(0.9 * (len(values) - 1))] * 1e3}
        row["on_vs_off"] = row["on"]["median_ms"] / row["off"]["median_ms"]
        row["on_minus_off_us"] = (row["on"]["median_ms"] - row["off"]["median_ms"]) * 1e3
        out[name] = row
    return out


class _Context:
    """The part of grpc.aio.ServicerContext that _rpc's bookkeeping reads."""

    def invocation_metadata(self):
        return (("authorization", "Bearer bench-token"), ("user-agent", "grpc-python/1.85.1"))

    def set_trailing_metadata(self, metadata):
        pass

    def time_remaining(self):
        return None


def instrumentation_us(iterations: int) -> dict:
    """µs per RPC of one Generate's calls into the instrumentation."""
    from service.gateway.servicer import _Call

    context = _Context()
    code = grpc.StatusCode.OK

    def request_id_only():  # always on: request id, trailing metadata, log context, access-log check
        _Call("Generate", context).end(code, 0.0)

    def generate_worth():
        call = _Call("Generate", context)
        with tracing.span("validate"):
            pass
        waiting = tracing.start_span("admission.wait", None)
        tracing.end_span(waiting)
        with tracing.span("backend.generate") as span:
            if span.is_recording():
                span.set_attributes({"steerserve.steps": 1})
            contextvars.copy_context().run(lambda: None)  # the context carried to the engine thread
        call.end(code, 0.0)

    def per_call(fn) -> float:
        fn()
        return min(timeit.repeat(fn, number=iterations, repeat=5)) / iterations * 1e6

    tracing.shutdown()
    out = {"request_id_us": per_call(request_id_only), "off_us": per_call(generate_worth)}
    # On, with a do-nothing exporter (span creation, attributes, the processor's queue).
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Nothing(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Nothing(), max_queue_size=1 << 16))
    tracing._provider, tracing._tracer, tracing._enabled = provider, provider.get_tracer("bench"), True
    try:
        out["on_us"] = per_call(generate_worth)
    finally:
        tracing.shutdown()
    out["spans_per_rpc"] = 4
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--info-calls", type=int, default=2000, help="GetServerInfo calls per mode")
    parser.add_argument("--generate-calls", type=int, default=200, help="Generate calls per mode")
    parser.add_argument("--blocks", type=int, default=10, help="alternating off/on blocks")
    parser.add_argument("--iterations", type=int, default=20000, help="loop count of the instrumentation timing")
    args = parser.parse_args(argv)
    started = start_run(args)

    from service._generated.steerserve.v1 import steerserve_pb2 as pb
    from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
    from service.config import Settings

    receiver, port, Receiver = _receiver()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0, api_keys={"bench-token": "bench"},
                            data_dir=Path(data), job_previews=0)
        gateway, loop = _start_gateway(settings)
        stub = pb_grpc.SteerServeStub(grpc.insecure_channel(f"127.0.0.1:{gateway.port}"))
        rpcs = rpc_latencies(args, stub, pb, endpoint)
        asyncio.run_coroutine_threadsafe(gateway.stop(grace=1), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
    micro = instrumentation_us(args.iterations)
    receiver.stop(0)
    report = {"date": time.strftime("%Y-%m-%d"), "seconds": time.time() - started, "threads": args.threads,
              "rpcs": rpcs, "instrumentation": micro, "spans_received": Receiver.spans}
    g, i, m = rpcs["Generate"], rpcs["GetServerInfo"], micro
    lines = [
        f"# Tracing overhead ({report['date']}, CPU, {args.threads} threads)",
        "",
        "`python -m bench.bench_tracing`: one gateway (in-process backend, embedded model) called over loopback; "
        f"tracing off (no OTEL_* variables: no provider) and on (OTLP/gRPC to an in-process receiver, default "
        f"batching) in {args.blocks} alternating blocks on the same server. Per-call latency, all calls of a mode.",
        "",
        "| RPC | calls per mode | off: median (p90) | on: median (p90) | on / off | on − off |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rpcs.items():
        lines.append(f"| {name} | {row['off']['calls']} | {row['off']['median_ms']:.3f} ms ({row['off']['p90_ms']:.3f}) | "
                     f"{row['on']['median_ms']:.3f} ms ({row['on']['p90_ms']:.3f}) | {row['on_vs_off']:.3f}x | "
                     f"{row['on_minus_off_us']:+.0f} µs |")
    lines += [
        "",
        "The instrumentation alone, per RPC (one Generate's calls: RPC span, validate, admission.wait, backend "
        f"span, the context copied to the engine thread, access-log check; best of 5 × {args.iterations:,} loops):",
        "",
        "| | µs per RPC | share of GetServerInfo (off) | share of Generate (off) |",
        "| --- | --- | --- | --- |",
    ]
    for label, us in (("request id, trailer, log context (always on)", m["request_id_us"]),
                      ("all of it, tracing off", m["off_us"]),
                      ("all of it, tracing on (do-nothing exporter)", m["on_us"])):
        lines.append(f"| {label} | {us:.2f} | {us / (i['off']['median_ms'] * 1e3):.2%} | "
                     f"{us / (g['off']['median_ms'] * 1e3):.3%} |")
    lines += [
        "",
        f"Off, tracing's own part is {m['off_us'] - m['request_id_us']:.2f} µs per RPC (the do-nothing forms: "
        "a flag read per helper) — nothing measurable against a generation; the RPC-level difference between "
        "the modes is what exporting costs when it is on. The receiver runs in the benchmark's process, so its "
        f"CPU is in the 'on' figures too ({report['spans_received']:,} spans received).",
        "",
    ]
    write_results(args.out_dir, "tracing", report, "\n".join(lines))


if __name__ == "__main__":
    main()
