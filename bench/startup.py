"""Start-up, measured as a new user and an operator meet it (issue 34).

    python -m bench.startup readme     # the README's first command on a fresh clone: setup, then
                                       # `serve --dev --demo --backend triton` to var/demo.png, twice
    python -m bench.startup sd15       # an SD 1.5-size folder (random weights, built here once):
                                       # `serve` until the gateway answers, in-process and through Triton

Each start is timed from the process start to the moment the public API answers (gRPC health
SERVING and one ListJobs), and for `readme` to the demo image on disk. `auto` (the default UNet
runtime) measures in the background, so these times hold no measurement; when it switched to the
winner is read from the server's output where it says. Results: bench/results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, clean_env, free_port

TOKEN = "startup-token"


def _wait_serving(server: subprocess.Popen, port: int, timeout_s: float) -> float:
    """Seconds until the gateway's health says SERVING and an authenticated RPC answers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service._generated.steerserve.v1 import steerserve_pb2 as pb
    from service._generated.steerserve.v1 import steerserve_pb2_grpc as pb_grpc

    started = time.monotonic()
    # Reconnect quickly: grpc's default backoff after the refused connections of the start grows
    # to tens of seconds, which would be timed as start-up.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.initial_reconnect_backoff_ms", 100),
                                                                  ("grpc.max_reconnect_backoff_ms", 250)])
    health, stub = health_pb2_grpc.HealthStub(channel), pb_grpc.SteerServeStub(channel)
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"serve exited with {server.returncode}")
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service="steerserve.v1.SteerServe"), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                stub.ListJobs(pb.ListJobsRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
                return time.monotonic() - started
        except grpc.RpcError:
            pass
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"not SERVING within {timeout_s:.0f} s")
        time.sleep(0.25)  # polling the server, within the deadline


def _stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
    except ProcessLookupError:
        pass


def readme(work: Path) -> dict:
    """The README's first command on a fresh clone of this commit, started twice."""
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = clean_env()
    started = time.monotonic()
    subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
    result = {"setup_s": round(time.monotonic() - started, 1), "starts": []}
    for attempt in ("first", "second"):
        port, log_path = free_port(), work / f"readme-{attempt}.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(
                [".venv/bin/steerserve", "serve", "--dev", "--demo", "--backend", "triton", "--grpc-port", str(port),
                 "--metrics-port", "0"], cwd=clone, env=dict(env, PYTHONUNBUFFERED="1"), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        demo = clone / "var" / "demo.png"
        demo.unlink(missing_ok=True)
        try:
            while "Demo:" not in log_path.read_text():
                if server.poll() is not None or time.monotonic() - started > 900:
                    raise RuntimeError(f"no demo image:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)  # polling the server's output, within the deadline
            demo_s = time.monotonic() - started
            text = log_path.read_text()
            listening = next((line for line in text.splitlines() if "listening on" in line), "")
            result["starts"].append({"start": attempt, "demo_png_s": round(demo_s, 1), "demo_exists": demo.exists(),
                                     "listening_line": listening})
        finally:
            _stop(server)
        print(attempt, result["starts"][-1], flush=True)
    return result


def build_sd15_folder(path: Path) -> Path:
    """A diffusers folder in SD 1.5's architecture (UNet 860 M, CLIP ViT-L text encoder, the SD VAE)
    with random weights, fp16 on disk; the embedded model's exact CLIP tokenizer. Built once."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from service.engine.default_model import trained_model_dir

    if (path / "model_index.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    embedded = trained_model_dir()
    shutil.copytree(embedded / "tokenizer", tmp / "tokenizer")
    shutil.copytree(embedded / "scheduler", tmp / "scheduler")
    torch.manual_seed(0)
    UNet2DConditionModel(cross_attention_dim=768, sample_size=64).half().save_pretrained(tmp / "unet")
    CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 max_position_embeddings=77, vocab_size=49408, projection_dim=768,
                                 hidden_act="quick_gelu")).half().save_pretrained(tmp / "text_encoder")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                  sample_size=512).half().save_pretrained(tmp / "vae")
    index = json.loads((embedded / "model_index.json").read_text())
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)
    return path


def sd15(work: Path, folder: Path, backends: list[str]) -> dict:
    out = {"folder": str(folder), "starts": []}
    for backend in backends:
        for attempt in ("first", "second"):
            port, log_path = free_port(), work / f"sd15-{backend}-{attempt}.log"
            env = dict(clean_env(), STEERSERVE_API_KEYS=f"{TOKEN}:bench", STEERSERVE_DATA_DIR=str(work / f"data-{backend}"),
                       STEERSERVE_GRPC_PORT=str(port), STEERSERVE_METRICS_PORT="0", STEERSERVE_HOST="127.0.0.1",
                       STEERSERVE_BACKEND=backend, STEERSERVE_TRITON_START_TIMEOUT_S="900", PYTHONUNBUFFERED="1")
            with open(log_path, "w") as log:
                server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--model-dir", str(folder)],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                seconds = _wait_serving(server, port, 900)
                row = {"backend": backend, "start": attempt, "serving_s": round(seconds, 1)}
            except RuntimeError as exc:
                row = {"backend": backend, "start": attempt, "error": f"{exc}; log: {log_path.read_text()[-1500:]}"}
            finally:
                _stop(server)
            print(row, flush=True)
            out["starts"].append(row)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["readme", "sd15"])
    parser.add_argument("--backends", default="inprocess,triton")
    parser.add_argument("--sd15-dir", default=str(ROOT / "var" / "bench-cache" / "sd15-random"))
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out_dir) / "startup.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="steerserve-startup-") as tmp:
        work = Path(tmp)
        if args.what == "readme":
            results["readme"] = readme(work)
        else:
            folder = build_sd15_folder(Path(args.sd15_dir))
            backends = args.backends.split(",")
            measured = sd15(work, folder, backends)
            # Keep the other backends' rows of an earlier run: each backend can be measured alone.
            kept = [r for r in results.get("sd15", {}).get("starts", []) if r["backend"] not in backends]
            results["sd15"] = {**measured, "starts": kept + measured["starts"]}
    results["machine"] = {"cpus": os.cpu_count(), "note": "shared 2-core CPU machine, no GPU"}
    out_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
