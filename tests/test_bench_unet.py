"""The GPU UNet bench (bench/gpu/bench_unet.py) at its reduced CPU size: every part runs, SDXL included.

No GPU here or in CI: this proves the bench's code (the SDXL conditioning packed as served, adapters
per row through the bank, the FLOP count, the DDS call and the training step), not its figures.
"""

from __future__ import annotations

import json

import pytest

from bench.gpu import bench_unet
from bench.model_folders import sdxl_base_unet_config


def test_sdxl_base_config_is_sdxl_base():
    import torch
    from diffusers import UNet2DConditionModel

    from service.engine.families import SDXL

    config = sdxl_base_unet_config()
    with torch.device("meta"):
        params = sum(p.numel() for p in UNet2DConditionModel(**config).parameters())
    assert 2.56e9 < params < 2.57e9  # SDXL base's UNet: 2,567,463,684
    family = SDXL.from_configs({"text_encoder_2": []}, config)
    assert (family.text_width, family.pooled_width, family.added_tokens) == (2048, 1280, 1)
    assert bench_unet.CASES["sdxl", "full"].latent * 8 == 1024


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sdxl", "sd15"])
def test_bench_runs_at_cpu_size(model, tmp_path, one_torch_thread):
    # No CUDA: the small size by default, eager only (about 5 s each here).
    report = bench_unet.main(["--model", model, "--batches", "1,2", "--repeats", "1", "--out-dir", str(tmp_path)])
    name = f"gpu_unet_{model}_small_cpu"
    assert json.loads((tmp_path / f"{name}.json").read_text()) == report
    assert "No GPU measured here" in (tmp_path / f"{name}.md").read_text()
    (run,) = report["runs"]
    assert report["size"] == "small" and run["dtype"] == "float32" and run["compile_seconds"] is None
    assert [s["batch"] for s in run["steps"]] == [1, 2]
    assert run["flops_per_cfg_step"] > 0 and run["dds_iteration_ms"] > 0 and run["dreambooth_lora_step_ms"] > 0
    for step in run["steps"]:
        assert step["adapter_output_change"] > 1e-4  # the bank routed each image's own adapter
        assert 0 < step["ceiling_fraction"] and step["peak_fraction"] is None
