"""Crash safety by real kills: the gateway runs as its own process (`python -m service serve`) and is
killed with SIGKILL in the middle of ImportAdapter, of a job's checkpoint write and of a job's
adapter registration, then started again on the same data folder. Afterwards no partial adapter is
visible, no job is lost (it resumes and succeeds), no stray file is left, and SQLite's
integrity_check passes. A full disk (a file-size limit on the process, RLIMIT_FSIZE) answers
RESOURCE_EXHAUSTED and leaves nothing half-written.

Most kills land at named points (service/crashpoints.py: exactly between the writes whose order
keeps the stores consistent); one test also kills from outside at random instants.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc
from service.engine.default_model import default_model_dir
from service.jobs.runner import adapter_id_for
from tests.adapter_files import lora_file
from tests.conftest import TOKENS, auth, free_port

REPO = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """`python -m service serve` on a data folder, in-process backend, as a child process."""

    def __init__(self, data_dir: Path, model_dir: Path, crash_point: str | None = None,
                 file_size_limit: int | None = None, env: dict[str, str] | None = None):
        self.data_dir, self.port = data_dir, free_port()
        extra_env = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
        env.update(
            STEERSERVE_API_KEYS=",".join(f"{t}:{n}" for t, n in TOKENS.items()),
            STEERSERVE_CHECKPOINT_EVERY="2", STEERSERVE_JOB_PREVIEWS="0", STEERSERVE_DEFAULT_STEPS="2",
            PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
            # Not what these tests are about: `auto` would measure the runtimes (a cold torch.compile)
            # at every start of every process (tests/test_compiled_unet.py, test_cli.py cover it).
            STEERSERVE_UNET_RUNTIME="eager",
        )
        if crash_point:
            env["STEERSERVE_CRASH_POINT"] = crash_point
        env.update(extra_env)

        def limit_file_size():  # Python ignores SIGXFSZ, so an oversized write fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        self.log = data_dir.parent / f"{data_dir.name}-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--grpc-port", str(self.port), "--metrics-port", "0",
                 "--data-dir", str(data_dir), "--model-dir", str(model_dir)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                preexec_fn=limit_file_size if file_size_limit else None,
            )
        deadline = time.monotonic() + 120
        while "listening on" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.SteerServeStub(self.channel)

    def killed(self, timeout: float = 120) -> bool:
        """Waits for the process to die; True when it died of SIGKILL."""
        return self.proc.wait(timeout) == -signal.SIGKILL

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def model_dir(model_cache):
    return default_model_dir(model_cache)


# -- what must hold after any crash ----------------------------------------------------------------


def database(data_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(data_dir / "steerserve.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def assert_consistent(data_dir: Path) -> None:
    """integrity_check passes; every registered adapter's file exists and matches its checksum;
    no file is left that nothing refers to (temp files, unregistered blobs, ended jobs' checkpoints)."""
    with database(data_dir) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT blob, sha256 FROM adapters").fetchall()
        active = {r[0] for r in conn.execute("SELECT job_id FROM jobs WHERE state IN ('QUEUED', 'RUNNING')")}
    blobs = data_dir / "adapters"
    for row in rows:
        assert hashlib.sha256((blobs / row["blob"]).read_bytes()).hexdigest() == row["sha256"]
    on_disk = {p.relative_to(blobs).as_posix() for p in blobs.rglob("*") if p.is_file()}
    assert on_disk == {row["blob"] for row in rows}, on_disk
    checkpoints = {p.name for p in (data_dir / "checkpoints").iterdir()} if (data_dir / "checkpoints").exists() else set()
    assert checkpoints <= {f"{job}.ckpt" for job in active}, checkpoints


def files_under(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- ImportAdapter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["atomic_write.temp_written", "adapter.blob_written", "adapter.row_inserted",
                                   "adapter.committed"])
def test_kill_during_import_leaves_no_partial_adapter(tmp_path, model_dir, point):
    data = tmp_path / "data"
    blob = lora_file(model_dir, rank=4, seed=1)
    gateway = GatewayProcess(data, model_dir, crash_point=point)
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.ImportAdapter(pb.ImportAdapterRequest(name="mine", safetensors=blob), metadata=auth(), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the connection died with the process
    assert gateway.killed()
    gateway.stop()
    # The kill landed where it was meant to: something is on disk mid-way.
    left = files_under(data / "adapters")
    assert any(name.endswith(".tmp") for name in left) == (point == "atomic_write.temp_written"), left

    gateway = GatewayProcess(data, model_dir)  # restart on the same folder
    try:
        listed = gateway.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters
        if point == "adapter.committed":  # committed before the kill: complete and intact
            assert [a.name for a in listed] == ["mine"]
            assert listed[0].sha256 == hashlib.sha256(
                gateway.stub.ExportAdapter(pb.ExportAdapterRequest(adapter_id=listed[0].adapter_id),
                                           metadata=auth()).safetensors).hexdigest()
        else:  # never registered: invisible, the name free, the file gone
            assert list(listed) == []
            gateway.stub.ImportAdapter(pb.ImportAdapterRequest(name="mine", safetensors=blob), metadata=auth())
        assert_consistent(data)
    finally:
        gateway.stop()


def test_random_kills_during_imports_never_leave_a_partial_adapter(tmp_path, model_dir):
    """kill -9 from outside at random instants while clients import adapters, three times over."""
    data = tmp_path / "data"
    blobs = [lora_file(model_dir, rank=8, seed=s) for s in range(4)]
    rng = random.Random(7)
    answered: set[str] = set()  # names whose import the client saw succeed
    for round_ in range(3):
        gateway = GatewayProcess(data, model_dir)
        stop = threading.Event()

        def client(worker: int):
            i = 0
            while not stop.is_set():
                name = f"r{round_}-w{worker}-{i}"
                try:
                    gateway.stub.ImportAdapter(pb.ImportAdapterRequest(name=name, safetensors=blobs[i % 4]),
                                               metadata=auth(), timeout=10)
                    answered.add(name)
                except grpc.RpcError:
                    return  # the server died under us
                i += 1

        workers = [threading.Thread(target=client, args=(w,)) for w in range(3)]
        before = len(answered)
        for w in workers:
            w.start()
        deadline = time.monotonic() + 60  # imports are going through (this round's first one answered)...
        while len(answered) == before:
            assert time.monotonic() < deadline and any(w.is_alive() for w in workers), "no import answered"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # ...then the kill at a random instant among them: the test's subject
        gateway.proc.send_signal(signal.SIGKILL)
        assert gateway.killed()
        stop.set()
        for w in workers:
            w.join(30)
        gateway.stop()

    gateway = GatewayProcess(data, model_dir)
    try:
        listed = {a.name for a in gateway.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters}
        assert answered and answered <= listed  # every import a client saw succeed survived
        assert len(listed - answered) <= 3  # at most the one per worker in flight when killed
        assert_consistent(data)
    finally:
        gateway.stop()


# -- jobs: checkpoint writes and adapter registration -----------------------------------------------


def personalize_request(name: str, steps: int = 6) -> pb.PersonalizeRequest:
    from service.research.world.heldout import CONCEPTS

    photos = []
    for sample in CONCEPTS["yellow-crescent"].references(3, seed=0):
        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, format="PNG")
        photos.append(pb.Image(data=buf.getvalue()))
    return pb.PersonalizeRequest(method=pb.CUSTOM_DIFFUSION, name=name, class_word="circle", images=photos,
                                 options=pb.TrainingOptions(steps=steps, batch_size=1, seed=4))


def wait_finished(stub, job_id: str, timeout: float = 300) -> pb.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=auth())
        if job.state not in (pb.QUEUED, pb.RUNNING):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.mark.parametrize("point,resumed_from", [
    ("atomic_write.temp_written", 0),  # during the first checkpoint write: nothing to resume from
    ("checkpoint.written:2", 4),  # the second checkpoint is in place, its step not yet recorded
    ("job.adapter_registered", None),  # trained and registered, the job not yet SUCCEEDED
])
def test_kill_during_a_job_loses_nothing(tmp_path, model_dir, point, resumed_from):
    data = tmp_path / "data"
    gateway = GatewayProcess(data, model_dir, crash_point=point)
    job = gateway.stub.Personalize(personalize_request("crescent"), metadata=auth())
    assert gateway.killed()
    gateway.stop()
    with database(data) as conn:  # the job's row was committed before Personalize answered
        assert conn.execute("SELECT state FROM jobs WHERE job_id=?", (job.job_id,)).fetchone()[0] == "RUNNING"
        registered = conn.execute("SELECT adapter_id, created_at FROM adapters").fetchall()
    assert [r[0] for r in registered] == ([adapter_id_for(job.job_id)] if resumed_from is None else [])

    gateway = GatewayProcess(data, model_dir)
    try:
        done = wait_finished(gateway.stub, job.job_id)
        assert done.state == pb.SUCCEEDED, done.error
        assert done.adapter_id == adapter_id_for(job.job_id)
        adapters = gateway.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters
        assert [a.adapter_id for a in adapters] == [done.adapter_id]  # one adapter, not one per attempt
        if resumed_from is None:  # found its registered adapter rather than training again
            assert adapters[0].created_at.ToNanoseconds() == int(registered[0][1] * 1e9)
        elif resumed_from:
            assert f"resumed from step {resumed_from}" in done.message, done.message
        else:
            assert "resumed" not in done.message, done.message
        with database(data) as conn:
            assert conn.execute("SELECT attempts FROM jobs WHERE job_id=?", (job.job_id,)).fetchone()[0] == 2
        assert_consistent(data)
    finally:
        gateway.stop()


# -- a full disk -----------------------------------------------------------------------------------


def big_lora(model_dir: Path, rank: int = 16) -> bytes:
    """A LoRA over every cross-attention projection of the served UNet (half a megabyte here)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_q", "attn1.to_k", "attn1.to_v")):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    return save(tensors, metadata={"format": "pt"})


def test_a_full_disk_answers_resource_exhausted_and_stores_nothing(tmp_path, model_dir):
    data = tmp_path / "data"
    big = big_lora(model_dir)
    limit = 256 * 1024
    assert len(big) > limit
    gateway = GatewayProcess(data, model_dir, file_size_limit=limit)
    try:
        with pytest.raises(grpc.RpcError) as err:
            gateway.stub.ImportAdapter(pb.ImportAdapterRequest(name="big", safetensors=big), metadata=auth())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "storage is full" in err.value.details() and "nothing was stored" in err.value.details()
        assert gateway.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters == []
        assert files_under(data / "adapters") == []  # the temp file was removed
        # The service keeps working: a file that fits is stored.
        small = lora_file(model_dir, rank=2)
        gateway.stub.ImportAdapter(pb.ImportAdapterRequest(name="small", safetensors=small), metadata=auth())

        # A job whose checkpoint does not fit (custom diffusion's K/V + AdamW state is larger than the
        # limit) ends FAILED with the reason, leaving no file behind.
        job = gateway.stub.Personalize(personalize_request("crescent", steps=4), metadata=auth())
        done = wait_finished(gateway.stub, job.job_id)
        assert done.state == pb.FAILED and "storage is full" in done.error, (done.state, done.error)
        assert [a.name for a in gateway.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters] == ["small"]
        assert gateway.proc.poll() is None
        assert_consistent(data)
    finally:
        gateway.stop()
