"""Personalization and editing on SDXL (issue 35): the four methods and both editors, in-process, on
an SDXL-architecture folder with random weights at reduced widths (bench/model_folders.py).

Each method trains a few steps through `service.personalize.train` (what the job runner calls),
conditions every image on its own original size and crop (SDXL's time_ids, as diffusers' SDXL
training scripts do), and writes an adapter that round-trips the adapter format, loads into the
serving bank of an SDXL engine (LoRA on the UNet and both text encoders, a token of both encoders'
widths) and changes what it generates. DDS and DreamSteerer edit a non-square source on SDXL with
those adapters, conditioned on the source's size, and return an image of the source's size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from bench.model_folders import sdxl_folder
from service.adapters import BankedAdapters, parse_adapter, serialize_adapter
from service.edit import DDS, DREAMSTEERER, EditOptions, EditSpec
from service.edit.runner import run_edit
from service.edit.workbench import Workbench
from service.engine.families import SDXL as SDXLFamily
from service.engine.pipeline import AdapterUse, Engine, GenerationSpec
from service.personalize import (
    CUSTOM_DIFFUSION, DREAMBOOTH_LORA, FINESTYLE, TEXTUAL_INVERSION, Concept, FrozenBase, TrainingSpec, learns_token,
    train,
)
from service.personalize.common import Posteriors, crop_time_ids, token_init
from service.personalize.finestyle import box_time_ids
from service.personalize.lora import LoRALinear
from service.profiles import SDXL, choose


def _photo(width: int, height: int, colour, seed: int) -> Image.Image:
    """A coloured disc on a noisy background, any size (the trainers resize and centre-crop)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    ys, xs = np.mgrid[:height, :width]
    disc = (ys - height / 2) ** 2 + (xs - width / 2) ** 2 < (min(width, height) / 3) ** 2
    pixels[disc] = colour
    return Image.fromarray(pixels)


# Not square and not the training size: each one's time ids differ from the default (64, 64, 0, 0, 64, 64).
PHOTOS = [_photo(80, 64, (200, 40, 160), 0), _photo(64, 96, (210, 50, 150), 1), _photo(128, 128, (190, 30, 170), 2)]
STYLE_IMAGE = _photo(96, 64, (240, 220, 30), 3)
SOURCE = np.asarray(_photo(64, 48, (220, 30, 30), 4))  # 48 x 64: the edits' source
SOURCE_PROMPT = "a red disc on a dark background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sdxl_folder(tmp_path_factory.mktemp("models") / "sdxl-tiny")


@pytest.fixture(scope="module")
def base(one_torch_thread, folder):
    return FrozenBase.from_pretrained(folder)


class TimeIds:
    """Records the time_ids every UNet call of `unet` receives (after the family unpacked them)."""

    def __init__(self, unet):
        self.seen: list[torch.Tensor] = []
        self._handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        if added is not None:
            self.seen.append(added["time_ids"].detach().clone())

    def close(self):
        self._handle.remove()

    def rows(self) -> set[tuple[int, ...]]:
        return {tuple(int(v) for v in row) for ids in self.seen for row in ids}


def spec_for(method: str, **kw) -> TrainingSpec:
    token = "<sks>" if learns_token(method) else "sks"
    kw.setdefault("images", PHOTOS)
    return TrainingSpec(method=method, token=token, class_word="disc", steps=2, learning_rate=2e-2, rank=2,
                        batch_size=2, seed=1, **kw)


SPECS = {
    # Both text encoders' LoRA, and prior preservation (class images at the training size).
    DREAMBOOTH_LORA: dict(train_text_encoder=True, prior_loss_weight=1.0, num_class_images=1),
    TEXTUAL_INVERSION: dict(),
    # The paper's scale augmentation on (its enlarged views' crops move their time ids).
    CUSTOM_DIFFUSION: dict(extra={"augment": True, "augmentations": 3}),
    # One concept located by cross-attention on SDXL, one given by its box.
    FINESTYLE: dict(images=[STYLE_IMAGE], style_phrase="in zwx style",
                    concepts=[Concept("a yellow disc"), Concept("a dark background", (0, 0, 20, 20))],
                    extra={"crops_per_concept": 2, "background_crops": 1}),
}


@pytest.fixture(scope="module")
def trained(base):
    """{method: (Adapter, spec, time ids the UNet saw while it trained)}."""
    out = {}
    for method, kw in SPECS.items():
        spec = spec_for(method, **kw)
        spy = TimeIds(base.unet)
        try:
            adapter = train(base, spec)
        finally:
            spy.close()
        out[method] = (adapter, spec, spy.rows())
    return out


@pytest.fixture(scope="module")
def served(folder, trained):
    """An SDXL engine serving the four adapters from its bank (parsed from their files)."""
    blobs = {method: serialize_adapter(adapter) for method, (adapter, _, _) in trained.items()}
    engine = Engine.from_pretrained(folder)
    BankedAdapters.attach(engine, lambda key: parse_adapter(blobs[key]), num_slots=6, max_rank=8, max_rows=16,
                          registry=CollectorRegistry())
    return engine


def test_the_sdxl_folder_gets_the_sdxl_profile(folder, base):
    assert isinstance(base.engine.family, SDXLFamily)
    chosen = choose(str(folder))
    assert chosen.profile is SDXL and chosen.source.startswith("detected")


def test_training_images_carry_their_size_and_crop(base):
    """What diffusers' SDXL scripts pass per image: original (h, w), the centre crop's top-left in
    the resized image, the target size; the UNet sees them on each row."""
    ids = Posteriors.of_images(base, PHOTOS).time_ids
    expected = [[64, 80, 0, 8, 64, 64], [96, 64, 16, 0, 64, 64], [128, 128, 0, 0, 64, 64]]
    assert ids.tolist() == expected
    assert crop_time_ids(PHOTOS, 64).tolist() == expected
    # A FineStyle crop: the whole training image is the centre crop; a crop of its right half at
    # (32, 16) is the image resized 2x (192 x 128) cropped at ((0 + 16) x 2, (16 + 32) x 2).
    assert box_time_ids(STYLE_IMAGE.size, (0, 0, 64, 64), 64).tolist() == [64, 96, 0, 16, 64, 64]
    assert box_time_ids(STYLE_IMAGE.size, (32, 16, 64, 48), 64).tolist() == [64, 96, 32, 96, 64, 64]
    # with_time_ids changes the trailing (added-conditioning) token only.
    family = base.engine.family
    embeds = base.prompt_encoder.embed(["a sks disc"])
    moved = family.with_time_ids(embeds, ids[:1])
    assert torch.equal(moved[:, :77], embeds[:, :77]) and not torch.equal(moved, embeds)
    assert family.unpack(moved)[1]["time_ids"].tolist() == expected[:1]


def test_token_init_reads_each_encoders_table(base):
    vector = token_init(base, "disc")
    widths = base.prompt_encoder.widths
    assert vector.shape == (1, sum(widths)) and len(widths) == 2
    for (tokenizer, encoder), start, width in zip(base.prompt_encoder.towers, (0, widths[0]), widths):
        ids = tokenizer("disc", add_special_tokens=False).input_ids
        row = encoder.get_input_embeddings().weight[ids].mean(0)
        torch.testing.assert_close(vector[0, start : start + width], row, rtol=0, atol=0)


@pytest.mark.parametrize("method", list(SPECS))
def test_method_trains_on_sdxl_and_its_adapter_is_served(base, trained, served, method):
    adapter, spec, seen = trained[method]
    adapter = parse_adapter(serialize_adapter(adapter))  # what the store keeps and the bank reads
    modules = set(adapter.lora)
    token_width = sum(base.prompt_encoder.widths)  # 32 + 32: clip_l columns, then clip_g's

    # Each method trains its own parameter set, on SDXL's layers.
    if method == DREAMBOOTH_LORA:
        parts = {m.partition(".")[0] for m in modules}
        assert parts == {"unet", "text_encoder", "text_encoder_2"}  # both text encoders, as diffusers' SDXL script
        assert {m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] for m in modules if m.startswith("unet.")
                and "to_out" not in m} == {f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")}
        assert not adapter.token_embeddings
    elif method == TEXTUAL_INVERSION:
        assert not modules and adapter.token_embeddings["<sks>"].shape == (1, token_width)
    else:
        assert modules and all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in modules)
        # K/V read the cross-attention input: both encoders' states, the UNet's 64 (SDXL base: 2048).
        assert {adapter.lora[m].down.shape[1] for m in modules} == {base.engine.text_width}
        if method == CUSTOM_DIFFUSION:
            assert adapter.token_embeddings["<sks>"].shape == (1, token_width)
        else:
            assert adapter.kind == "style" and not adapter.token_embeddings
    assert all(m.rank == spec.rank for m in adapter.lora.values())

    # Every image was conditioned on its own size and crop (not only the default 64 x 64).
    if method in (DREAMBOOTH_LORA, TEXTUAL_INVERSION):
        assert seen >= {(64, 80, 0, 8, 64, 64), (96, 64, 16, 0, 64, 64)} or seen >= {(128, 128, 0, 0, 64, 64)}
        assert seen <= {(64, 80, 0, 8, 64, 64), (96, 64, 16, 0, 64, 64), (128, 128, 0, 0, 64, 64), (64, 64, 0, 0, 64, 64)}
    elif method == FINESTYLE:
        assert any(row[:2] == (64, 96) and row[2:4] != (0, 16) for row in seen), seen  # crops of the 96 x 64 image
    assert not any(isinstance(m, LoRALinear) for _, e in base.text_encoders for m in e.modules())
    assert not any(isinstance(m, LoRALinear) for m in base.unet.modules())

    # The serving bank loads it and Generate changes with it.
    prompt = f"{spec.prompt} on a dark background" if method != FINESTYLE else f"a disc {spec.style_phrase}"
    plain = np.asarray(served.generate(GenerationSpec(prompt=prompt, steps=2, seed=1, width=64, height=48)).images[0])
    tuned = np.asarray(served.generate(GenerationSpec(prompt=prompt, steps=2, seed=1, width=64, height=48,
                                                      adapters=(AdapterUse(method),))).images[0])
    assert plain.shape == tuned.shape == (48, 64, 3)
    assert np.abs(plain.astype(int) - tuned.astype(int)).mean() > 0.05, method


# -- editing -----------------------------------------------------------------------------------


QUICK = EditOptions(iterations=4, steer_steps=2, preliminary_iterations=2, guided_samples=1, guided_steps=3)


def edit_spec(method: str, adapter_method: str | None, trained) -> EditSpec:
    if adapter_method is None:
        return EditSpec(method=method, source=SOURCE, source_prompt=SOURCE_PROMPT,
                        target_prompt="a yellow disc on a dark background", seed=2, options=QUICK)
    spec = trained[adapter_method][1]
    return EditSpec(method=method, source=SOURCE, source_prompt=SOURCE_PROMPT,
                    target_prompt=f"{spec.prompt} on a dark background", adapter=AdapterUse(adapter_method),
                    adapter_method=adapter_method, token=spec.token, class_word=spec.class_word, seed=2, options=QUICK)


SOURCE_IDS = (48, 64, 0, 0, 48, 64)


@pytest.mark.parametrize("adapter_method", [None, DREAMBOOTH_LORA])
def test_dds_edits_on_sdxl_at_the_source_size(served, trained, adapter_method):
    spy = TimeIds(served.unet)
    try:
        out = run_edit(served, None, edit_spec(DDS, adapter_method, trained))
    finally:
        spy.close()
    assert out.image.shape == SOURCE.shape
    assert spy.rows() == {SOURCE_IDS}  # every UNet row conditioned on the source's size


@pytest.mark.parametrize("adapter_method", [TEXTUAL_INVERSION, CUSTOM_DIFFUSION, DREAMBOOTH_LORA])
def test_dreamsteerer_edits_on_sdxl_at_the_source_size(base, served, trained, adapter_method):
    workbench = Workbench(base)  # a private model: the training base (never the serving UNet)
    spies = [TimeIds(served.unet), TimeIds(base.unet)]
    try:
        out = run_edit(served, workbench, edit_spec(DREAMSTEERER, adapter_method, trained))
    finally:
        for spy in spies:
            spy.close()
    assert out.image.shape == SOURCE.shape and out.mask.shape == SOURCE.shape[:2]
    assert out.steer_losses and all("edsd" in r and "mode_shifting" in r for r in out.steer_losses)
    assert spies[0].rows() == {SOURCE_IDS} and spies[1].rows() == {SOURCE_IDS}
    assert served.adapters.manager.ephemeral_keys() == []  # the steered copy lived for the request only
    assert not any(isinstance(m, LoRALinear) for m in base.unet.modules())


def test_sdxl_adapters_are_refused_where_the_layers_do_not_exist(trained):
    """An SDXL adapter's second-encoder layers name nothing on an SD 1.x model's workbench."""
    from service.edit.spec import EditRefused
    from service.edit.workbench.applied import applied

    class OneEncoder:
        unet = torch.nn.Module()
        text_encoder = torch.nn.Module()
        text_encoder_2 = None

    adapter = trained[DREAMBOOTH_LORA][0]
    second = {k: v for k, v in adapter.lora.items() if k.startswith("text_encoder_2.")}
    assert second
    with pytest.raises(EditRefused, match="text_encoder_2"):
        with applied(OneEncoder(), type(adapter)(lora=second)):
            pass
