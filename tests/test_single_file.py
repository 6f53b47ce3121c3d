"""Single-file checkpoints (service/engine/checkpoints.py): a tiny SD 1.x-, SD 2.x- (v-prediction) and
SDXL-structured diffusers folder is written as ONE file in the original layout (the inverse of
diffusers' renaming, written here: `original_layout`), served from that file, and the served model
equals the folder it came from: every UNet, VAE and text-encoder tensor, and a short generation.
Nothing reaches the network (sockets are refused while converting). Real sizes are checked on the
meta device: the shipped SD 1.5 / 2.1 / XL configs, written in the original layout, convert back
to themselves. What is not a checkpoint is refused in one line; a pickle is never unpickled."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench.model_folders import sdxl_folder
from service.config import Settings
from service.cli import main
from service.engine import checkpoint_configs, checkpoints, families
from service.engine.checkpoints import CheckpointError
from service.engine.default_model import seeded_model_dir
from service.engine.pipeline import Engine, GenerationSpec
from service.engine.sampling import ddim_config
from service.engine.tokenizer import build_clip_tokenizer
from service.profiles import choose
from service.research.basemodel.config import SD_SCHEDULER_CONFIG

UNET, VAE = "model.diffusion_model.", "first_stage_model."


# -- diffusers folder -> original single-file layout (what A1111/ComfyUI/Stability files hold) ------


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _rename(state: dict, prefixes: dict[str, str], inner=None) -> dict:
    out = {}
    for key, value in state.items():
        hf = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        assert hf is not None, f"no original name for {key}"
        rest = key[len(hf):]
        if inner:
            rest = inner(hf, rest)
        out[prefixes[hf] + rest] = value
    return out


def unet_to_original(state: dict, config: dict) -> dict:
    levels, n = len(config["block_out_channels"]), config["layers_per_block"]
    p = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
         "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
         "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
         "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(n):
            p[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * (n + 1) + j + 1}.0."
            p[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * (n + 1) + j + 1}.1."
        for j in range(n + 1):
            p[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (n + 1) + j}.0."
            p[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (n + 1) + j}.1."
        if i < levels - 1:
            p[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (n + 1)}.0.op."
            attn = config["up_block_types"][i].startswith("CrossAttn")
            p[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{i * (n + 1) + n}.{2 if attn else 1}.conv."

    def resnet(hf, rest):
        if ".resnets." in hf:
            head, _, tail = rest.partition(".")
            return f"{_RESNET.get(head, head)}.{tail}"
        return rest

    return _rename(state, p, resnet)


def vae_to_original(state: dict, config: dict) -> dict:
    levels = len(config["block_out_channels"])
    p = {"encoder.conv_in.": "encoder.conv_in.", "encoder.conv_out.": "encoder.conv_out.",
         "encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_in.": "decoder.conv_in.",
         "decoder.conv_out.": "decoder.conv_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
         "quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for side in ("encoder", "decoder"):
        p[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        for k in range(2):
            p[f"{side}.mid_block.resnets.{k}."] = f"{side}.mid.block_{k + 1}."
    for i in range(levels):
        for j in range(config["layers_per_block"] + 1):
            p[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            p[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        p[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        p[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{levels - 1 - i}.upsample.conv."
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

    def inner(hf, rest):
        if ".attentions." in hf:
            for ours, theirs in attn.items():
                if rest.startswith(ours + "."):
                    return theirs + rest[len(ours):]
        return rest.replace("conv_shortcut", "nin_shortcut")

    out = _rename(state, p, inner)
    # The original attention projections are 1x1 convolutions.
    return {k: (v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v) for k, v in out.items()}


def clip_to_original(state: dict, prefix: str) -> dict:
    """A CLIP ViT-L-layout tower (SD 1.x, SDXL's first): `<prefix>text_model.*`, with the
    position_ids buffer the original files carry."""
    out = {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def openclip_to_original(state: dict, prefix: str, extra_block: bool = False) -> dict:
    """An OpenCLIP-layout tower (SD 2.x, SDXL's second): fused q/k/v, `text_projection` as a matrix
    applied on the right. extra_block: SD 2.x files carry OpenCLIP's last block (and a projection),
    which SD 2.x does not use."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out, layers = {}, 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    for i in range(layers + int(extra_block)):
        src = f"encoder.layers.{min(i, layers - 1)}."
        dst = f"{prefix}transformer.resblocks.{i}."
        take = (lambda t: torch.randn_like(t)) if i == layers else (lambda t: t)
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = take(torch.cat([state[src + f"self_attn.{c}_proj.{kind}"] for c in "qkv"]))
            out[dst + f"attn.out_proj.{kind}"] = take(state[src + f"self_attn.out_proj.{kind}"])
            out[dst + f"ln_1.{kind}"] = take(state[src + f"layer_norm1.{kind}"])
            out[dst + f"ln_2.{kind}"] = take(state[src + f"layer_norm2.{kind}"])
            out[dst + f"mlp.c_fc.{kind}"] = take(state[src + f"mlp.fc1.{kind}"])
            out[dst + f"mlp.c_proj.{kind}"] = take(state[src + f"mlp.fc2.{kind}"])
    out[prefix + "token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = state["embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = state["final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = state["final_layer_norm.bias"]
    width = state["embeddings.token_embedding.weight"].shape[1]
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    elif extra_block:
        out[prefix + "text_projection"] = torch.randn(width, width).to(state["final_layer_norm.weight"])
    out[prefix + "logit_scale"] = torch.tensor(4.6)
    return out


def original_layout(states: dict[str, dict], configs: dict[str, dict], family: str) -> dict:
    """One original-layout state dict from a folder's component state dicts (sd1, sd2 or sdxl)."""
    out = {UNET + k: v for k, v in unet_to_original(states["unet"], configs["unet"]).items()}
    out.update({VAE + k: v for k, v in vae_to_original(states["vae"], configs["vae"]).items()})
    if family == "sd1":
        out.update(clip_to_original(states["text_encoder"], "cond_stage_model.transformer."))
    elif family == "sd2":
        out.update(openclip_to_original(states["text_encoder"], "cond_stage_model.model.", extra_block=True))
    else:
        out.update(clip_to_original(states["text_encoder"], "conditioner.embedders.0.transformer."))
        out.update(openclip_to_original(states["text_encoder_2"], "conditioner.embedders.1.model."))
    return out


WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")


def folder_states(folder: Path) -> tuple[dict, dict]:
    states, configs = {}, {}
    for part in WEIGHTED:
        if (folder / part).is_dir():
            weights = next((folder / part).glob("*.safetensors"))
            states[part] = load_file(weights)
            configs[part] = json.loads((folder / part / "config.json").read_text())
    return states, configs


def write_single_file(folder: Path, family: str, path: Path) -> Path:
    states, configs = folder_states(folder)
    save_file({k: v.contiguous() for k, v in original_layout(states, configs, family).items()}, str(path))
    return path


# -- fixtures: the structured tiny folders -------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (diffusers/transformers/huggingface_hub alike)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def sd2_structured_folder(path: Path) -> Path:
    """SD 2.x's structure at tiny widths: OpenCLIP-style text encoder (gelu, pad "!", 23 layers, as
    diffusers' SD 2 text encoder), linear attention projections, 64-channel heads, v-prediction."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True, norm_num_groups=32)
    torch.manual_seed(2)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=64)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, intermediate_size=32, num_attention_heads=1, num_hidden_layers=23, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1))
    tokenizer = build_clip_tokenizer()
    tokenizer.pad_token = "!"
    scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path, safe_serialization=True)
    return path


# -- the served model equals the folder ----------------------------------------------------------------


def assert_same_model(folder: Path, served: Path) -> None:
    ours, configs = folder_states(folder)
    theirs, served_configs = folder_states(served)
    assert sorted(ours) == sorted(theirs)
    for part in ours:
        assert ours[part].keys() == theirs[part].keys(), part
        for key, value in ours[part].items():
            assert torch.equal(value, theirs[part][key]), f"{part}: {key}"
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
                "attention_head_dim", "transformer_layers_per_block", "use_linear_projection", "addition_embed_type",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        a, b = configs["unet"].get(key), served_configs["unet"].get(key)
        assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b) or \
            {a, b} <= {1, (1,)} or (isinstance(a, list) and len(set(a)) == 1 and b == a[0]), (key, a, b)
    for part in ("text_encoder", "text_encoder_2"):
        if part in configs:
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"):
                assert configs[part][key] == served_configs[part][key], (part, key)
    for part in ("tokenizer", "tokenizer_2"):
        if (folder / part).is_dir():
            pad = lambda f: json.loads((f / part / "tokenizer_config.json").read_text())["pad_token"]  # noqa: E731
            assert pad(folder) == pad(served), part
    # The schedule the engine samples with (DDIM on the folder's betas), prediction type included.
    ddim = lambda f: {k: v for k, v in ddim_config(DDIMScheduler.load_config(f / "scheduler")).items()  # noqa: E731
                      if k in inspect.signature(DDIMScheduler).parameters}
    assert ddim(folder) == ddim(served)
    spec = GenerationSpec(prompt="a red circle on a blue background", steps=3, seed=4, width=64, height=64,
                          guidance_scale=5.0)
    images = [np.asarray(Engine.from_pretrained(f).generate(spec).images[0]) for f in (folder, served)]
    assert np.array_equal(images[0], images[1])


def test_sd1_file_served_through_the_setting_equals_its_folder(tmp_path, no_network):
    folder = seeded_model_dir(tmp_path / "models")
    file = write_single_file(folder, "sd1", tmp_path / "tiny-sd15.safetensors")
    # What the tensors do not say: the tiny text encoder's heads (published CLIP: 64 channels each)
    # and the image size.
    (tmp_path / "tiny-sd15.steerserve.json").write_text(json.dumps(
        {"unet": {"sample_size": 32}, "text_encoder": {"num_attention_heads": 4}}))
    settings = Settings(model_dir=file, data_dir=tmp_path / "data")
    served = settings.resolved_model_dir()
    assert served.parent == tmp_path / "data" / "models" / "checkpoints" and served.name.startswith("tiny-sd15-")
    assert_same_model(folder, served)
    # Converted once: the next start finds the folder (by the memoized content digest).
    stamp = (served / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    checkpoints._memo.clear()
    assert Settings(model_dir=file, data_dir=tmp_path / "data").resolved_model_dir() == served
    assert (served / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    # Another prediction-type setting is another conversion.
    other = Settings(model_dir=file, data_dir=tmp_path / "data", checkpoint_prediction_type="v_prediction")
    assert other.resolved_model_dir() != served
    assert choose(str(served)) == settings.profile()


def test_sd2_v_prediction_file_equals_its_folder_and_the_cli_writes_a_folder(tmp_path, no_network):
    folder = sd2_structured_folder(tmp_path / "sd2")
    file = write_single_file(folder, "sd2", tmp_path / "tiny-sd21-v.safetensors")
    # No sidecar: v-prediction is diffusers' SD 2.x default, heads are 64-channel, the text encoder
    # stops before OpenCLIP's last block (the file carries 24, the folder's encoder 23).
    assert sum(k.endswith("resblocks.23.ln_1.weight") for k in load_file(file)) == 1
    served = Settings(model_dir=file, data_dir=tmp_path / "data").resolved_model_dir()
    assert_same_model(folder, served)
    made = json.loads((served / "steerserve_checkpoint.json").read_text())
    assert made["configs"] == "sd2-v" and made["prediction_type"] == "v_prediction"
    assert json.loads((served / "unet" / "config.json").read_text())["sample_size"] == 96  # SD 2.1's 768 px

    # The CLI, told the model predicts noise: SD 2.x base's configs, an epsilon scheduler; a folder
    # Engine.from_pretrained loads.
    # (A fresh process with HF_HUB_OFFLINE=1 from its start: the hub libraries read it at import.)
    out = tmp_path / "converted"
    run = subprocess.run([sys.executable, "-m", "service", "convert-checkpoint", str(file), str(out),
                          "--prediction-type", "epsilon"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0 and f"wrote {out}: Stable Diffusion 2.x (sd2-base configs)" in run.stdout, run.stderr
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and scheduler["_class_name"] == "PNDMScheduler"
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 64
    engine = Engine.from_pretrained(out)
    assert engine.generate(GenerationSpec(prompt="a dog", steps=2, width=32, height=32)).images[0].size == (32, 32)
    assert main(["convert-checkpoint", str(file), str(out)]) == 2  # not over an existing folder


SDXL_YAML = """\
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        num_head_channels: 16
        use_linear_in_transformer: true
"""


def test_sdxl_file_equals_its_folder(tmp_path, no_network):
    folder = sdxl_folder(tmp_path / "xl")
    file = write_single_file(folder, "sdxl", tmp_path / "tiny-xl.safetensors")
    # What its tensors do not say, in both sidecar kinds: the UNet's 16-channel heads in the
    # original yaml (A1111/ComfyUI read it beside the file); the tiny encoders' heads and activation,
    # and its scheduler's set_alpha_to_one (left at DDIM's default true, where SDXL base says false).
    (tmp_path / "tiny-xl.yaml").write_text(SDXL_YAML)
    text = {"num_attention_heads": 4, "hidden_act": "gelu"}
    (tmp_path / "tiny-xl.steerserve.json").write_text(json.dumps(
        {"unet": {"sample_size": 32}, "text_encoder": text, "text_encoder_2": text,
         "scheduler": {"set_alpha_to_one": True}}))
    served = Settings(model_dir=file, data_dir=tmp_path / "data").resolved_model_dir()
    assert_same_model(folder, served)
    index = json.loads((served / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert families.detect(served).name == "sdxl"
    # diffusers' own single-file loader, given our folder as its configs, reads the same tensors. (Not
    # text_encoder_2: diffusers tells SDXL's towers apart by width, 768 vs 1280, and loads the first
    # tower's tensors into the second when both are as wide, as in this tiny model; we go by prefix.)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(file), config=str(served), local_files_only=True)
    ours, _ = folder_states(served)
    for part in ("unet", "vae", "text_encoder"):
        theirs = getattr(pipe, part).state_dict()
        assert all(torch.equal(ours[part][k], theirs[k]) for k in ours[part]), part


@pytest.mark.parametrize("name", checkpoint_configs.NAMES)
def test_real_sizes_convert_back_to_the_shipped_configs(name):
    """At full size, on the meta device (no memory): the shipped SD 1.5 / 2.1 (768-v, 512 base) / XL
    configs, written in the original layout, plan back to their own architecture and every component's
    converted tensors fit the published model key for key and shape for shape."""
    shipped = checkpoint_configs.load(name)
    family = {"sd1": "sd1", "sd2-v": "sd2", "sd2-base": "sd2", "sdxl-base": "sdxl"}[name]
    text = lambda part, cls: cls(CLIPTextConfig(**{k: v for k, v in shipped[part].items() if k != "model_type"}))  # noqa: E731
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(shipped["unet"]),
                  "vae": AutoencoderKL.from_config(shipped["vae"]), "text_encoder": text("text_encoder", CLIPTextModel)}
        if "text_encoder_2" in shipped:
            models["text_encoder_2"] = text("text_encoder_2", CLIPTextModelWithProjection)
    states = {part: model.state_dict() for part, model in models.items()}
    configs = {part: dict(models[part].config) for part in ("unet", "vae")}
    tensors = MetaTensors(original_layout(states, configs, family))
    assert checkpoints.classify(Path(name), tensors) == family
    prediction = "epsilon" if name == "sd2-base" else None
    the_plan = checkpoints.plan(name, tensors, family, checkpoints.Sidecars({}, None, ()), prediction)
    assert the_plan.configs == name
    for key, value in shipped["unet"].items():
        if not key.startswith("_"):
            got = the_plan.unet.get(key, value)
            assert (list(got) if isinstance(got, tuple) else got) == value, (name, key, got, value)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor", "sample_size"):
        assert the_plan.vae[key] == shipped["vae"][key]
    for part, _, _, cfg, _, _ in the_plan.towers:
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                    "vocab_size", "max_position_embeddings"):
            assert cfg[key] == shipped[part][key], (name, part, key)
    fitted = [part for part, *_ in checkpoints.component_states(the_plan, tensors, name)]
    assert fitted == list(models)


class MetaTensors(dict):
    def shape(self, key):
        return tuple(self[key].shape)


# -- what is not a checkpoint is refused, in one line ---------------------------------------------------


class _Trap:
    """Unpickling this writes a file: proof that a refused pickle was never unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_what_is_not_a_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    files = {}
    files["model.ckpt"] = pickle.dumps({"state_dict": _Trap(marker)})
    files["disguised.safetensors"] = pickle.dumps(_Trap(marker))
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "zip.safetensors")
    files["garbage.safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, str(tmp_path / "random.safetensors"))
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)},
              str(tmp_path / "kohya-lora.safetensors"))
    save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "embedding.safetensors"))
    expected = {"model.ckpt": "never unpickled", "disguised.safetensors": "never unpickled",
                "zip.safetensors": "never unpickled", "garbage.safetensors": "not a safetensors file",
                "random.safetensors": "no Stable Diffusion UNet", "kohya-lora.safetensors": "a LoRA adapter",
                "embedding.safetensors": "textual-inversion embedding"}
    for name, says in expected.items():
        with pytest.raises(CheckpointError) as err:
            Settings(model_dir=tmp_path / name, data_dir=tmp_path / "data").resolved_model_dir()
        assert says in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
        assert main(["convert-checkpoint", str(tmp_path / name), str(tmp_path / "out")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not marker.exists()  # no pickle was ever loaded
    assert not (tmp_path / "out").exists() and not list((tmp_path / "data").rglob("model_index.json"))


def test_serve_refuses_a_pickle_checkpoint_in_one_line_without_unpickling_it(tmp_path):
    marker = tmp_path / "unpickled"
    (tmp_path / "model.ckpt").write_bytes(pickle.dumps({"state_dict": _Trap(marker)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "service", "serve", "--dev", "--data-dir", str(tmp_path / "data"),
                          "--model-dir", str(tmp_path / "model.ckpt")], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "never unpickled" in errors[0] and "Traceback" not in out.stderr
    assert not marker.exists()


def test_prediction_type_rules_in_order():
    rule = checkpoints.prediction_type_for
    none = checkpoints.Sidecars({}, None, ())
    yaml_v = checkpoints.Sidecars({}, {"model": {"params": {"parameterization": "v"}}}, ())
    yaml_eps = checkpoints.Sidecars({}, {"model": {"params": {}}}, ())
    both = checkpoints.Sidecars({"scheduler": {"prediction_type": "epsilon"}}, yaml_v.original, ())
    plain, base = MetaTensors(), MetaTensors(global_step=torch.tensor(875000))
    marked = MetaTensors(v_pred=torch.tensor([]))
    assert rule("sd2", plain, none, None)[0] == "v_prediction"  # diffusers: SD 2.x 768 models
    assert rule("sd2", base, none, None)[0] == "epsilon"  # diffusers' tell of SD 2.0 base
    assert rule("sd1", plain, none, None)[0] == rule("sdxl", plain, none, None)[0] == "epsilon"
    assert rule("sdxl", marked, none, None)[0] == "v_prediction"  # ComfyUI's v_pred marker
    assert rule("sd1", plain, yaml_v, None)[0] == "v_prediction"
    assert rule("sd2", plain, yaml_eps, None)[0] == "epsilon"  # a yaml without parameterization: eps
    assert rule("sd2", marked, both, None)[0] == "epsilon"  # the json sidecar before the yaml
    assert rule("sd1", plain, both, "v_prediction") == ("v_prediction", "the prediction-type setting")
