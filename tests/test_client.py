"""The Python client (clients/python, `steerserve_client`) against a running gateway: generate,
personalize with progress and wait(), edit with progress, adapters and jobs, typed errors,
idempotency keys (the server's and the client's), retries only where safe, sync and asyncio, and
that it installs and imports without torch or the service."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

import steerserve_client as sc
from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from service.engine.default_model import default_model_dir
from service.research.world.generator import render
from service.research.world.heldout import CONCEPTS
from tests.adapter_files import lora_file
from tests.conftest import TOKENS, start_gateway_in_thread, stop_gateway

REPO = Path(__file__).resolve().parent.parent


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client(gateway):
    with sc.Client(gateway.address, "token-alice", tls=False) as c:
        yield c


# -- packaging -------------------------------------------------------------------------------------


def test_client_installs_from_the_repo_and_imports_without_torch_or_the_service(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(REPO / "clients/python")],
                   check=True, capture_output=True, timeout=300)
    # -S: no site-packages processing, so neither the repo nor the editable install is visible;
    # grpc and protobuf come from the venv's site-packages folder, the client from `site` only.
    venv_site = next(p for p in sys.path if p.endswith("site-packages"))
    probe = ("import sys, steerserve_client as c; "
             "assert 'torch' not in sys.modules and 'service' not in sys.modules, sorted(sys.modules); "
             "print(c.__file__, c.Client, c.AsyncClient)")
    out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": f"{site}{os.pathsep}{venv_site}", "PATH": os.environ["PATH"]}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(site) in out.stdout


def test_settings_come_from_the_same_environment_as_the_cli(monkeypatch):
    env = {"STEERSERVE_ADDRESS": "h:1", "STEERSERVE_TOKEN": "t", "STEERSERVE_CLIENT_CA_FILE": "/ca.pem"}
    conn = sc.Connection.from_env(environ=env)
    assert (conn.address, conn.token, conn.tls, conn.ca_file) == ("h:1", "t", True, "/ca.pem")
    assert sc.Connection.from_env("x:2", "u", environ=env).address == "x:2"  # arguments win
    assert not sc.Connection.from_env(environ={}).tls
    with pytest.raises(sc.ConfigError, match="go together"):
        sc.Connection.from_env(environ={"STEERSERVE_CLIENT_CERT_FILE": "/c.pem"})
    monkeypatch.delenv("STEERSERVE_TOKEN", raising=False)
    with pytest.raises(sc.ConfigError, match="no API token"):
        sc.Client("127.0.0.1:1", tls=False)


# -- against the running gateway -----------------------------------------------------------------


def test_generate_info_and_typed_errors(client):
    result = client.generate("a red circle on a blue striped background", seed=3, num_images=2, steps=2)
    assert [i.data[:4] for i in result.images] == [b"\x89PNG"] * 2 and result.seeds == [3, 4]
    assert result.images[0].to_pil().size == (result.images[0].width, result.images[0].height)
    assert result.timings.total_seconds > 0
    assert client.info().backend == "inprocess"
    with pytest.raises(sc.NotFound, match="adapters\\[0\\].adapter_id"):
        client.generate("a red circle", adapters={"ad-missing": 0.5})
    with pytest.raises(sc.InvalidArgument) as err:
        client.generate("a red circle", steps=100000)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "steps" in err.value.details
    with sc.Client(client.connection.address, "not-a-token", tls=False) as stranger:
        with pytest.raises(sc.Unauthenticated):
            stranger.adapters.list()


def test_adapters_and_import_idempotency(client, model_cache):
    data = lora_file(default_model_dir(model_cache))
    first = client.adapters.import_("client-lora", data, token="zwx", idempotency_key="import-key-1")
    again = client.adapters.import_("client-lora", data, token="zwx", idempotency_key="import-key-1")
    assert again.adapter_id == first.adapter_id  # a retried import: the same adapter, not ALREADY_EXISTS
    assert [a.adapter_id for a in client.adapters.list()].count(first.adapter_id) == 1
    with pytest.raises(sc.InvalidArgument, match="idempotency_key"):  # the key names another request
        client.adapters.import_("client-lora-2", data, idempotency_key="import-key-1")
    with pytest.raises(sc.InvalidArgument, match="idempotency_key"):
        client.adapters.import_("client-lora-3", data, idempotency_key="bad key with spaces")
    with pytest.raises(sc.AlreadyExists):  # no key: a second import of the name is refused as before
        client.adapters.import_("client-lora", data, idempotency_key="import-key-2")
    # Keys are per tenant: bob's call with alice's key creates bob's own adapter.
    with sc.Client(client.connection.address, "token-bob", tls=False) as bob:
        theirs = bob.adapters.import_("client-lora", data, idempotency_key="import-key-1")
        assert theirs.adapter_id != first.adapter_id
        bob.adapters.delete(theirs.adapter_id)
    got, blob = client.adapters.export(first.adapter_id)
    assert got == client.adapters.get(first.adapter_id) and len(blob) > 0 and got.method == "CUSTOM_DIFFUSION"  # K/V-only LoRA
    client.adapters.delete(first.adapter_id)
    with pytest.raises(sc.NotFound):
        client.adapters.get(first.adapter_id)


def test_personalize_with_progress_wait_and_idempotency(client):
    photos = [png(s.image) for s in CONCEPTS["yellow-crescent"].references(3, seed=0)]
    options = dict(class_word="circle", steps=3, batch_size=1, seed=7, idempotency_key="client-job-1")
    handle = client.personalize("dreambooth-lora", "client-crescent", photos, **options)
    retried = client.personalize("dreambooth-lora", "client-crescent", photos, **options)
    assert retried.job_id == handle.job_id  # the same job, not a second one or ALREADY_EXISTS
    with pytest.raises(sc.InvalidArgument, match="idempotency_key"):
        client.personalize("dreambooth-lora", "client-crescent", photos, **dict(options, steps=4))
    events = []
    job = handle.wait(progress=events.append)
    assert job.state == "SUCCEEDED" and job.adapter_id and job.previews
    assert events[-1].state == "SUCCEEDED" and any(e.state == "RUNNING" or e.step for e in events)
    assert [j.job_id for j in client.jobs.list()].count(handle.job_id) == 1
    assert client.jobs.get(handle.job_id).adapter_id == job.adapter_id
    image = client.generate(f"a {job.token} circle", adapters=[job.adapter_id], seed=1, steps=2).images[0]
    assert image.data[:4] == b"\x89PNG"
    long = client.personalize("dreambooth-lora", "client-cancelled", photos, class_word="circle", steps=3000,
                              batch_size=1)
    long.cancel()
    with pytest.raises(sc.JobFailed) as failed:  # a cancelled job's wait() raises, carrying the job
        client.jobs.handle(long.job_id).wait()
    assert failed.value.job.state == "CANCELLED" and failed.value.job.job_id == long.job_id
    client.adapters.delete(job.adapter_id)


def test_concurrent_personalize_calls_with_one_key_queue_one_job(client, gateway):
    photos = [png(s.image) for s in CONCEPTS["yellow-crescent"].references(3, seed=1)]
    request = dict(class_word="circle", steps=3000, batch_size=1, idempotency_key="client-race-1")

    def call(_):
        with sc.Client(gateway.address, "token-alice", tls=False) as c:
            return c.personalize("textual-inversion", "client-race", photos, **request).job_id

    with futures.ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(call, range(6)))
    assert len(ids) == 1
    assert [j.name for j in client.jobs.list()].count("client-race") == 1
    client.jobs.cancel(ids.pop())


def test_edit_with_progress(client):
    source = png(render(CONCEPTS["yellow-crescent"].edit_sources()[0]).image)
    phases = []
    result = client.edit(source, "a shape", "a green shape", method="dds", steps=4, seed=2,
                         progress=lambda p: phases.append(p.phase))
    assert result.image.data[:4] == b"\x89PNG" and result.mask is None and result.seed == 2
    assert phases[0] == "queued" and phases[-1] == "done" and "dds" in phases
    plain = client.edit(source, "a shape", "a green shape", method="dds", steps=4, seed=2)
    assert plain.image.data == result.image.data  # same seed, same edit, streamed or not


def test_async_client(gateway, model_cache):
    async def main():
        async with sc.AsyncClient(gateway.address, "token-alice", tls=False) as client:
            results = await asyncio.gather(*(client.generate("a blue square", seed=s, steps=2) for s in (1, 2)))
            assert [r.seeds for r in results] == [[1], [2]]
            seen = []

            async def progress(p):  # coroutine callbacks are awaited
                seen.append(p.phase)

            source = png(render(CONCEPTS["yellow-crescent"].edit_sources()[1]).image)
            edited = await client.edit(source, "a shape", "a red shape", method="dds", steps=3, progress=progress)
            assert edited.image.data[:4] == b"\x89PNG" and seen[-1] == "done"
            data = lora_file(default_model_dir(model_cache))
            a = await client.adapters.import_("async-lora", data, idempotency_key="async-key")
            b = await client.adapters.import_("async-lora", data, idempotency_key="async-key")
            assert a.adapter_id == b.adapter_id
            await client.adapters.delete(a.adapter_id)
            with pytest.raises(sc.NotFound):
                await client.jobs.get("job-doesnotexist")

    asyncio.run(main())


def test_server_sends_its_wait_estimate_and_the_client_waits_it_out(tmp_path, model_cache):
    settings = dict(host="127.0.0.1", grpc_port=0, metrics_port=0, api_keys=dict(TOKENS), data_dir=tmp_path,
                    default_steps=2, tenant_rate_per_s=0.25, tenant_burst=1)
    # One request per 4 s: each refusal below needs the call before it admitted less than 4 s
    # earlier, a wide margin over a 1-step Generate on a loaded CI host (at 1/s one ran out).
    from service.config import Settings

    running = start_gateway_in_thread(Settings(**settings))
    try:
        stub = pb_grpc.SteerServeStub(grpc.insecure_channel(running.address))
        md = [("authorization", "Bearer token-alice")]
        stub.Generate(pb.GenerateRequest(prompt="a red circle", steps=1), metadata=md)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt="a red circle", steps=1), metadata=md)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        pushback = dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"]
        assert 0 < int(pushback) <= 4000
        with sc.Client(running.address, "token-alice", tls=False) as client:
            started = time.monotonic()
            client.generate("a red circle", steps=1)  # refused first, admitted after the estimate
            client.generate("a red circle", steps=1)  # refused first, admitted a full refill (4 s) later
            assert time.monotonic() - started >= 3.5
            with pytest.raises(sc.ResourceExhausted) as refused:
                sc.Client(running.address, "token-alice", tls=False, retry=sc.NO_RETRY).generate("a red circle")
            assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
    finally:
        stop_gateway(running)


# -- the retry policy against a scripted server ------------------------------------------------------


class Scripted(pb_grpc.SteerServeServicer):
    """Answers each RPC from a script of failures, then succeeds; records what it received."""

    def __init__(self, script: dict[str, list]):
        self.script = script
        self.received: dict[str, list] = {}

    def _next(self, name, request, context):
        self.received.setdefault(name, []).append(request)
        steps = self.script.get(name, [])
        if steps:
            code, pushback = steps.pop(0)
            if pushback is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(pushback)),))
            context.abort(code, f"scripted {code.name}")

    def Generate(self, request, context):
        self._next("Generate", request, context)
        return pb.GenerateResponse(seeds=[1])

    def Personalize(self, request, context):
        self._next("Personalize", request, context)
        return pb.Job(job_id="job-1", state=pb.QUEUED)

    def WatchJob(self, request, context):
        self._next("WatchJob", request, context)
        plan = self.script.get("WatchJob_events", [])
        events = plan.pop(0) if plan else ["SUCCEEDED"]
        for i, state in enumerate(events):
            yield pb.JobEvent(job_id=request.job_id, state=pb.JobState.Value(state), step=i + 1, total_steps=3,
                              job=pb.Job(job_id=request.job_id, state=pb.JobState.Value(state), adapter_id="ad-1"))
        if plan and plan[0] == "break":  # the replica goes away mid-stream
            plan.pop(0)
            context.abort(grpc.StatusCode.UNAVAILABLE, "replica stopping")

    def DeleteAdapter(self, request, context):
        self._next("DeleteAdapter", request, context)
        return pb.DeleteAdapterResponse()


@pytest.fixture
def scripted():
    servers = []

    def start(script):
        servicer = Scripted(script)
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_SteerServeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        fast = sc.RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)
        return servicer, sc.Client(f"127.0.0.1:{port}", "t", tls=False, retry=fast)

    yield start
    for server in servers:
        server.stop(0)


U, R = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unavailable_is_retried_and_personalize_retries_carry_one_idempotency_key(scripted):
    server, client = scripted({"Generate": [(U, None), (U, None)], "Personalize": [(U, None)]})
    assert client.generate("x").seeds == [1] and len(server.received["Generate"]) == 3
    client.personalize("textual-inversion", "n", [b"img"])
    keys = [r.idempotency_key for r in server.received["Personalize"]]
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0]  # the retry is the same request


def test_resource_exhausted_is_retried_only_with_the_servers_estimate(scripted):
    server, client = scripted({"Generate": [(R, 200)]})
    started = time.monotonic()
    client.generate("x")
    assert time.monotonic() - started >= 0.2 and len(server.received["Generate"]) == 2
    server, client = scripted({"Generate": [(R, None)]})  # a quota: retrying would not help
    with pytest.raises(sc.ResourceExhausted):
        client.generate("x")
    assert len(server.received["Generate"]) == 1
    server, client = scripted({"Generate": [(R, 5000)]})  # the wait would outlive the deadline
    with pytest.raises(sc.ResourceExhausted):
        client.generate("x", timeout=1.0)
    assert len(server.received["Generate"]) == 1


def test_unsafe_calls_and_other_errors_are_not_retried(scripted):
    server, client = scripted({"DeleteAdapter": [(U, None)], "Generate": [(grpc.StatusCode.INVALID_ARGUMENT, None)]})
    with pytest.raises(sc.Unavailable):
        client.adapters.delete("ad-1")
    with pytest.raises(sc.InvalidArgument):
        client.generate("x")
    assert len(server.received["DeleteAdapter"]) == 1 and len(server.received["Generate"]) == 1
    server, client = scripted({"Generate": [(U, None)] * 10})
    with pytest.raises(sc.Unavailable):
        client.generate("x")
    assert len(server.received["Generate"]) == client.retry.max_attempts


def test_wait_reopens_a_broken_or_ended_watch_and_gives_up_when_nothing_comes(scripted):
    # RUNNING, then the stream breaks (UNAVAILABLE); then ends cleanly while still RUNNING; then SUCCEEDED.
    server, client = scripted({"WatchJob_events": [["RUNNING"], "break", ["RUNNING"], ["SUCCEEDED"]]})
    seen = []
    handle = sc.JobHandle(client, sc.Job("job-1", "RUNNING", "TEXTUAL_INVERSION", "n", 0, 0, 3, 0, 0, "", "", "", "",
                                         "", None, None))
    done = handle.wait(progress=lambda e: seen.append(e.state))
    assert done.state == "SUCCEEDED" and seen == ["RUNNING", "RUNNING", "SUCCEEDED"]
    assert len(server.received["WatchJob"]) == 3
    # A server that never answers: bounded attempts, then the error (not a loop forever).
    server, client = scripted({"WatchJob": [(U, None)] * 1000})
    handle = sc.JobHandle(client, handle.job)
    with pytest.raises(sc.Unavailable):
        handle.wait()
    assert len(server.received["WatchJob"]) == client.retry.max_attempts ** 2
