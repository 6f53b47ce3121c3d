"""The long fuzz run: >= 10,000 property-based requests over every RPC against a real `steerserve
serve` process; counts answers by status, and the server's memory along the way.

    python -m bench.fuzz_rpcs                 # 10,000 requests; writes bench/results/fuzz.{json,md}
    python -m bench.fuzz_rpcs --requests 500  # a quick look

Requests come from tests/rpc_fuzz.py (the same strategies as the test suite's fast subset; needs
the test extras: hypothesis). The server runs with small limits (max 8 steps, 128 px, 8 edit
iterations) so that the valid requests among the hostile ones stay cheap; validation is the same
code at any limit. Passes (exit 0) when no request is answered INTERNAL or UNKNOWN, the process
never dies, and its RSS grows by at most 2 MB per 1,000 requests after warm-up (least-squares slope).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.common import ROOT, rss_mb, slope, write_results
from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from tests.rpc_fuzz import BAD_CODES, SERVICE, message_strategy, metadata_for, tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = tempfile.mkdtemp(prefix="steerserve-fuzz-")
    env = dict(os.environ, STEERSERVE_API_KEYS="token-alice:alice,token-bob:bob", STEERSERVE_DATA_DIR=data,
               STEERSERVE_GRPC_PORT=str(port), STEERSERVE_METRICS_PORT="0", STEERSERVE_MAX_STEPS="8",
               STEERSERVE_DEFAULT_STEPS="2", STEERSERVE_MAX_SIZE="128", STEERSERVE_MAX_EDIT_ITERATIONS="8",
               STEERSERVE_MAX_STEER_STEPS="4")
    server = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stub = pb_grpc.SteerServeStub(grpc.insecure_channel(f"127.0.0.1:{port}",
                                                        options=[("grpc.max_send_message_length", 64 << 20)]))
    started = time.time()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata_for("token-alice"), timeout=1)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the fuzzed server did not come up")
                time.sleep(0.3)
        lora = None
        from tests.adapter_files import lora_file
        from service.engine.default_model import default_model_dir

        lora = lora_file(default_model_dir(ROOT / "var" / "models"))
        methods = list(SERVICE.methods)
        per_method = {m.name: message_strategy(m.input_type, lora) for m in methods}
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        bad: list[str] = []  # the first 20, for the report
        bad_count = [0]
        samples: list[tuple[int, float]] = []
        done = [0]

        @settings(max_examples=args.requests, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def run(data):
            method = methods[data.draw(st.integers(0, len(methods) - 1))]
            request = data.draw(per_method[method.name])
            token = data.draw(tokens())
            rpc = getattr(stub, method.name)
            try:
                if method.server_streaming:
                    for _ in rpc(request, metadata=metadata_for(token), timeout=10):
                        pass
                else:
                    rpc(request, metadata=metadata_for(token), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
                if code in BAD_CODES:
                    bad_count[0] += 1
                    if len(bad) < 20:
                        bad.append(f"{method.name}: {code.name}: {err.details()}")
            counts[method.name][code.name] += 1
            done[0] += 1
            if done[0] % 250 == 0:
                if server.poll() is not None:
                    raise RuntimeError(f"the server died after {done[0]} requests")
                samples.append((done[0], rss_mb(server.pid)))
                print(f"{done[0]} requests, server RSS {samples[-1][1]:.0f} MB", flush=True)
                for token_ in ("token-alice", "token-bob"):  # valid fuzzed jobs: stop them
                    for job in stub.ListJobs(pb.ListJobsRequest(), metadata=metadata_for(token_)).jobs:
                        if job.state in (pb.QUEUED, pb.RUNNING):
                            stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=metadata_for(token_))

        run()
        alive = server.poll() is None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    total = sum(sum(c.values()) for c in counts.values())
    by_code = collections.Counter()
    for c in counts.values():
        by_code.update(c)
    # Memory: from the second quarter on (the first requests load models and warm caches).
    steady = samples[len(samples) // 4:]
    mb_per_1000 = slope([s[0] for s in steady], [s[1] for s in steady]) * 1000 if len(steady) > 2 else float("nan")
    report = dict(date=time.strftime("%Y-%m-%d"), requests=total, by_code=dict(by_code), internal_or_unknown_count=bad_count[0],
                  by_method={k: dict(v) for k, v in counts.items()}, internal_or_unknown=bad, server_alive=alive,
                  rss_mb=samples, rss_slope_mb_per_1000_requests=mb_per_1000, seconds=time.time() - started)
    lines = [
        f"# Fuzzing every RPC ({report['date']}): {total} requests",
        "",
        "`python -m bench.fuzz_rpcs` -- hypothesis strategies from tests/rpc_fuzz.py against a `steerserve serve` "
        "process (in-process backend, small limits).",
        "",
        f"- INTERNAL or UNKNOWN answers: {bad_count[0]}" + (f" ({bad[:3]})" if bad else ""),
        f"- server alive at the end: {alive}",
        f"- server RSS: {samples[0][1]:.0f} MB after {samples[0][0]} requests, {samples[-1][1]:.0f} MB at the end; "
        f"slope over the last three quarters {mb_per_1000:+.2f} MB per 1,000 requests" if samples else "",
        f"- {report['seconds'] / 60:.1f} minutes",
        "",
        "| status | requests |",
        "| --- | --- |",
        *[f"| {code} | {n} |" for code, n in by_code.most_common()],
        "",
        "| RPC | requests | answers |",
        "| --- | --- | --- |",
        *[f"| {name} | {sum(c.values())} | {', '.join(f'{k} {v}' for k, v in c.most_common())} |"
          for name, c in sorted(counts.items())],
        "",
    ]
    write_results(args.out_dir, "fuzz", report, "\n".join(lines))
    # Flat memory: allow 2 MB per 1,000 requests of drift (allocator and cache noise over a 10k run).
    if bad_count[0] or not alive or not mb_per_1000 <= 2.0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
