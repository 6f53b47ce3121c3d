"""`steerserve serve --dev --demo` starts, prints address + token, and the client commands work."""

from __future__ import annotations

import os
import re
import statistics
import signal
import subprocess
import sys
import time

import torch
from pathlib import Path

from service.adapters import parse_adapter
from service.engine.default_model import default_model_dir
from tests.adapter_files import lora_file
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent


def test_serve_and_client_commands(tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEERSERVE_")}
    # No STEERSERVE_UNET_RUNTIME: `serve` picks its UNet runtime by measurement, as on a fresh clone;
    # torch.compile's cold compile (minutes on CI's 2 cores) is left out of the candidates here.
    env.update(STEERSERVE_DEFAULT_STEPS="2", PYTHONUNBUFFERED="1", STEERSERVE_UNET_RUNTIME_CANDIDATES="eager,onnx")
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--dev", "--demo", "--grpc-port", str(port),
         "--metrics-port", str(metrics_port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Demo:"):
                break
        output = "".join(lines)
        assert f"listening on 127.0.0.1:{port}" in output, output
        token = re.search(r"Development token \(tenant 'dev'\): (\S+)", output).group(1)
        assert f"STEERSERVE_ADDRESS=127.0.0.1:{port} STEERSERVE_TOKEN={token}" in output
        assert (tmp_path / "data/demo.png").read_bytes()[:4] == b"\x89PNG"

        cenv = dict(env, STEERSERVE_ADDRESS=f"127.0.0.1:{port}", STEERSERVE_TOKEN=token)

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True,
                                  env=cenv, cwd=tmp_path, timeout=120)

        # `serve` answered at once on eager while `auto` measured in the background; the choice
        # lands without a flag, by timing both (polled with a deadline).
        assert "UNet runtime eager serving now" in output, output
        deadline = time.monotonic() + 300
        while True:
            out = cli("info")
            assert out.returncode == 0, out.stderr
            runtime = re.search(r"UNet runtime: (\w+) \(measured: (eager [^;]*); (onnx [^)]*)\)", out.stdout)
            if runtime or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # polling the server's state, within the deadline
        assert "model profile: steerserve-world (chosen by model folder)" in out.stdout
        assert "DREAMBOOTH_LORA" in out.stdout and "backend inprocess" in out.stdout
        assert runtime, out.stdout

        def times(text):  # "eager 5.1 ms x2, 20.3 ms x16" -> {"2": 5.1, "16": 20.3}
            return {rows: float(ms) for ms, rows in re.findall(r"([\d.]+) ms x(\d+)", text)}

        # The code's rule: onnx's time over eager's, geometric mean over the probe shapes.
        eager_ms, onnx_ms = times(runtime.group(2)), times(runtime.group(3))
        assert set(eager_ms) == set(onnx_ms) == {"2", "16"}
        score = statistics.geometric_mean([onnx_ms[r] / eager_ms[r] for r in eager_ms])
        assert runtime.group(1) == ("onnx" if score < 1 else "eager")

        out = cli("generate", "a red circle", "-o", "x.png", "--seed", "4", "-n", "2")
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "x-0.png").exists() and (tmp_path / "x-1.png").exists()
        assert "seeds [4, 5]" in out.stdout

        original = lora_file(default_model_dir(tmp_path / "data" / "models"))
        (tmp_path / "lora.safetensors").write_bytes(original)
        out = cli("adapters", "import", "lora.safetensors", "--name", "mine")
        assert out.returncode == 0, out.stderr
        adapter_id = out.stdout.split()[0]
        out = cli("adapters", "list")
        assert adapter_id in out.stdout
        out = cli("adapters", "export", adapter_id, "-o", "back.safetensors")
        assert out.returncode == 0, out.stderr
        exported, imported = parse_adapter(str(tmp_path / "back.safetensors")), parse_adapter(original)
        assert exported.lora.keys() == imported.lora.keys()
        for name, module in imported.lora.items():
            assert torch.equal(exported.lora[name].down, module.down) and torch.equal(exported.lora[name].up, module.up)
            assert exported.lora[name].scale == module.scale

        # Personalize with a progress bar fed by WatchJob, then the job in `jobs list`.
        from PIL import Image
        from service.research.world.heldout import CONCEPTS

        photos = []
        for i, sample in enumerate(CONCEPTS["yellow-crescent"].references(3)):
            Image.fromarray(sample.image).save(tmp_path / f"photo{i}.png")
            photos.append(f"photo{i}.png")
        # Instant personalization: the photos as an image prompt, in one request or stored.
        out = cli("generate", "a circle on a green background", "--reference", photos[0], "--reference", photos[1],
                  "-o", "ip.png", "--seed", "2")
        assert out.returncode == 0, out.stderr
        out = cli("adapters", "create-image-prompt", *photos[:2], "--name", "cli-photos")
        assert out.returncode == 0 and "IMAGE_PROMPT" in out.stdout, out.stdout + out.stderr
        out = cli("generate", "a circle on a green background", "--adapter", out.stdout.split()[0], "-o", "ip2.png",
                  "--seed", "2")
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "ip.png").read_bytes() == (tmp_path / "ip2.png").read_bytes()
        out = cli("personalize", *photos, "--method", "dreambooth-lora", "--name", "cli-crescent", "--class-word",
                  "circle", "--steps", "4", "--batch-size", "2", "--previews", "previews")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCEEDED: adapter ad-" in out.stdout and "training: 100%" in out.stderr
        assert "token 'sks'" in out.stdout and len(list((tmp_path / "previews").glob("*.png"))) >= 1
        out_job = out.stdout
        out = cli("jobs", "list")
        assert "cli-crescent" in out.stdout and "SUCCEEDED" in out.stdout and "4/4" in out.stdout

        # Edit with that adapter: a progress bar fed by EditStream, the image and the subject mask.
        adapter_id = re.search(r"adapter (ad-\S+)", out_job).group(1)
        from service.research.world.generator import Scene, WorldObject, render

        source = render(Scene("stripes", "blue", (WorldObject("square", "red", "solid", 0.5, 0.5, 0.28),)))
        Image.fromarray(source.image).save(tmp_path / "source.png")
        out = cli("edit", "source.png", "--source-prompt", source.caption, "--target-prompt",
                  "a sks circle on a blue striped background", "--adapter", adapter_id, "--steps", "6",
                  "--steer-steps", "2", "-o", "edited.png")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "editing: 100%" in out.stderr and "phase=" in out.stderr
        assert (tmp_path / "edited.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "edited-mask.png").exists()
        out = cli("edit", "source.png", "--source-prompt", "x", "--target-prompt", "a circle", "--adapter", adapter_id)
        assert out.returncode == 1 and "INVALID_ARGUMENT: target_prompt" in out.stderr

        out = cli("generate", "x", "--width", "63")
        assert out.returncode == 1 and "INVALID_ARGUMENT: width" in out.stderr
        out = cli("generate", "x", "--token", "wrong")
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0
