"""Personalize as durable jobs through the public API (in-process backend): watch to completion,
use the adapter in Generate, cancel, queue limits, bad input, tenant isolation, restart and resume.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from service.config import Settings
from service.research.world.heldout import CONCEPTS, STYLES
from tests.conftest import TOKENS, auth, free_port, start_gateway_in_thread, stop_gateway

BOB = auth("token-bob")


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def crescent_photos(n: int = 3) -> list[pb.Image]:
    return [pb.Image(data=png(s.image)) for s in CONCEPTS["yellow-crescent"].references(n, seed=0)]


def request(name: str, method=pb.DREAMBOOTH_LORA, steps: int = 6, **options) -> pb.PersonalizeRequest:
    options.setdefault("batch_size", 2)
    options.setdefault("seed", 7)
    return pb.PersonalizeRequest(method=method, name=name, class_word="circle", images=crescent_photos(),
                                 options=pb.TrainingOptions(steps=steps, **options))


def settings_for(data_dir, **kw) -> Settings:
    base = dict(host="127.0.0.1", grpc_port=0, metrics_port=free_port(), api_keys=dict(TOKENS), data_dir=data_dir,
                default_steps=3, checkpoint_every=2, job_previews=2, max_jobs_per_tenant=2, max_queued_jobs=8)
    base.update(kw)
    return Settings(**base)


def wait_for(stub, job_id, predicate, timeout=120.0, md=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=md or auth())
        if predicate(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach the expected state: {job}")


@pytest.fixture(scope="module")
def jobs_gateway(tmp_path_factory, one_torch_thread):
    running = start_gateway_in_thread(settings_for(tmp_path_factory.mktemp("jobs-data")))
    yield running
    stop_gateway(running)


def test_personalize_watch_to_completion_then_generate(jobs_gateway):
    stub = jobs_gateway.stub()
    job = stub.Personalize(request("crescent-db"), metadata=auth())
    assert job.state == pb.QUEUED and job.job_id.startswith("job-")
    assert job.token == "sks" and job.class_word == "circle" and job.total_steps == 6

    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=auth(), timeout=180))
    states = [e.state for e in events]
    assert states[-1] == pb.SUCCEEDED, events[-1]
    assert pb.RUNNING in states
    steps = [e.step for e in events if e.state == pb.RUNNING]
    assert steps == sorted(steps) and max(steps) <= 6
    assert any(e.loss > 0 for e in events)
    done = events[-1].job
    assert done.adapter_id and done.progress == 1.0 and done.eta_seconds == 0
    # Previews: "a sks circle" made through Generate with the new adapter.
    assert len(done.previews) == 2
    assert Image.open(io.BytesIO(done.previews[0].data)).size == (64, 64)

    adapter = stub.GetAdapter(pb.GetAdapterRequest(adapter_id=done.adapter_id), metadata=auth())
    assert (adapter.method, adapter.token, adapter.class_word, adapter.source) == (
        pb.DREAMBOOTH_LORA, "sks", "circle", "personalize")
    assert adapter.rank == 8 and adapter.num_parameters > 0

    plain = pb.GenerateRequest(prompt="a sks circle on a green background", steps=4, seed=3)
    with_adapter = pb.GenerateRequest(prompt=plain.prompt, steps=4, seed=3,
                                      adapters=[pb.AdapterRef(adapter_id=done.adapter_id)])
    a = np.asarray(Image.open(io.BytesIO(stub.Generate(plain, metadata=auth()).images[0].data)), np.int16)
    b = np.asarray(Image.open(io.BytesIO(stub.Generate(with_adapter, metadata=auth()).images[0].data)), np.int16)
    assert np.abs(a - b).mean() > 0.5

    # The exported file is a diffusers LoRA.
    exported = stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=done.adapter_id), metadata=auth())
    assert len(exported.safetensors) == adapter.size_bytes


@pytest.mark.parametrize("method", [pb.TEXTUAL_INVERSION, pb.CUSTOM_DIFFUSION])
def test_token_learning_job_serves_its_placeholder_in_generate(jobs_gateway, method):
    stub = jobs_gateway.stub()
    name = f"crescent-{pb.PersonalizationMethod.Name(method).lower()}"
    job = stub.Personalize(request(name, method=method, steps=4), metadata=auth())
    # A learned word is a placeholder, not a rare real token; "sks" is the DreamBooth adapter's
    # already, and each adapter of the tenant gets its own placeholder.
    if method == pb.TEXTUAL_INVERSION:
        assert job.token == "<ohwx>"
    assert job.token.startswith("<") and job.token.endswith(">")
    done = wait_for(stub, job.job_id, lambda j: j.state not in (pb.QUEUED, pb.RUNNING))
    assert done.state == pb.SUCCEEDED, done.error
    adapter = stub.GetAdapter(pb.GetAdapterRequest(adapter_id=done.adapter_id), metadata=auth())
    assert adapter.method == method and adapter.token == job.token
    assert (adapter.rank == 0) == (method == pb.TEXTUAL_INVERSION)

    # The placeholder means something only with the adapter: Generate with it differs from without.
    prompt = f"a {job.token} circle on a white background"
    plain = pb.GenerateRequest(prompt=prompt, steps=4, seed=3)
    tuned = pb.GenerateRequest(prompt=prompt, steps=4, seed=3, adapters=[pb.AdapterRef(adapter_id=done.adapter_id)])
    a = np.asarray(Image.open(io.BytesIO(stub.Generate(plain, metadata=auth()).images[0].data)), np.int16)
    b = np.asarray(Image.open(io.BytesIO(stub.Generate(tuned, metadata=auth()).images[0].data)), np.int16)
    assert np.abs(a - b).mean() > 0.5


def test_cancel_stops_a_running_job_and_frees_the_worker(jobs_gateway):
    stub = jobs_gateway.stub()
    job = stub.Personalize(request("long-one", steps=3000), metadata=auth())
    wait_for(stub, job.job_id, lambda j: j.state == pb.RUNNING and j.step >= 2)
    cancelled = stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=auth())
    assert cancelled.state == pb.CANCELLED
    # Cancelling again, or after the fact, changes nothing.
    assert stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=auth()).state == pb.CANCELLED
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=auth(), timeout=30))
    assert events[-1].state == pb.CANCELLED and not events[-1].job.adapter_id
    # The worker is free again: the next job runs, and no checkpoint of the cancelled one is left.
    checkpoints = jobs_gateway.settings.data_dir / "checkpoints"
    wait_for(stub, job.job_id, lambda j: not (checkpoints / f"{job.job_id}.ckpt").exists())
    nxt = stub.Personalize(request("after-cancel", steps=2, seed=1), metadata=auth())
    assert wait_for(stub, nxt.job_id, lambda j: j.state == pb.SUCCEEDED).adapter_id
    names = [a.name for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters]
    assert "long-one" not in names  # no adapter from a cancelled job


def test_per_tenant_limit_and_name_and_token_conflicts(jobs_gateway):
    stub = jobs_gateway.stub()
    first = stub.Personalize(request("limit-1", steps=3000), metadata=BOB)
    second = stub.Personalize(request("limit-2", steps=3000), metadata=BOB)
    assert first.token != second.token  # two active jobs never share a token
    with pytest.raises(grpc.RpcError) as err:
        stub.Personalize(request("limit-3"), metadata=BOB)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2" in err.value.details()
    for job in (first, second):
        stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=BOB)

    # A name taken by an adapter, or a token taken by one, is refused before anything is queued.
    done = stub.Personalize(request("taken-name", steps=2), metadata=BOB)
    done = wait_for(stub, done.job_id, lambda j: j.state == pb.SUCCEEDED, md=BOB)
    with pytest.raises(grpc.RpcError) as err:
        stub.Personalize(request("taken-name"), metadata=BOB)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and err.value.details().startswith("name:")
    clash = request("other-name")
    clash.token = done.token
    with pytest.raises(grpc.RpcError) as err:
        stub.Personalize(clash, metadata=BOB)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("token:")


def test_queue_bound_answers_resource_exhausted(tmp_path, one_torch_thread):
    running = start_gateway_in_thread(settings_for(tmp_path, max_queued_jobs=1, max_jobs_per_tenant=5))
    try:
        stub = running.stub()
        jobs = [stub.Personalize(request("q-running", steps=3000), metadata=auth())]
        wait_for(stub, jobs[0].job_id, lambda j: j.state == pb.RUNNING)
        jobs.append(stub.Personalize(request("q-waiting", steps=3000), metadata=auth()))
        with pytest.raises(grpc.RpcError) as err:
            stub.Personalize(request("q-refused"), metadata=auth())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
        for job in jobs:
            stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=auth())
    finally:
        stop_gateway(running)


def test_another_tenants_job_is_not_found_on_every_job_rpc(jobs_gateway):
    stub = jobs_gateway.stub()
    job = stub.Personalize(request("private", steps=2), metadata=auth())
    for call, req in ((stub.GetJob, pb.GetJobRequest(job_id=job.job_id)),
                      (stub.CancelJob, pb.CancelJobRequest(job_id=job.job_id))):
        with pytest.raises(grpc.RpcError) as err:
            call(req, metadata=BOB)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), metadata=BOB))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert job.job_id not in [j.job_id for j in stub.ListJobs(pb.ListJobsRequest(), metadata=BOB).jobs]
    assert job.job_id in [j.job_id for j in stub.ListJobs(pb.ListJobsRequest(), metadata=auth()).jobs]
    wait_for(stub, job.job_id, lambda j: j.state == pb.SUCCEEDED)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(token="dog"), "token"),  # a real word
        (dict(token="has space"), "token"),
        (dict(token="circle"), "token"),  # the class word
        (dict(images=[pb.Image(data=png(np.zeros((12, 12, 3))))] * 3), "images[0]"),  # too small to learn from
        (dict(options=pb.TrainingOptions(rank=64)), "options.rank"),  # above the bank's max rank
        (dict(options=pb.TrainingOptions(batch_size=1000)), "options.batch_size"),
        (dict(options=pb.TrainingOptions(prior_loss_weight=float("nan"))), "options.prior_loss_weight"),
        (dict(options=pb.TrainingOptions(num_class_images=100000)), "options.num_class_images"),
        (dict(method=pb.TEXTUAL_INVERSION, options=pb.TrainingOptions(rank=4)), "options.rank"),
        (dict(method=pb.CUSTOM_DIFFUSION, options=pb.TrainingOptions(train_text_encoder=True)),
         "options.train_text_encoder"),
        (dict(class_word="dog; rm -rf"), "class_word"),
    ],
)
def test_bad_personalize_requests_are_refused_before_queueing(jobs_gateway, change, field):
    stub = jobs_gateway.stub()
    before = len(stub.ListJobs(pb.ListJobsRequest(), metadata=auth()).jobs)
    req = request("bad-one")
    for key, value in change.items():
        if key in ("images",):
            del req.images[:]
            req.images.extend(value)
        elif key == "options":
            req.options.CopyFrom(value)
        else:
            setattr(req, key, value)
    with pytest.raises(grpc.RpcError) as err:
        stub.Personalize(req, metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field + ":"), err.value.details()
    assert len(stub.ListJobs(pb.ListJobsRequest(), metadata=auth()).jobs) == before


def style_request(name: str, steps: int = 6) -> pb.PersonalizeRequest:
    """FINESTYLE from the ONE reference image of a held-out style: one concept with its box, one
    to be located by cross-attention."""
    style = STYLES["neon-outline"]
    star = style.content[0]
    box = pb.Box(x0=int((star.cx - star.r) * 64), y0=int((star.cy - star.r) * 64),
                 x1=int((star.cx + star.r) * 64) + 1, y1=int((star.cy + star.r) * 64) + 1)
    return pb.PersonalizeRequest(
        method=pb.FINESTYLE, name=name, images=[pb.Image(data=png(style.reference().image))],
        concepts=[pb.Concept(phrase="a yellow star", box=box), pb.Concept(phrase="a pink circle")],
        style_phrase="in zwx style", options=pb.TrainingOptions(steps=steps, batch_size=2, seed=5))


def test_finestyle_job_then_generate_with_both_scales(jobs_gateway):
    stub = jobs_gateway.stub()
    job = stub.Personalize(style_request("neon"), metadata=auth())
    assert job.method == pb.FINESTYLE and job.token == "in zwx style" and job.class_word == ""
    done = wait_for(stub, job.job_id, lambda j: j.state not in (pb.QUEUED, pb.RUNNING))
    assert done.state == pb.SUCCEEDED, done.error
    assert len(done.previews) == 2  # "a yellow star in zwx style", with style guidance
    adapter = stub.GetAdapter(pb.GetAdapterRequest(adapter_id=done.adapter_id), metadata=auth())
    assert adapter.method == pb.FINESTYLE and adapter.token == "in zwx style"

    def image(**kw):
        req = pb.GenerateRequest(prompt="a blue square in zwx style", steps=4, seed=3, guidance_scale=4.0,
                                 adapters=[pb.AdapterRef(adapter_id=done.adapter_id)], **kw)
        return np.asarray(Image.open(io.BytesIO(stub.Generate(req, metadata=auth()).images[0].data)), np.int16)

    plain, styled, stronger = image(), image(style_guidance_scale=2.0), image(style_guidance_scale=6.0)
    assert np.abs(plain - styled).mean() > 0.5 and np.abs(styled - stronger).mean() > 0.5

    # Exported and imported again, it is still a style adapter (the file says so).
    exported = stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=done.adapter_id), metadata=auth())
    imported = stub.ImportAdapter(pb.ImportAdapterRequest(name="neon-again", safetensors=exported.safetensors),
                                  metadata=auth())
    assert imported.method == pb.FINESTYLE


# -- durability across a real process crash ---------------------------------------------------------


def _serve(data_dir, port) -> subprocess.Popen:
    env = dict(os.environ, STEERSERVE_API_KEYS="token-alice:alice", STEERSERVE_DATA_DIR=str(data_dir),
               STEERSERVE_GRPC_PORT=str(port), STEERSERVE_METRICS_PORT="0", STEERSERVE_CHECKPOINT_EVERY="5",
               STEERSERVE_JOB_PREVIEWS="1", STEERSERVE_DEFAULT_STEPS="2", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stub_when_ready(port, proc, timeout=120.0):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    stub = pb_grpc.SteerServeStub(channel)
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            stub.ListJobs(pb.ListJobsRequest(), metadata=auth(), timeout=2)
            return stub
        except grpc.RpcError:
            time.sleep(0.3)
    raise AssertionError("server did not start")


@pytest.mark.slow
def test_killed_server_resumes_the_job_from_its_checkpoint(tmp_path):
    port = free_port()
    proc = _serve(tmp_path, port)
    try:
        stub = _stub_when_ready(port, proc)
        job = stub.Personalize(request("survivor", steps=40), metadata=auth())
        job = wait_for(stub, job.job_id, lambda j: j.state == pb.RUNNING and j.step >= 12)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no shutdown handler runs
        proc.wait(30)
    assert (tmp_path / "checkpoints" / f"{job.job_id}.ckpt").exists()

    proc = _serve(tmp_path, port)
    try:
        stub = _stub_when_ready(port, proc)
        # Running again from its checkpoint, or already done (the rest is quick): either way it says so.
        resumed = wait_for(stub, job.job_id, lambda j: "resumed from step" in j.message
                           and j.state in (pb.RUNNING, pb.SUCCEEDED), timeout=180)
        # It went on from its last checkpoint (every 5 steps; it was killed past step 12), not from 0.
        step = int(re.search(r"resumed from step (\d+)", resumed.message).group(1))
        assert step >= 10, resumed.message
        done = wait_for(stub, job.job_id, lambda j: j.state == pb.SUCCEEDED, timeout=180)
        assert f"resumed from step {step}" in done.message
        assert done.adapter_id and len(done.previews) == 1
        assert not (tmp_path / "checkpoints" / f"{job.job_id}.ckpt").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
