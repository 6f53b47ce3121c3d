"""model_repo/ and deploy/ without a server: configs parse as Triton's ModelConfig, the GPU variants
keep each model's interface, and the kustomize overlays build."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import text_format

from service.gateway.server import MODEL_REPOSITORY, TRITON_MODELS
from service.triton.client import grpcclient

REPO = Path(__file__).resolve().parent.parent
ModelConfig = grpcclient.model_config_pb2.ModelConfig


def load(path: Path):
    return text_format.Parse(path.read_text(), ModelConfig())


def test_every_served_model_has_a_python_model_and_a_config():
    for name in TRITON_MODELS:
        config = load(MODEL_REPOSITORY / name / "config.pbtxt")
        assert config.name == name and config.backend == "python"
        assert (MODEL_REPOSITORY / name / "1" / "model.py").is_file()
        assert all(g.kind == g.KIND_CPU and g.count == 1 for g in config.instance_group)


def test_unet_is_one_step_with_dynamic_batching_and_generate_is_decoupled():
    unet = load(MODEL_REPOSITORY / "unet" / "config.pbtxt")
    assert unet.max_batch_size > 1 and unet.HasField("dynamic_batching")
    assert {i.name for i in unet.input} == {"LATENTS", "TIMESTEP", "EMBEDS", "ADAPTERS"}
    assert load(MODEL_REPOSITORY / "generate" / "config.pbtxt").model_transaction_policy.decoupled


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decode", "personalize", "edit"])
def test_gpu_variant_keeps_the_interface(name):
    cpu = load(MODEL_REPOSITORY / name / "config.pbtxt")
    gpu = load(MODEL_REPOSITORY / name / "configs" / "gpu.pbtxt")
    assert [g.kind for g in gpu.instance_group] == [gpu.instance_group[0].KIND_GPU]
    assert list(gpu.input) == list(cpu.input) and list(gpu.output) == list(cpu.output)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_deploy_overlays_build(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "deploy" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "kind: Deployment" in out
    assert ("--model-config-name=gpu" in out) == (overlay == "gpu")
    assert ("nvidia.com/gpu" in out) == (overlay == "gpu")
