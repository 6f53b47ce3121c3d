import json
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from service.research.basemodel import DEFAULT_MODEL_DIR
from service.research.basemodel.train import main as train_main
from service.engine.tokenizer import build_clip_tokenizer
from bench.quality_report import held_in_scenes
from service.research.measures import Judge

SHIPPED_LIMIT_BYTES = 20_000_000


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionPipeline.from_pretrained(
        DEFAULT_MODEL_DIR, local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_shipped_folder_is_a_small_diffusers_model():
    files = [f for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < SHIPPED_LIMIT_BYTES
    for part in ("unet", "vae", "text_encoder"):
        assert list((DEFAULT_MODEL_DIR / part).glob("*.safetensors")), part
    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]


def test_loads_offline_as_fp32_with_clip_tokenization(pipe):
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert pipe.scheduler.config.steps_offset == 1
    reference = build_clip_tokenizer()
    text = "a red dotted star on a blue striped background"
    assert pipe.tokenizer(text).input_ids == reference(text).input_ids


@pytest.mark.slow
def test_generates_deterministically_and_draws_what_the_prompt_says(pipe):
    prompts = [s.caption for s in held_in_scenes(14)]

    def run():
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return pipe(prompts, num_inference_steps=15, guidance_scale=4.0, generator=gens, output_type="np").images

    a, b = run(), run()
    assert a.shape == (14, 64, 64, 3) and np.array_equal(a, b)
    images = [np.rint(im * 255).astype(np.uint8) for im in a]
    alignment = Judge().prompt_alignment(images, prompts)
    # Chance: 1/9 for colours, 1/3 for texture, 1/5 for background kind, 1/7 for shape. The shipped
    # model reads 14/14 colours, textures, background kinds and colours and 7/14 shapes here with
    # 15 steps (81% of shapes on the 70-prompt report at 25 steps; docs/world.md); the bars leave
    # room for other CPUs' rounding.
    assert alignment["color"] >= 0.85 and alignment["texture"] >= 0.85 and alignment["bg_color"] >= 0.85, alignment
    assert alignment["background"] >= 0.75 and alignment["shape"] >= 0.3, alignment


@pytest.mark.slow
def test_training_script_trains_checkpoints_and_resumes(tmp_path):
    threads = torch.get_num_threads()

    def train(steps):
        train_main(["--workdir", str(tmp_path), "--out", str(tmp_path / "model"), "--vae-steps", "2", "--vae-batch", "2",
                    "--dataset-size", "8", "--unet-steps", str(steps), "--unet-batch", "2", "--ckpt-every", "2"])  # fmt: skip

    try:
        train(2)
        train(3)  # resumes from the step-2 checkpoint rather than starting over
    finally:
        torch.set_num_threads(threads)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "checkpoint"] == [2, 3]
    assert [r["step"] for r in log if r["stage"] == "vae"] == [2]  # the VAE was not retrained either
    # Without the checkpoint (a fresh checkout), training continues from an exported folder.
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "model", local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        train_main(["--stage", "unet", "--workdir", str(tmp_path / "fresh"), "--init-from", str(tmp_path / "model"),
                    "--out", str(tmp_path / "model2"), "--dataset-size", "8", "--unet-steps", "1", "--unet-batch", "2",
                    "--unet-lr", "0"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    continued = StableDiffusionPipeline.from_pretrained(tmp_path / "model2", local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # lr 0: the continued model is the exported one, so it really started from it.
    for a, b in zip(exported.unet.parameters(), continued.unet.parameters()):
        assert torch.equal(a, b)


def test_a_grown_unet_starts_as_the_model_it_grew_from():
    """--init-from an older architecture (no attention at 16x16): every old weight lands, the new
    attention block starts as the identity, so the first step computes what the old model did."""
    from diffusers import UNet2DConditionModel

    from service.research.basemodel.train import load_grown_unet

    small = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"))  # fmt: skip
    torch.manual_seed(0)
    old = UNet2DConditionModel(**small, up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    grown = UNet2DConditionModel(**small, up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    load_grown_unet(grown, old)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    with torch.no_grad():
        assert torch.allclose(grown(x, 10, text).sample, old(x, 10, text).sample, atol=1e-6)
    # The other way round, weights would be dropped: refused.
    with pytest.raises(ValueError, match="lacks"):
        load_grown_unet(old, grown)


def test_object_regions_cover_the_objects_and_their_outline_band():
    from service.research.basemodel.train import object_regions
    from service.research.world.generator import generate

    sample = generate(5, 0, p_two_objects=0.0)
    regions = object_regions([sample], 16)[0, 0]
    cells = torch.from_numpy(sample.masks[0]).float().reshape(16, 4, 16, 4).amax(dim=(1, 3))
    assert bool((regions >= cells).all()) and regions.sum() > cells.sum()  # grown by a band
    assert regions.sum() < 256 * 0.8  # the background stays background
