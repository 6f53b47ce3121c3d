"""Conv2d LoRA in the adapter bank (issue 36 item 1): kohya's 1x1 proj_in/proj_out and LyCORIS LoCon's
resnet and sampler convs, a different adapter per batch row in ONE UNet call.

The reference is diffusers + peft: each LoRA file is written by peft's Conv2d LoRA layers and
diffusers' ``save_lora_weights`` (bench/reference_adapters.py), and each banked row is compared with
diffusers' ``load_lora_weights`` (+ ``set_adapters`` for weights) of that adapter alone, on the tiny
SD-structured pipeline (``use_linear_projection=False``: proj_in/proj_out are 1x1 convs, as in SD 1.x
and 2.x) and on the tiny SDXL (linear projections: only the resnet/sampler convs are convs). The
layer itself is also checked against explicitly fused weights ``W + sum_k w_k * scale_k * up_k @ down_k``
for every conv geometry the UNets use (stride 2, no padding, dilation, non-square kernels).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from prometheus_client import CollectorRegistry
from safetensors.torch import save as save_safetensors
from torch import nn

from bench.model_folders import sdxl_folder, sdxl_reference_pipeline
from bench.reference_adapters import UNET_LORA_TARGETS, peft_lora, write_reference_lora
from service.adapters import (
    Adapter,
    AdapterBank,
    AdapterFormatError,
    BankedAdapters,
    BankedLoRAConv2d,
    BankState,
    LoraModule,
    parse_adapter,
)
from service.adapters.bank import CONV_LAYERS, DEFAULT_UNET_CONV_TARGETS, SERVED_UNET_TARGETS
from service.adapters.loading import adapter_checker
from service.engine.pipeline import AdapterUse, Engine

ATOL = 1e-4  # the bank's bar against diffusers in fp32 (test_adapter_bank.py)
KOHYA_CONV = ("proj_in", "proj_out")  # 1x1 convs in SD 1.x transformers
LOCON = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
ALL_CONVS = CONV_LAYERS["locon"]  # the setting adapter_conv_layers=locon

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the layer against explicitly fused weights ------------------------------------------------------


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=1),  # proj_in / proj_out / conv_shortcut
    dict(kernel_size=3, padding=1),  # resnet conv1 / conv2, upsampler conv
    dict(kernel_size=3, stride=2, padding=1),  # downsampler conv
    dict(kernel_size=3, stride=2, padding=0),  # downsampler conv with padding=0 (diffusers pads first)
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=(3, 1), padding=(1, 0)),
    dict(kernel_size=1, stride=2),
])
def test_banked_conv_equals_fused_weights_per_row(geometry):
    """Rows routed to K=2 different (slot, weight) pairs each equal a conv with W + sum_k w_k up_k @ down_k;
    a row on slot 0 is the base conv bit for bit."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, **geometry).double()
    slots, rank, k = 4, 3, 2
    state = BankState(8, k, rank, torch.device("cpu"), torch.float64)
    layer = BankedLoRAConv2d(conv, slots, rank, state)
    kh, kw = conv.kernel_size
    downs = [torch.zeros(rank, 6, kh, kw, dtype=torch.float64)]
    ups = [torch.zeros(5, rank, dtype=torch.float64)]
    downs += [torch.randn(rank, 6, kh, kw, generator=g, dtype=torch.float64) for _ in range(slots - 1)]
    ups += [torch.randn(5, rank, generator=g, dtype=torch.float64) for _ in range(slots - 1)]
    for s in range(slots):
        layer.lora_A[s].copy_(layer.down_layout(downs[s]))
        layer.lora_Bt[s].copy_(ups[s].t())
    route = torch.tensor([[1, 2], [3, 0], [0, 0]])
    weights = torch.tensor([[1.0, 0.5], [0.7, 0.0], [0.0, 0.0]], dtype=torch.float64)
    state.slot_ids[:3], state.weights[:3] = route, weights
    state.coef[:3, 0] = weights.repeat_interleave(rank, dim=1)
    x = torch.randn(3, 6, 9, 8, generator=g, dtype=torch.float64)
    y = layer(x)
    for i in range(3):
        w = conv.weight.clone()
        for j in range(k):
            s = int(route[i, j])
            w += weights[i, j] * torch.einsum("or,rihw->oihw", ups[s], downs[s])
        want = F.conv2d(x[i : i + 1], w, conv.bias, conv.stride, conv.padding, conv.dilation)
        torch.testing.assert_close(y[i : i + 1], want, rtol=0, atol=1e-10)
    assert torch.equal(y[2], conv(x)[2])


# -- SD 1.x structure: 1x1 proj_in/proj_out and LoCon, against diffusers ---------------------------------


def _run(unet, x, t, ehs, **kwargs):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ehs, **kwargs).sample


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    proj_in = tiny_pipe.unet.down_blocks[1].attentions[0].proj_in
    assert isinstance(proj_in, nn.Conv2d) and proj_in.kernel_size == (1, 1)  # use_linear_projection=False
    return tiny_pipe


SD_SPECS = {
    # kohya's default LoRA on SD 1.x: attention and the 1x1 proj_in/proj_out
    "kohya": dict(rank=4, alpha=8.0, seed=1, targets=UNET_LORA_TARGETS + KOHYA_CONV),
    # LyCORIS LoCon: 3x3 resnet and sampler convs (1x1 conv_shortcut)
    "locon": dict(rank=2, alpha=3.0, seed=2, targets=LOCON),
    "both": dict(rank=8, alpha=4.0, seed=3, targets=UNET_LORA_TARGETS + KOHYA_CONV + LOCON),
    "swap": dict(rank=4, alpha=4.0, seed=4, targets=LOCON + KOHYA_CONV),
}


@pytest.fixture(scope="module")
def sd_dirs(pipe, tmp_path_factory):
    dirs = {}
    for name, spec in SD_SPECS.items():
        dirs[name] = tmp_path_factory.mktemp(f"conv_lora_{name}")
        write_reference_lora(dirs[name], pipe.unet, std=0.1, **spec)
    return dirs


@pytest.fixture(scope="module")
def sd_adapters(sd_dirs):
    return {k: parse_adapter(str(d / "pytorch_lora_weights.safetensors")) for k, d in sd_dirs.items()}


@pytest.fixture(scope="module")
def sd_banked(pipe, sd_adapters):
    unet = copy.deepcopy(pipe.unet)
    bank = AdapterBank(unet, num_slots=5, max_rank=8, conv_target_modules=ALL_CONVS)
    for slot, name in enumerate(("kohya", "locon", "both"), start=1):
        bank.load_slot(slot, sd_adapters[name])
    return unet, bank


@pytest.fixture(scope="module")
def sd_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 32, 32, generator=g), torch.tensor(500), torch.randn(2, 77, 32, generator=g)


def diffusers_reference(pipe, dirs, names, weights, x, t, ehs, **kwargs):
    """The UNet output with diffusers' load_lora_weights (peft Conv2d/Linear LoRA) of these adapters alone."""
    pipe = copy.deepcopy(pipe)
    for name in names:
        pipe.load_lora_weights(str(dirs[name]), adapter_name=name)
    pipe.set_adapters(list(names), adapter_weights=list(weights))
    return _run(pipe.unet, x, t, ehs, **kwargs)


def test_the_files_carry_conv_tensors_and_the_bank_serves_every_conv_they_train(sd_dirs, sd_adapters, sd_banked):
    from safetensors import safe_open

    with safe_open(str(sd_dirs["both"] / "pytorch_lora_weights.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    conv3 = "unet.down_blocks.0.resnets.0.conv1"
    assert shapes[f"{conv3}.lora_A.weight"] == (8, 32, 3, 3) and shapes[f"{conv3}.lora_B.weight"] == (32, 8, 1, 1)
    proj = "unet.down_blocks.1.attentions.0.proj_in"
    assert shapes[f"{proj}.lora_A.weight"] == (8, 64, 1, 1)
    _, bank = sd_banked
    assert bank.module_shapes[conv3] == (32, 32, 3, 3) and bank.module_shapes[proj] == (64, 64, 1, 1)
    assert isinstance(bank.layers["unet.down_blocks.0.downsamplers.0.conv"], BankedLoRAConv2d)
    convs = {m for m in sd_adapters["both"].lora if isinstance(bank.layers[m], BankedLoRAConv2d)}
    # every conv the UNet has but conv_in/conv_out (which LoCon does not train): 1x1 and 3x3
    assert len(convs) == sum(isinstance(m, BankedLoRAConv2d) for m in bank.layers.values()) > 10
    assert sd_adapters["locon"].lora[conv3].down.shape == (2, 32, 3, 3)


def test_slot_zero_is_the_base_model_bit_exact(pipe, sd_banked, sd_inputs):
    unet, bank = sd_banked
    x, t, ehs = sd_inputs
    plain = _run(pipe.unet, x, t, ehs)
    assert torch.equal(_run(unet, x, t, ehs), plain)
    with bank.activate([[0], []]):
        assert torch.equal(_run(unet, x, t, ehs), plain)


def test_mixed_batch_of_conv_loras_equals_diffusers_per_row(pipe, sd_dirs, sd_banked, sd_inputs):
    """Rows [kohya (attention + 1x1 proj), locon (3x3 resnets), both, base] as CFG pairs in one UNet
    call == diffusers with each adapter alone."""
    unet, bank = sd_banked
    x, t, ehs = sd_inputs
    xs = torch.cat([x[:1]] * 4 + [x[1:]] * 4)
    es = torch.cat([ehs[:1]] * 4 + [ehs[1:]] * 4)
    with bank.activate([[1], [2], [3], []], repeat=2):
        out = _run(unet, xs, t, es)
    plain = _run(pipe.unet, x, t, ehs)
    for i, name in enumerate(("kohya", "locon", "both")):
        ref = diffusers_reference(pipe, sd_dirs, [name], [1.0], x, t, ehs)
        assert (ref - plain).abs().max() > 1e-2  # the adapter changes the output
        torch.testing.assert_close(out[[i, i + 4]], ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(out[[3, 7]], plain, rtol=0, atol=1e-5)


def test_conv_only_adapter_differs_from_base_only_through_its_convs(pipe, sd_dirs, sd_inputs):
    """The LoCon file holds nothing but conv tensors, and alone it moves the output: the conv path is
    what is being compared above, not the attention path."""
    adapter = parse_adapter(str(sd_dirs["locon"] / "pytorch_lora_weights.safetensors"))
    assert not any("attn" in m for m in adapter.lora)
    unet = copy.deepcopy(pipe.unet)
    bank = AdapterBank(unet, num_slots=2, max_rank=2, conv_target_modules=LOCON)
    bank.load_slot(1, adapter)
    x, t, ehs = sd_inputs
    with bank.activate([[1], [1]]):
        out = _run(unet, x, t, ehs)
    torch.testing.assert_close(out, diffusers_reference(pipe, sd_dirs, ["locon"], [1.0], x, t, ehs), rtol=0, atol=ATOL)


def test_weighted_mix_of_conv_loras_equals_diffusers_set_adapters(pipe, sd_dirs, sd_banked, sd_inputs):
    unet, bank = sd_banked
    x, t, ehs = sd_inputs
    with bank.activate([[(2, 0.7), (3, 0.5)], [(1, -0.6), (2, 1.2)]]):
        out = _run(unet, x, t, ehs)
    ref0 = diffusers_reference(pipe, sd_dirs, ["locon", "both"], [0.7, 0.5], x[:1], t, ehs[:1])
    ref1 = diffusers_reference(pipe, sd_dirs, ["kohya", "locon"], [-0.6, 1.2], x[1:], t, ehs[1:])
    torch.testing.assert_close(out, torch.cat([ref0, ref1]), rtol=0, atol=ATOL)


def test_hot_swap_writes_conv_slots_in_place(pipe, sd_dirs, sd_adapters, sd_inputs):
    """Replacing slot 1's adapter moves no tensor: every layer keeps its buffers (identity and address,
    what compiled graphs and CUDA graphs hold on to), and the row now equals the new adapter's reference."""
    unet = copy.deepcopy(pipe.unet)
    bank = AdapterBank(unet, num_slots=2, max_rank=8, conv_target_modules=ALL_CONVS)
    bank.load_slot(1, sd_adapters["locon"])
    before = [(t, t.data_ptr()) for layer in bank.layers.values() for t in (layer.lora_A, layer.lora_Bt)]
    x, t, ehs = sd_inputs
    bank.load_slot(1, sd_adapters["swap"])
    after = [t for layer in bank.layers.values() for t in (layer.lora_A, layer.lora_Bt)]
    assert all(a is b and a.data_ptr() == ptr for (b, ptr), a in zip(before, after, strict=True))
    with bank.activate([[1], [1]]):
        out = _run(unet, x, t, ehs)
    torch.testing.assert_close(out, diffusers_reference(pipe, sd_dirs, ["swap"], [1.0], x, t, ehs), rtol=0, atol=ATOL)
    bank.clear_slot(1)
    with bank.activate([[1], [1]]):
        assert torch.equal(_run(unet, x, t, ehs), _run(pipe.unet, x, t, ehs))


def test_kohya_style_conv_keys_with_alpha_serve_like_peft(pipe, sd_adapters, sd_banked, sd_inputs):
    """The same LoCon written with kohya's suffixes on diffusers names (4-D lora_down/lora_up and an
    .alpha tensor) is the same adapter: the bank serves it identically."""
    adapter = sd_adapters["locon"]
    tensors = {}
    for module, lora in adapter.lora.items():
        local = module.removeprefix("unet.")
        down = lora.down if lora.down.ndim == 4 else lora.down[:, :, None, None]
        tensors[f"{local}.lora_down.weight"] = down.contiguous()
        tensors[f"{local}.lora_up.weight"] = lora.up[:, :, None, None].contiguous()
        tensors[f"{local}.alpha"] = torch.tensor(lora.alpha)
    kohya = parse_adapter(save_safetensors(tensors))
    unet, bank = sd_banked
    x, t, ehs = sd_inputs
    with bank.activate([[2], [2]]):
        want = _run(unet, x, t, ehs)
    bank.load_slot(4, kohya)
    with bank.activate([[4], [4]]):
        assert torch.equal(_run(unet, x, t, ehs), want)
    bank.clear_slot(4)


def test_conv_tensors_that_do_not_fit_are_refused_naming_the_module(pipe, sd_adapters):
    conv3 = "unet.down_blocks.0.resnets.0.conv1"
    proj = "unet.down_blocks.1.attentions.0.proj_in"
    bank = AdapterBank(copy.deepcopy(pipe.unet), num_slots=2, max_rank=8, conv_target_modules=ALL_CONVS)
    cases = [
        (Adapter(lora={proj: LoraModule(torch.randn(2, 64, 3, 3), torch.randn(64, 2), 2.0)}),
         rf"{proj}: down/A has shape \(2, 64, 3, 3\), expected \[2, 64, 1, 1\]"),
        (Adapter(lora={conv3: LoraModule(torch.randn(2, 32), torch.randn(32, 2), 2.0)}),
         rf"{conv3}: down/A has shape \(2, 32\), expected \[2, 32, 3, 3\]"),
        (Adapter(lora={conv3: LoraModule(torch.randn(2, 32, 3, 3), torch.randn(64, 2), 2.0)}),
         rf"{conv3}: up/B has shape"),
        (Adapter(lora={"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
                       LoraModule(torch.randn(2, 64, 3, 3), torch.randn(64, 2), 2.0)}),
         r"attn1\.to_q: down/A has shape \(2, 64, 3, 3\), expected \[2, 64\]"),
        (Adapter(lora={"unet.conv_in": LoraModule(torch.randn(2, 4, 3, 3), torch.randn(32, 2), 2.0)}),
         "unet.conv_in: not a module this model serves adapters on"),
    ]
    for adapter, match in cases:
        with pytest.raises(AdapterFormatError, match=match):
            bank.load_slot(1, adapter)
    # A conv LoRA on a bank without conv layers is refused, not half-applied.
    attention_only = AdapterBank(copy.deepcopy(pipe.unet), num_slots=2, max_rank=8)
    with pytest.raises(AdapterFormatError, match=r"proj_in: a convolution LoRA .* it serves LoRA on no UNet "
                                                 r"convolution\); the setting adapter_conv_layers=proj"):
        attention_only.load_slot(1, sd_adapters["kohya"])
    # An up/B with a k x k kernel is not a LoRA the bank (or peft) computes.
    bad = save_safetensors({f"{conv3}.lora_A.weight": torch.randn(2, 32, 3, 3),
                            f"{conv3}.lora_B.weight": torch.randn(32, 2, 3, 3)})
    with pytest.raises(AdapterFormatError, match=rf"{conv3}\.lora_B\.weight: .*up/B"):
        parse_adapter(bad)


def test_the_stored_form_round_trips_conv_loras(sd_adapters):
    from service.adapters import serialize_adapter

    adapter = sd_adapters["both"]
    again = parse_adapter(serialize_adapter(adapter))
    assert again.lora.keys() == adapter.lora.keys()
    for m, lora in adapter.lora.items():
        assert torch.equal(again.lora[m].down, lora.down) and torch.equal(again.lora[m].up, lora.up)
        assert again.lora[m].alpha == lora.alpha


# -- the service: serving banks and the gateway's import check agree --------------------------------------


@pytest.fixture(scope="module")
def model_dir(model_cache):
    from service.engine.default_model import default_model_dir

    return default_model_dir(model_cache)


def engine_locon(engine: Engine, rank: int, seed: int, targets=LOCON + KOHYA_CONV) -> Adapter:
    """A random conv LoRA over the engine's UNet (peft's layers, diffusers' file)."""
    layers, config = peft_lora(engine.unet, rank, float(rank), targets, seed)
    from diffusers import StableDiffusionPipeline

    tensors = StableDiffusionPipeline.pack_weights(layers, "unet")
    return parse_adapter(save_safetensors({k: v.contiguous() for k, v in tensors.items()}))


def test_served_bank_and_import_check_serve_the_same_conv_layers(model_dir):
    """adapter_conv_layers=locon: the serving bank (service/serving.py) and the gateway's import check
    bank the same convs; a LoCon adapter passes the check and serves its row, the base row bit for bit."""
    from service.config import Settings
    from service.gateway.server import triton_model_environment
    from service.serving import build_engine

    settings = Settings(adapter_conv_layers="locon", adapter_slots=2, adapter_max_rank=8)
    assert triton_model_environment(settings, model_dir)["STEERSERVE_ADAPTER_CONV_LAYERS"] == "locon"
    probe = Engine.from_pretrained(model_dir)
    adapter = engine_locon(probe, 4, 7)
    engine = build_engine(settings, 4, model_dir=model_dir, loader=lambda key: adapter, unet_runtime=False,
                          registry=CollectorRegistry())
    check = adapter_checker(model_dir, 8, conv_target_modules=CONV_LAYERS[settings.adapter_conv_layers])
    bank = engine.adapters.bank
    assert check.__self__.module_shapes == bank.module_shapes  # the gateway checks what serves
    assert any(len(s) == 4 and s[2:] == (3, 3) for s in bank.module_shapes.values())
    assert check(adapter).lora.keys() == adapter.lora.keys()
    g = torch.Generator().manual_seed(0)
    size = engine.limits.default_size // engine.vae_scale_factor
    latents = torch.randn(2, engine.unet.config.in_channels, size, size, generator=g)
    embeds = engine.encode_prompts(["a", "b"])
    t = torch.tensor([500, 500])
    with torch.no_grad():
        noise = engine.predict_noise(latents, t, embeds, [[AdapterUse("k")], []])
        base = probe.unet(latents, t, encoder_hidden_states=embeds).sample
    assert torch.equal(noise[1], base[1])
    assert (noise[0] - base[0]).abs().max() > 1e-3


def test_by_default_the_service_banks_the_1x1_projections_and_names_the_setting_for_locon(model_dir):
    """The default (adapter_conv_layers=proj): kohya's 1x1 proj_in/proj_out LoRA imports and serves;
    a LoCon file is refused in one line naming its first resnet conv and the setting that serves it."""
    from service.config import Settings

    assert Settings().adapter_conv_layers == "proj" and DEFAULT_UNET_CONV_TARGETS == KOHYA_CONV
    probe = Engine.from_pretrained(model_dir)
    kohya = engine_locon(probe, 4, 8, KOHYA_CONV + UNET_LORA_TARGETS)
    locon = engine_locon(probe, 4, 9)
    check = adapter_checker(model_dir, 8)
    assert check(kohya).lora.keys() == kohya.lora.keys()
    with pytest.raises(AdapterFormatError, match=r"^unet\.down_blocks\.0\.downsamplers\.0\.conv: a convolution LoRA "
                                                 r".* serves LoRA on the UNet's proj_in, proj_out convolutions\); "
                                                 r"the setting adapter_conv_layers=locon"):
        check(locon)
    engine = Engine.from_pretrained(model_dir)
    hook = BankedAdapters.attach(engine, {"k": kohya, "l": locon}.__getitem__, num_slots=2, max_rank=8,
                                 registry=CollectorRegistry())
    assert hook.bank.module_shapes == check.__self__.module_shapes
    with pytest.raises(AdapterFormatError, match="adapter_conv_layers=locon"):
        with hook.activate([[AdapterUse("l")]]):
            pass


# -- SDXL: linear projections, so only the resnet / sampler convs are convs --------------------------------


SDXL_TIME_IDS = torch.tensor([[64.0, 64, 0, 0, 64, 64]])


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = sdxl_folder(tmp_path_factory.mktemp("models") / "sdxl-tiny")
    pipe = sdxl_reference_pipeline(folder)
    return folder, pipe


@pytest.fixture(scope="module")
def sdxl_dirs(sdxl, tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    _, pipe = sdxl
    dirs = {}
    specs = {"locon": (4, 8.0, 21, LOCON), "mixed": (2, 3.0, 22, LOCON + UNET_LORA_TARGETS)}
    for name, (rank, alpha, seed, targets) in specs.items():
        layers, config = peft_lora(pipe.unet, rank, alpha, targets, seed, std=0.1)
        dirs[name] = tmp_path_factory.mktemp(f"sdxl_conv_{name}")
        StableDiffusionXLPipeline.save_lora_weights(str(dirs[name]), unet_lora_layers=layers,
                                                    unet_lora_adapter_metadata=config)
    return dirs


def test_sdxl_rows_with_different_locon_adapters_equal_diffusers(sdxl, sdxl_dirs):
    folder, pipe = sdxl
    adapters = {k: parse_adapter(str(d / "pytorch_lora_weights.safetensors")) for k, d in sdxl_dirs.items()}
    unet = copy.deepcopy(pipe.unet)
    # The serving bank's Linear layers (the gateway's check below banks the same).
    bank = AdapterBank(unet, num_slots=3, max_rank=4, target_modules=SERVED_UNET_TARGETS, conv_target_modules=ALL_CONVS)
    # SDXL's proj_in/proj_out are Linear: banked as Linear layers, never as convolutions.
    assert not any(("proj_in" in n or "proj_out" in n) and len(s) == 4 for n, s in bank.module_shapes.items())
    assert any(n.endswith("resnets.0.conv1") for n in adapters["locon"].lora)
    for slot, name in enumerate(("locon", "mixed"), start=1):
        bank.load_slot(slot, adapters[name])
    # the gateway's check on the SDXL folder banks the same convs
    checked = adapter_checker(folder, 4, conv_target_modules=ALL_CONVS).__self__.module_shapes
    assert {n: s for n, s in checked.items() if n.startswith("unet.")} == bank.module_shapes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    ehs = torch.randn(1, 77, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": SDXL_TIME_IDS}
    three = {"text_embeds": cond["text_embeds"].repeat(3, 1), "time_ids": SDXL_TIME_IDS.repeat(3, 1)}
    t = torch.tensor(500)
    with bank.activate([[1], [2], []]):
        out = _run(unet, x.repeat(3, 1, 1, 1), t, ehs.repeat(3, 1, 1), added_cond_kwargs=three)
    plain = _run(pipe.unet, x, t, ehs, added_cond_kwargs=cond)
    for i, name in enumerate(("locon", "mixed")):
        ref = diffusers_reference(pipe, sdxl_dirs, [name], [1.0], x, t, ehs, added_cond_kwargs=cond)
        assert (ref - plain).abs().max() > 1e-2
        torch.testing.assert_close(out[i : i + 1], ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(out[2:], plain, rtol=0, atol=1e-5)
    with bank.activate([[0]]):
        assert torch.equal(_run(unet, x, t, ehs, added_cond_kwargs=cond), plain)


# -- ONNX: the conv layers' slot stacks are graph inputs too ----------------------------------------------


@pytest.mark.slow
def test_onnx_graph_takes_the_conv_slots_as_inputs_and_equals_eager(model_dir, tmp_path):
    """The exported graph's bank inputs include every banked conv ([S, r, kh, kw, in] for 3x3), and rows
    with conv adapters through onnxruntime equal the eager banked UNet; a hot swap is seen without
    re-export."""
    from service.compiled import RuntimeOptions, configure_unet_runtime
    from service.compiled.onnx_runtime import OnnxUNet

    probe = Engine.from_pretrained(model_dir)
    adapters = {"x": engine_locon(probe, 4, 11), "y": engine_locon(probe, 2, 12, LOCON + UNET_LORA_TARGETS),
                "z": engine_locon(probe, 8, 13)}

    def banked():
        engine = Engine.from_pretrained(model_dir)
        BankedAdapters.attach(engine, adapters.__getitem__, num_slots=3, max_rank=8, max_rows=8,
                              conv_target_modules=ALL_CONVS, registry=CollectorRegistry())
        return engine

    eager, onnx = banked(), banked()
    configure_unet_runtime(onnx, RuntimeOptions(kind="onnx", cache_dir=tmp_path))
    runtime = onnx.unet_runtime.current
    assert isinstance(runtime, OnnxUNet)
    inputs = {i.name: i.shape for i in runtime.session.get_inputs()}
    bank = onnx.adapters.bank
    names = [n for n in bank.layers if n.startswith("unet.")]
    conv3 = next(i for i, n in enumerate(names) if n.endswith("resnets.0.conv1"))
    layer = bank.layers[names[conv3]]
    assert inputs[f"bank.{conv3}.A"] == [bank.num_slots, bank.max_rank, 3, 3, layer.in_channels]
    assert len(inputs) == 5 + 2 * len(names)

    g = torch.Generator().manual_seed(0)
    size = eager.limits.default_size // eager.vae_scale_factor
    latents = torch.randn(4, eager.unet.config.in_channels, size, size, generator=g)
    timesteps = torch.randint(1, 1000, (4,), generator=g)
    embeds = eager.encode_prompts([f"prompt {i}" for i in range(4)])
    for rows in ([[AdapterUse("x")], [AdapterUse("y", 0.5), AdapterUse("x")], [], [AdapterUse("x", 0.7)]],
                 [[AdapterUse("z")], [AdapterUse("x")], [AdapterUse("z", -1.0)], []]):  # z: a swap into a bound slot
        with torch.no_grad():
            got = onnx.predict_noise(latents, timesteps, embeds, rows)
            want = eager.predict_noise(latents, timesteps, embeds, rows)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert runtime.stats.fallback_calls == 0
