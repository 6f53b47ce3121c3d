"""Every LoRA key layout, applied exactly as diffusers applies it (issue 36 items 1-2, Linear layers).

The same random LoRA is written in each layout a user may bring (kohya/A1111 with SD 1.x/2.x or SDXL's
original SGM block names, fp16/bf16, with and without alpha; peft; diffusers' DreamBooth-LoRA keys;
attention-processor keys; peft ``save_pretrained``) and served through the bank on a batch row, on SD
1.5- and SDXL-structured random-weight models. Each row's conditioning and noise prediction equal
diffusers' ``load_lora_weights`` + ``fuse_lora`` on the same base weights (peft's own ``from_pretrained``
for peft folders); the next row, without the adapter, equals the base model.

The modules a file covers are the Linear layers kohya's default LoRA trains (networks/lora.py:
``Transformer2DModel``'s attention, feed-forward and linear proj_in/proj_out; ``CLIPAttention`` and
``CLIPMLP``) that the bank serves: the attention projections today, the rest as soon as the bank's
targets include them. A file with any module the bank does not serve is refused naming its key.

Also here: the SGM block arithmetic against diffusers' own converter on full-size SD 1.5 and SDXL
UNets (meta device), refusals of adapter types the bank cannot apply (LoHa, LoKr, DoRA, ...), of
keys no layout knows, and of pickle files (never unpickled); A1111 / diffusers embeddings.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from bench.model_folders import sdxl_base_unet_config, sdxl_folder, sdxl_reference_pipeline
from service.adapters import AdapterFormatError, BankedAdapters, parse_adapter
from service.adapters import layouts
from service.engine.pipeline import AdapterUse, Engine
from tests.adapter_files import dict_loader

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What kohya's default LoRA (sd-scripts networks/lora.py, no conv_dim) trains: every Linear (and 1x1
# Conv2d) under Transformer2DModel, and CLIPAttention / CLIPMLP.
ATTENTION = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
KOHYA_UNET = ATTENTION + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_ATTENTION = tuple(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
KOHYA_TE = TE_ATTENTION + ("mlp.fc1", "mlp.fc2")
SIZE = (64, 64)
TIME_IDS = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
PROMPT = "a photo of a dog on a beach"


def _ends(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


# -- the models ----------------------------------------------------------------------------------




class Family:
    """A diffusers pipeline (the reference) and our engine on the same weights, with a bank."""

    def __init__(self, name: str, pipe, engine: Engine, store: dict):
        self.name, self.pipe, self.engine, self.store = name, pipe, engine, store
        self.components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        if name == "sdxl":
            self.components["text_encoder_2"] = pipe.text_encoder_2
        self._base = None

    def kohya_linears(self) -> dict[str, torch.nn.Linear]:
        """Component-prefixed names (the bank's) of the Linear layers kohya's default LoRA trains."""
        out = {}
        for component, model in self.components.items():
            for name, module in model.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                if component == "unet" and ".attentions." in name and _ends(name, KOHYA_UNET):
                    out[f"unet.{name}"] = module
                elif component != "unet" and _ends(name, KOHYA_TE):
                    out[f"{component}.{name}"] = module
        return out

    def served(self) -> dict[str, tuple[int, ...]]:
        return self.engine.adapters.bank.module_shapes

    def inputs(self):
        """The same latent and timestep on both rows: row 1 (no adapter) is the base model's."""
        g = torch.Generator().manual_seed(3)
        return torch.randn(1, 4, 32, 32, generator=g).repeat(2, 1, 1, 1), torch.tensor([700, 700])

    def ours(self, key: str):
        """(embeds, added, noise) of rows [adapter, base] in one call of each model."""
        rows = [(AdapterUse(key),), ()]
        engine = self.engine
        embeds = engine.encode_prompts([PROMPT, PROMPT], rows, size=SIZE if self.name == "sdxl" else None)
        latents, t = self.inputs()
        noise = engine.predict_noise(latents, t, embeds, rows)
        if self.name == "sdxl":
            tokens, added = engine.family.unpack(embeds)
            return tokens, added["text_embeds"], noise
        return embeds, None, noise

    def reference(self, pipe):
        """diffusers' (embeds, pooled, noise) for the first row's inputs."""
        latents, t = self.inputs()
        with torch.no_grad():
            if self.name == "sdxl":
                embeds, _, pooled, _ = pipe.encode_prompt([PROMPT], device="cpu", do_classifier_free_guidance=False)
                added = {"text_embeds": pooled, "time_ids": TIME_IDS}
                noise = pipe.unet(latents[:1], t[:1], encoder_hidden_states=embeds, added_cond_kwargs=added).sample
                return embeds, pooled, noise
            embeds = pipe.encode_prompt([PROMPT], "cpu", 1, False)[0]
            return embeds, None, pipe.unet(latents[:1], t[:1], encoder_hidden_states=embeds).sample

    def base(self):
        if self._base is None:
            self._base = self.reference(self.pipe)
        return self._base

    def assert_row_equals(self, key: str, ref, changed: set[str]):
        """Row 0 (the adapter) equals ``ref``, row 1 the base model; ``changed`` names the components
        whose effect must show (diffusers loading nothing would make a vacuous comparison)."""
        embeds, pooled, noise = self.ours(key)
        ref_embeds, ref_pooled, ref_noise = ref
        base_embeds, base_pooled, base_noise = self.base()
        torch.testing.assert_close(embeds[:1], ref_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(noise[:1], ref_noise, rtol=0, atol=1e-4)
        if pooled is not None:
            torch.testing.assert_close(pooled[:1], ref_pooled, rtol=0, atol=1e-5)
        torch.testing.assert_close(embeds[1:], base_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(noise[1:], base_noise, rtol=0, atol=1e-4)
        width = self.pipe.text_encoder.config.hidden_size
        if "text_encoder" in changed:
            assert (ref_embeds[..., :width] - base_embeds[..., :width]).abs().max() > 1e-3
        if "text_encoder_2" in changed:
            assert (ref_embeds[..., width:] - base_embeds[..., width:]).abs().max() > 1e-3
        assert (ref_noise - base_noise).abs().max() > 1e-3


@pytest.fixture(scope="module")
def sd(tiny_pipe):
    store: dict = {}
    c = copy.deepcopy(tiny_pipe)
    engine = Engine(c.tokenizer, c.text_encoder, c.unet, c.vae, c.scheduler)
    BankedAdapters.attach(engine, dict_loader(store), num_slots=3, max_rank=8, registry=CollectorRegistry())
    return Family("sd", tiny_pipe, engine, store)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = sdxl_folder(tmp_path_factory.mktemp("models") / "sdxl-tiny")
    pipe = sdxl_reference_pipeline(folder)
    store: dict = {}
    engine = Engine.from_pretrained(folder)
    BankedAdapters.attach(engine, dict_loader(store), num_slots=3, max_rank=8, registry=CollectorRegistry())
    return Family("sdxl", pipe, engine, store)


@pytest.fixture(params=["sd", "sdxl"])
def family(request):
    return request.getfixturevalue(request.param)


# -- the LoRA and its layouts --------------------------------------------------------------------


def random_lora(modules: dict[str, torch.nn.Linear], seed: int, mixed: bool = False, alpha: float = 6.0):
    """module -> (down [r, in], up [out, r], alpha): rank 4 (2 and 4 alternating when mixed)."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (name, m) in enumerate(sorted(modules.items())):
        r = (2, 4)[i % 2] if mixed else 4
        down = torch.randn(r, m.in_features, generator=g) / m.in_features ** 0.5
        up = torch.randn(m.out_features, r, generator=g) * 0.1
        lora[name] = (down, up, alpha)
    return lora


def linear_lora(family: Family, seed: int, kinds=KOHYA_UNET + KOHYA_TE, **kw):
    """A LoRA on every Linear kohya trains that the bank serves (of ``kinds``)."""
    served = family.served()
    modules = {n: m for n, m in family.kohya_linears().items()
               if _served_name(n, served) and len(served[_served_name(n, served)]) == 2 and _ends(n, kinds)}
    assert any(_ends(n, ATTENTION) for n in modules) and any(_ends(n, TE_ATTENTION) for n in modules)
    return random_lora(modules, seed, **kw)


def _served_name(name: str, served) -> str | None:
    # transformers 5 dropped CLIPTextModel's ``text_model.`` level; files and banks may spell either.
    component, _, local = name.partition(".")
    for candidate in (local, local.removeprefix("text_model."), "text_model." + local):
        if f"{component}.{candidate}" in served:
            return f"{component}.{candidate}"
    return None


def file_local(module: str) -> tuple[str, str]:
    """(component, module name as files write it): CLIP text encoders under ``text_model.``."""
    component, _, local = module.partition(".")
    if component != "unet" and not local.startswith("text_model."):
        local = "text_model." + local
    return component, local


def to_sgm(local: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet module path in SGM (original Stable Diffusion) names: the inverse of the
    mapping under test, written independently. Attention, resnet and sampler layers."""
    per = layers_per_block + 1
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if local in top:
        return top[local]
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", local)
    if m:
        kind, b, inner, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if inner == "resnets":
            rest = resnet[rest]
        if kind == "down_blocks":
            if inner == "downsamplers":
                return f"input_blocks.{1 + b * per + layers_per_block}.0.op"
            return f"input_blocks.{1 + b * per + layer}.{0 if inner == 'resnets' else 1}.{rest}"
        if inner == "upsamplers":
            return f"output_blocks.{b * per + layers_per_block}.{{UPSAMPLER}}.conv"
        return f"output_blocks.{b * per + layer}.{0 if inner == 'resnets' else 1}.{rest}"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", local)
    if m:
        inner, layer, rest = m.groups()
        if inner == "resnets":
            return f"middle_block.{2 * int(layer)}.{resnet[rest]}"
        return f"middle_block.1.{rest}"
    raise ValueError(local)


def kohya_key(family: str, module: str, sgm: bool = False) -> str:
    component, local = file_local(module)
    if component == "unet":
        return "lora_unet_" + (to_sgm(local) if sgm else local).replace(".", "_")
    prefix = {"text_encoder": "lora_te1" if family == "sdxl" else "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{local.replace('.', '_')}"


def _processor_key(component: str, local: str) -> str:
    head, proj = local.rsplit(".", 1) if not local.endswith("to_out.0") else (local[: -len(".to_out.0")], "to_out")
    if component == "unet":
        return f"unet.{head}.processor.{proj}_lora"
    return f"{component}.{head}.to_{proj.removesuffix('_proj')}_lora"


def write_layout(layout: str, family: Family, lora: dict, directory: Path) -> tuple[Path, dict]:
    """The file of ``lora`` in ``layout`` and the kwargs diffusers' load_lora_weights needs for it."""
    tensors: dict[str, torch.Tensor] = {}
    metadata = None
    load_kwargs = {}
    dtype = {"kohya-fp16": torch.float16, "kohya-bf16": torch.bfloat16}.get(layout, torch.float32)
    for module, (down, up, alpha) in lora.items():
        component, local = file_local(module)
        if layout.startswith("kohya"):
            name = kohya_key(family.name, module, sgm=layout == "kohya-sgm")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            if layout != "kohya-no-alpha":
                tensors[f"{name}.alpha"] = torch.tensor(alpha)
        elif layout == "peft":  # diffusers' save_lora_weights: peft keys (the model's own names), LoraConfig metadata
            own = module.partition(".")[2]
            tensors[f"{component}.{own}.lora_A.weight"], tensors[f"{component}.{own}.lora_B.weight"] = down, up
        elif layout == "dreambooth":
            # diffusers' DreamBooth-LoRA example: convert_state_dict_to_diffusers over peft's state dict
            # (UNet: lora.down/up; text encoder: lora_linear_layer.down/up), no alpha (scale 1).
            from diffusers.utils import convert_state_dict_to_diffusers

            converted = convert_state_dict_to_diffusers({f"{local}.lora_A.weight": down, f"{local}.lora_B.weight": up})
            tensors.update({f"{component}.{k}": v for k, v in converted.items()})
        elif layout == "attention-processor":
            key = _processor_key(component, local)
            tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = down, up
        else:
            raise ValueError(layout)
    if layout == "peft":
        flat = {}
        for component in {m.partition(".")[0] for m in lora}:
            mods = {m.partition(".")[2]: v for m, v in lora.items() if m.startswith(component + ".")}
            (r, alpha), = {(v[0].shape[0], v[2]) for v in mods.values()}
            flat.update({f"{component}.r": r, f"{component}.lora_alpha": alpha,
                         f"{component}.target_modules": sorted(mods), f"{component}.peft_type": "LORA"})
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(flat)}
    if layout == "kohya-sgm" and family.name == "sd":
        load_kwargs["unet_config"] = family.pipe.unet.config  # diffusers maps SGM names only when told the UNet
    path = directory / f"{layout}.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path, load_kwargs


def diffusers_fused(family: Family, path: Path, **kwargs):
    pipe = copy.deepcopy(family.pipe)
    pipe.load_lora_weights(str(path), **kwargs)
    pipe.fuse_lora()
    return family.reference(pipe)


def parse_for(family: Family, path: Path, **kwargs):
    adapter = parse_adapter(str(path), **kwargs)
    return family.engine.adapters.bank.prepare(adapter)


LAYOUTS = [
    ("kohya", "sd"), ("kohya", "sdxl"), ("kohya-sgm", "sdxl"), ("kohya-sgm", "sd"), ("kohya-fp16", "sd"),
    ("kohya-bf16", "sdxl"), ("kohya-no-alpha", "sd"), ("peft", "sd"), ("peft", "sdxl"), ("dreambooth", "sd"),
    ("dreambooth", "sdxl"), ("attention-processor", "sd"), ("attention-processor", "sdxl"),
]
EXPECTED_LAYOUT = {"kohya": "kohya", "kohya-sgm": "kohya (SGM block names)", "kohya-fp16": "kohya",
                   "kohya-bf16": "kohya", "kohya-no-alpha": "kohya", "peft": "peft",
                   "dreambooth": "diffusers lora.down, diffusers lora_linear_layer",
                   "attention-processor": "diffusers attention processor"}


@pytest.mark.parametrize("layout, name", LAYOUTS, ids=[f"{a}-{b}" for a, b in LAYOUTS])
def test_layout_served_in_the_bank_equals_diffusers(layout, name, request, tmp_path):
    family = request.getfixturevalue(name)
    # Attention processors and diffusers' DreamBooth-LoRA example hold attention layers only (that
    # example trains no others; diffusers' loader drops the peft-spelled rest of such a file).
    kinds = ATTENTION + TE_ATTENTION if layout in ("attention-processor", "dreambooth") else KOHYA_UNET + KOHYA_TE
    lora = linear_lora(family, seed=len(layout), kinds=kinds, alpha=4.0 if layout == "peft" else 6.0)
    path, load_kwargs = write_layout(layout, family, lora, tmp_path)

    adapter = parse_for(family, path)
    # (kohya-sgm: SGM names are the UNet's, text encoders keep kohya's; DreamBooth's keys are peft's for
    # layers without a diffusers spelling.)
    assert set(EXPECTED_LAYOUT[layout].split(", ")) <= set(adapter.layout.split(", "))
    assert {_served_name(m, family.served()) for m in lora} == set(adapter.lora)
    dtype = {"kohya-fp16": torch.float16, "kohya-bf16": torch.bfloat16}.get(layout, torch.float32)
    for module, (down, up, alpha) in lora.items():
        ours = adapter.lora[_served_name(module, family.served())]
        assert ours.down.dtype == dtype and torch.equal(ours.down.float(), down.to(dtype).float())
        expected_alpha = {"kohya-no-alpha": down.shape[0], "dreambooth": down.shape[0],
                          "attention-processor": down.shape[0]}.get(layout, alpha)
        assert ours.scale == pytest.approx(expected_alpha / down.shape[0])

    key = f"{layout}-{name}"
    family.store[key] = adapter
    changed = {m.partition(".")[0] for m in lora}
    family.assert_row_equals(key, diffusers_fused(family, path, **load_kwargs), changed)


def test_kohya_alpha_is_per_module(sd, tmp_path):
    """kohya/A1111 scale each module by its own alpha / rank. (diffusers 0.42 gives every UNet module
    the file's most common alpha when they differ, so the reference here is the weights fused by hand,
    W + alpha / r * up @ down, kohya's definition.)"""
    lora = linear_lora(sd, seed=21, mixed=True)
    alphas = (1.0, 3.0, 8.0)
    lora = {m: (down, up, alphas[i % 3]) for i, (m, (down, up, _)) in enumerate(sorted(lora.items()))}
    path, _ = write_layout("kohya", sd, lora, tmp_path)
    adapter = parse_for(sd, path)
    for module, (down, up, alpha) in lora.items():
        assert adapter.lora[_served_name(module, sd.served())].scale == alpha / down.shape[0]

    pipe = copy.deepcopy(sd.pipe)
    with torch.no_grad():
        for module, (down, up, alpha) in lora.items():
            component, _, local = module.partition(".")
            getattr(pipe, component).get_submodule(local).weight += alpha / down.shape[0] * up @ down
    sd.store["kohya-mixed-alpha"] = adapter
    sd.assert_row_equals("kohya-mixed-alpha", sd.reference(pipe), {"unet", "text_encoder"})


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_peft_save_pretrained_folder_equals_peft(name, request, tmp_path):
    """peft's ``save_pretrained`` of a UNet: adapter_model.safetensors (``base_model.model.<module>``
    keys) with r and lora_alpha in adapter_config.json, imported with that alpha; the reference is
    peft's own PeftModel.from_pretrained + merge."""
    from peft import LoraConfig, PeftModel, get_peft_model

    family = request.getfixturevalue(name)
    served = family.served()
    targets = sorted(n.removeprefix("unet.") for n in family.kohya_linears()
                     if n.startswith("unet.") and n in served and len(served[n]) == 2)
    model = get_peft_model(copy.deepcopy(family.pipe.unet), LoraConfig(r=4, lora_alpha=6, target_modules=targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())

    adapter = parse_for(family, tmp_path / "peft" / "adapter_model.safetensors", default_alpha=config["lora_alpha"])
    assert adapter.layout == "peft save_pretrained" and set(adapter.lora) == {f"unet.{t}" for t in targets}
    assert {m.scale for m in adapter.lora.values()} == {6 / 4}

    pipe = copy.deepcopy(family.pipe)
    pipe.unet = PeftModel.from_pretrained(copy.deepcopy(family.pipe.unet), str(tmp_path / "peft")).merge_and_unload()
    family.store[f"peft-folder-{name}"] = adapter
    family.assert_row_equals(f"peft-folder-{name}", family.reference(pipe), {"unet"})


def test_keys_without_component_are_unet_keys(sd, tmp_path):
    """``<module>.lora.down.weight`` without ``unet.`` (diffusers < 0.21's attention-processor files,
    which today's diffusers silently loads nothing of) and kohya's suffixes on diffusers names read
    as the same UNet LoRA as kohya's own keys."""
    lora = {m: v for m, v in linear_lora(sd, seed=8).items() if m.startswith("unet.")}
    kohya = parse_adapter(str(write_layout("kohya", sd, lora, tmp_path)[0]))
    variants = {
        "unprefixed": {f"{m[5:]}.lora.{r}.weight": t
                       for m, (d, u, _) in lora.items() for r, t in (("down", d), ("up", u))},
        "kohya suffixes": {f"{m}.lora_{r}.weight": t for m, (d, u, _) in lora.items() for r, t in (("down", d), ("up", u))}
        | {f"{m}.alpha": torch.tensor(a) for m, (_, _, a) in lora.items()},
    }
    for what, tensors in variants.items():
        parsed = parse_adapter(save_bytes(tensors), default_alpha=6.0)
        assert parsed.lora.keys() == kohya.lora.keys(), what
        for k, m in kohya.lora.items():
            assert torch.equal(parsed.lora[k].down, m.down) and parsed.lora[k].scale == m.scale, what


# -- what the bank does not serve: refused naming the key, nothing loaded ------------------------------


def _snapshot(bank):
    return {name: (layer.lora_A.clone(), layer.lora_Bt.clone()) for name, layer in bank.layers.items()}


def test_kohya_modules_the_bank_does_not_serve_are_refused_naming_the_key(family, tmp_path):
    """A kohya LoRA on every Linear kohya's default network trains (all served) plus one a "full"
    LyCORIS preset adds, the time embedding's first Linear, which the bank does not serve: the file
    is refused naming that module and the file's key, and nothing of it is loaded."""
    unet = dict(family.engine.unet.named_modules())
    missing = {"unet.time_embedding.linear_1"}
    lora = random_lora({**family.kohya_linears(), "unet.time_embedding.linear_1": unet["time_embedding.linear_1"]},
                       seed=4)
    path, _ = write_layout("kohya", family, lora, tmp_path)
    adapter = parse_adapter(str(path))
    bank = family.engine.adapters.bank
    before, resident = _snapshot(bank), family.engine.adapters.manager.resident()
    with pytest.raises(AdapterFormatError) as caught:
        bank.prepare(adapter)
    message = str(caught.value)
    module = message.split(":", 1)[0]
    assert module in {".".join(file_local(m)) for m in missing}  # as the file names it
    assert "not a module this model serves adapters on" in message and "\n" not in message
    assert re.search(r"\(file key lora_(unet|te1?|te2)_\w+\.lora_down\.weight\)$", message)
    family.store["unserved"] = adapter
    try:
        with pytest.raises(AdapterFormatError, match="not a module this model serves"):
            family.engine.encode_prompts([PROMPT], [(AdapterUse("unserved"),)],
                                         size=SIZE if family.name == "sdxl" else None)
    finally:
        del family.store["unserved"]
    assert family.engine.adapters.manager.resident() == resident
    after = _snapshot(bank)
    assert all(torch.equal(after[n][0], a) and torch.equal(after[n][1], b) for n, (a, b) in before.items())


def test_kohya_sd1_1x1_conv_proj_equals_diffusers(sd, tmp_path):
    """SD 1.x's proj_in/proj_out are 1x1 convolutions: kohya stores their LoRA 4-D (served by the
    bank's conv layers, service/adapters/conv.py; tests/test_bank_conv.py covers LoCon)."""
    served = sd.served()
    convs = {f"unet.{n}": m for n, m in sd.pipe.unet.named_modules()
             if isinstance(m, torch.nn.Conv2d) and _ends(n, ("proj_in", "proj_out")) and f"unet.{n}" in served}
    if not convs:
        pytest.skip("this bank serves no convolutions")
    g = torch.Generator().manual_seed(9)
    tensors = {}
    for module, conv in sorted(convs.items()):
        name = kohya_key("sd", module)
        down = torch.randn(4, conv.in_channels, 1, 1, generator=g) / conv.in_channels ** 0.5
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = torch.randn(conv.out_channels, 4, 1, 1, generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(tmp_path / "conv.safetensors"))
    adapter = parse_for(sd, tmp_path / "conv.safetensors")
    assert set(adapter.lora) == set(convs)
    sd.store["kohya-conv"] = adapter
    sd.assert_row_equals("kohya-conv", diffusers_fused(sd, tmp_path / "conv.safetensors"), {"unet"})


# -- the key mapping against diffusers' converter, on full-size UNets ----------------------------------


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)  # UNet2DConditionModel's defaults are SD 1.x's


@pytest.mark.parametrize("config", [SD15_UNET, sdxl_base_unet_config()], ids=["sd15", "sdxl"])
def test_sgm_names_map_like_diffusers_on_full_size_unets(config):
    """Every Linear and Conv2d of the real SD 1.5 / SDXL UNet, written with SGM names the way kohya
    writes them, maps back to that module; diffusers' own converter (_maybe_map_sgm_blocks_to_diffusers
    + _convert_non_diffusers_lora_to_diffusers) agrees on all but an upsampler at inner index 1 (an up
    block without attentions: SD 1.5's output_blocks.2.1.conv), which it maps to a module that does not
    exist. (It also cannot convert a whole SD 1.5 LoCon at once: see below.)"""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    unet = _meta_unet(config)
    lpb = unet.config.layers_per_block
    modules = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    attn_up = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    state, ours = {}, {}
    for name in sorted(modules):
        sgm = to_sgm(name, lpb)
        if "{UPSAMPLER}" in sgm:
            sgm = sgm.replace("{UPSAMPLER}", "2" if attn_up[int(name.split(".")[1])] else "1")
        key = "lora_unet_" + sgm.replace(".", "_")
        parsed = layouts.parse_lora_key(f"{key}.lora_down.weight", lpb)
        assert parsed.module == f"unet.{name}" and parsed.role == "down", key
        ours[key] = name
        state[f"{key}.lora_down.weight"] = torch.zeros(1, 1)
        state[f"{key}.lora_up.weight"] = torch.zeros(1, 1)
    assert len(ours) == len(modules) > 250

    # One module at a time: diffusers finds a block's keys by substring, so a file with input_blocks 1
    # and 10 (SD 1.5 has 12) fails its conversion with a KeyError.
    theirs = set()
    for key in ours:
        one = {k: v for k, v in state.items() if k.startswith(key + ".")}
        converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(one, unet.config))
        theirs |= {layouts.parse_lora_key(k).module.removeprefix("unet.") for k in converted if ".down." in k}
    sd15 = config is SD15_UNET
    assert modules - theirs == ({"up_blocks.0.upsamplers.0.conv"} if sd15 else set())
    assert theirs - modules == ({"up_blocks.0.attentions.2.conv"} if sd15 else set())


def test_kohya_text_encoder_names_map_like_diffusers(sd):
    from diffusers.loaders.lora_conversion_utils import _convert_text_encoder_lora_key

    for name, module in sd.pipe.text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and _ends(name, KOHYA_TE):
            local = name if name.startswith("text_model.") else "text_model." + name
            for prefix, component in (("lora_te", "text_encoder"), ("lora_te1", "text_encoder"),
                                      ("lora_te2", "text_encoder_2")):
                key = f"{prefix}_{local.replace('.', '_')}.lora_down.weight"
                assert layouts.parse_lora_key(key).module == f"{component}.{local}"
                theirs = _convert_text_encoder_lora_key(key, key.split(".")[0])
                assert layouts.parse_lora_key(f"{component}.{theirs}").module == f"{component}.{local}"


def test_sgm_arithmetic_follows_layers_per_block():
    # One resnet per block: input_blocks 1 = down_blocks.0 layer 0, 2 = its downsampler, 3 = block 1.
    assert layouts.sgm_to_diffusers("input_blocks.3.1.proj_in", 1) == "down_blocks.1.attentions.0.proj_in"
    assert layouts.sgm_to_diffusers("input_blocks.2.0.op", 1) == "down_blocks.0.downsamplers.0.conv"
    assert layouts.sgm_to_diffusers("output_blocks.3.1.proj_out", 1) == "up_blocks.1.attentions.1.proj_out"
    assert layouts.sgm_to_diffusers("input_blocks.4.1.proj_in", (1, 2)) == "down_blocks.1.attentions.1.proj_in"
    key = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
    tensors = {key: torch.randn(2, 8), key.replace("lora_down", "lora_up"): torch.randn(8, 2)}
    assert list(parse_adapter(save_bytes(tensors), layers_per_block=1).lora) == [
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    # With two (the default, every published SD UNet's), input_blocks 3 is down block 0's downsampler.
    with pytest.raises(AdapterFormatError, match=r"input_blocks\.3 is down block 0's downsampler"):
        parse_adapter(save_bytes(tensors))


# -- refusals at parse time: the whole file, naming the key --------------------------------------------

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
VALID = {f"{Q}.lora_down.weight": torch.randn(2, 64), f"{Q}.lora_up.weight": torch.randn(64, 2),
         f"{Q}.alpha": torch.tensor(2.0)}
K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
REFUSED = [
    ({f"{K}.hada_w1_a": torch.randn(64, 2), f"{K}.hada_w1_b": torch.randn(2, 64), f"{K}.hada_w2_a": torch.randn(64, 2),
      f"{K}.hada_w2_b": torch.randn(2, 64)}, f"{K}.hada_w1_a", "LoHa"),
    ({f"{K}.lokr_w1": torch.randn(8, 8), f"{K}.lokr_w2": torch.randn(8, 8)}, f"{K}.lokr_w1", "LoKr"),
    ({f"{K}.lora_down.weight": torch.randn(2, 64), f"{K}.lora_up.weight": torch.randn(64, 2),
      f"{K}.dora_scale": torch.randn(1, 64)}, f"{K}.dora_scale", "DoRA"),
    ({"unet.a.attn1.to_k.lora_magnitude_vector": torch.randn(64)}, "unet.a.attn1.to_k.lora_magnitude_vector", "DoRA"),
    ({f"{K}.weight": torch.randn(64), f"{K}.on_input": torch.tensor(False)}, f"{K}.on_input", r"\(IA\)³"),
    ({"unet.a.to_k.ia3_l": torch.randn(64, 1)}, "unet.a.to_k.ia3_l", r"\(IA\)³"),
    ({f"{K}.a1.weight": torch.randn(2, 64), f"{K}.a2.weight": torch.randn(64, 2), f"{K}.b1.weight": torch.randn(2, 64),
      f"{K}.b2.weight": torch.randn(64, 2)}, f"{K}.a1.weight", "GLoRA"),
    ({f"{K}.diff": torch.randn(64, 64)}, f"{K}.diff", "full weight difference"),
    ({f"{K}.diff_b": torch.randn(64)}, f"{K}.diff_b", "full weight difference"),
    ({"lora_unet_down_blocks_1_attentions_0_norm.w_norm": torch.randn(64)}, "lora_unet_down_blocks_1_attentions_0_norm.w_norm",
     "norm-layer"),
    ({f"{K}.lora_mid.weight": torch.randn(2, 2, 3, 3)}, f"{K}.lora_mid.weight", "Tucker"),
    ({f"{K}.oft_blocks": torch.randn(4, 16, 16)}, f"{K}.oft_blocks", "OFT"),
    ({"unet.a.to_k.lora_B.bias": torch.randn(64)}, "unet.a.to_k.lora_B.bias", "LoRA bias"),
    ({"bundle_emb.cat.string_to_param.*": torch.randn(1, 32)}, "bundle_emb.cat.string_to_param.*", "bundle_emb"),
]


@pytest.mark.parametrize("extra, key, what", REFUSED, ids=[r[2] + "-" + r[1].rsplit(".", 1)[-1] for r in REFUSED])
def test_adapter_types_the_bank_cannot_apply_refuse_the_whole_file(extra, key, what):
    match = rf"^{re.escape(key)}: .*{what}.* is not supported.*nothing of this file"
    with pytest.raises(AdapterFormatError, match=match):
        parse_adapter(save_bytes({**VALID, **extra}))


@pytest.mark.parametrize("tensors, match", [
    ({f"{Q}.weight": torch.randn(64)}, rf"^{Q}\.weight: unrecognized LoRA key"),
    ({"lora_unet_middle_block_7_proj_in.lora_down.weight": torch.randn(2, 64),
      "lora_unet_middle_block_7_proj_in.lora_up.weight": torch.randn(64, 2)},
     r"^lora_unet_middle_block_7_proj_in\.lora_(down|up)\.weight: names no module of this UNet architecture"),
    ({"lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(1.0)},
     r"^lora_unet_down_blocks_1_attentions_0_proj_in\.alpha: an alpha for a layer without LoRA matrices"),
    ({f"{K}.lora_down.weight": torch.randn(2, 64)}, rf"^{K}\.lora_down\.weight: the matching up/B matrix is missing"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, 64),
      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(64, 2)},
     r"names the same layer \(unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q\) as"),
    ({"unet.conv_in.weight": torch.randn(4, 4)}, r"^unet\.conv_in\.weight: neither a LoRA nor a textual-inversion key"),
    ({f"{K}.lora_down.weight": torch.randn(2, 64, 3, 3), f"{K}.lora_up.weight": torch.randn(64, 2, 3, 3)},
     rf"^{K}\.lora_up\.weight: expected a 2-D matrix"),
])
def test_keys_that_would_not_be_applied_refuse_the_file(tensors, match):
    with pytest.raises(AdapterFormatError, match=match):
        parse_adapter(save_bytes({**VALID, **tensors}))


# -- pickle files: refused by the parser, never unpickled ------------------------------------------

UNPICKLED = []


def _side_effect():
    UNPICKLED.append(True)
    return {}


class _Payload:
    def __reduce__(self):
        return (_side_effect, ())


def _pickles() -> dict[str, bytes]:
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save({"x": torch.randn(2), "p": _Payload()}, zipped)
    torch.save({"x": torch.randn(2), "p": _Payload()}, legacy, _use_new_zipfile_serialization=False)
    return {"torch.save zip": zipped.getvalue(), "legacy torch.save": legacy.getvalue(),
            "pickle": pickle.dumps(_Payload(), protocol=4), "pickle protocol 2": pickle.dumps(_Payload(), protocol=2)}


@pytest.mark.parametrize("what", ["torch.save zip", "legacy torch.save", "pickle", "pickle protocol 2"])
def test_pickle_files_are_refused_never_unpickled(what, tmp_path):
    data = _pickles()[what]
    path = tmp_path / "lora.pt"
    path.write_bytes(data)
    for source in (data, str(path)):
        with pytest.raises(AdapterFormatError, match=r"pickle files can run arbitrary code .* never unpickled"):
            parse_adapter(source, token="<t>")
    assert UNPICKLED == []


def test_a_damaged_safetensors_file_is_not_called_a_pickle():
    # A header 0x280 bytes long starts with 80 02, like pickle protocol 2, but zeros follow.
    data = bytearray(save_bytes({"x" * 580: torch.zeros(1)}))
    assert data[:2] == b"\x80\x02"
    data[8] = ord("X")
    with pytest.raises(AdapterFormatError, match="^not a readable safetensors file") as caught:
        parse_adapter(bytes(data))
    assert "pickle" not in str(caught.value)


def test_a_zip_that_is_not_a_checkpoint_is_just_not_safetensors():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(AdapterFormatError, match=r"not a readable safetensors file: this is a zip archive"):
        parse_adapter(buf.getvalue())


def test_the_gateway_import_refuses_a_pickle_before_anything_is_stored(gateway):
    """ImportAdapter hands the request's bytes to parse_adapter: the refusal is the parser's, so the
    caller gets INVALID_ARGUMENT with its reason, and nothing is stored."""
    import grpc

    from service._generated.steerserve.v1 import steerserve_pb2 as pb
    from tests.conftest import auth

    stub = gateway.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.ImportAdapter(pb.ImportAdapterRequest(name="pickled", safetensors=_pickles()["torch.save zip"]),
                           metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pickle files can run arbitrary code" in err.value.details()
    assert "pickled" not in {a.name for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=auth()).adapters}
    assert UNPICKLED == []


# -- embeddings (item 2) ----------------------------------------------------------------------------


def test_a1111_and_diffusers_embeddings():
    vec = torch.randn(2, 32)
    assert parse_adapter(save_bytes({"emb_params": vec}), token="<a>").token_embeddings["<a>"].equal(vec)
    a1111 = parse_adapter(save_bytes({"string_to_param.*": vec, "string_to_token.*": torch.tensor([265])}), token="<b>")
    assert list(a1111.token_embeddings) == ["<b>"] and a1111.layout == "A1111 embedding"
    for key in ("emb_params", "string_to_param.*"):
        with pytest.raises(AdapterFormatError, match=rf"^{re.escape(key)}: a textual-inversion vector needs a token"):
            parse_adapter(save_bytes({key: vec}))
    # diffusers' learned_embeds: {token: vectors}; a token given renames it, as load_textual_inversion(token=) does.
    assert list(parse_adapter(save_bytes({"<cat-toy>": vec[0]})).token_embeddings) == ["<cat-toy>"]
    renamed = parse_adapter(save_bytes({"<cat-toy>": vec[0]}), token="<mine>")
    assert list(renamed.token_embeddings) == ["<mine>"] and renamed.token_embeddings["<mine>"].shape == (1, 32)


def test_a1111_embedding_equals_diffusers_load_textual_inversion(sd, tmp_path):
    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "a1111.safetensors"
    save_file({"emb_params": vec}, str(path))
    token, prompt = "<a1111-cat>", "a photo of <a1111-cat> on a mat"
    sd.store["a1111"] = sd.engine.adapters.bank.prepare(parse_adapter(str(path), token=token))
    ours = sd.engine.encode_prompts([prompt, prompt], [(AdapterUse("a1111"),), ()])
    pipe = copy.deepcopy(sd.pipe)
    pipe.load_textual_inversion(str(path), token=token)
    ref = pipe.encode_prompt([prompt], "cpu", 1, False)[0]
    torch.testing.assert_close(ours[:1], ref, rtol=0, atol=1e-6)
    assert (ours[:1] - ours[1:]).abs().max() > 1e-2
