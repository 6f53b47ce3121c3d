"""FineStyle as a library (service/personalize/finestyle.py) and its two-scale guidance in sampling.

The pair builder cuts regions inside the image, captions them with the phrases as given, honours
given boxes and locates the others by cross-attention; training lowers the denoising loss of the
style image and writes a style adapter on attn2 K/V only; style_guidance_scale 0 is plain
generation with the adapter, a higher one strengthens the style, and the three predictions of a
step share one UNet call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from service.adapters import BankedAdapters, parse_adapter, serialize_adapter
from service.adapters.loading import adapter_checker
from service.research.basemodel import DEFAULT_MODEL_DIR
from service.engine.pipeline import AdapterUse, Engine, GenerationSpec
from service.engine.sampling import classifier_free_guidance, style_guidance
from service.research.measures import Judge
from service.research.measures.classifier import HEADS
from service.personalize import FINESTYLE, Concept, FrozenBase, TrainingSpec, defaults, train
from service.personalize.attention_maps import concept_regions, cross_attention_maps
from service.personalize.common import Posteriors, step_generator
from service.personalize.finestyle import build_pairs, map_box, whole_caption
from service.research.world.generator import Scene, WorldObject, render
from service.research.world.heldout import STYLES

STYLE = STYLES["neon-outline"]  # a yellow star and a pink circle, outlined on black
PHRASE = "in zwx style"
CONCEPTS = [Concept(f"a {o.phrase}") for o in STYLE.content]


@pytest.fixture(scope="module")
def base(one_torch_thread):
    return FrozenBase.from_pretrained(DEFAULT_MODEL_DIR)


def _truth_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


# -- the pair builder ------------------------------------------------------------------------------


def test_pairs_honour_boxes_keep_phrases_and_stay_inside_the_image(base):
    reference = STYLE.reference()
    star_box = _truth_box(reference.masks[0])
    concepts = [Concept("a yellow star", star_box), Concept("a pink circle", _truth_box(reference.masks[1]))]
    pairs = build_pairs(base, Image.fromarray(reference.image), concepts, PHRASE, seed=1,
                        crops_per_concept=5, background_crops=3)
    size = base.size

    assert pairs.concept_boxes == [c.box for c in concepts]  # given boxes are used as they are
    assert pairs.kinds[0] == "whole" and pairs.captions[0] == "a yellow star and a pink circle in zwx style"
    assert pairs.kinds.count("concept") == 10 and 1 <= pairs.kinds.count("background") <= 3
    assert pairs.pixels.shape == (len(pairs.kinds), 3, size, size)
    assert pairs.masks.shape == (len(pairs.kinds), 1, size, size) and bool((pairs.masks[0] == 1).all())
    for kind, caption, box, mask in zip(pairs.kinds, pairs.captions, pairs.boxes, pairs.masks):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size, box  # inside the image
        # Where each concept lands in the (resized) crop, and what the loss mask keeps of it.
        scale = size / (x1 - x0)
        where = []
        for c in concepts:
            m = torch.zeros(size, size, dtype=torch.bool)
            m[max(0, int(np.floor((c.box[1] - y0) * scale))):max(0, int(np.ceil((c.box[3] - y0) * scale))),
              max(0, int(np.floor((c.box[0] - x0) * scale))):max(0, int(np.ceil((c.box[2] - x0) * scale)))] = True
            where.append(m)
        if kind == "concept":
            own = next(i for i, c in enumerate(concepts) if caption == f"{c.phrase} {PHRASE}")  # the phrase as given
            assert _inside(concepts[own].box, box)  # the crop holds its concept ...
            assert bool(mask[0][where[own]].all())  # ... all of it counted ...
            for i, other in enumerate(where):  # ... and none of the others, where they are not it
                if i != own:
                    assert float(mask[0][other & ~where[own]].sum()) == 0
        elif kind == "background":
            assert caption == PHRASE
            assert all(float(mask[0][w].sum()) == 0 for w in where) and float(mask.mean()) >= 0.5  # background only

    # Without data scaling: the whole image with the whole caption, nothing else.
    plain = build_pairs(base, Image.fromarray(reference.image), concepts, PHRASE, data_scaling=False)
    assert plain.kinds == ["whole"] and plain.captions == [whole_caption(concepts, PHRASE)]


def test_overlapping_tiny_and_cut_off_boxes(base):
    reference = Image.fromarray(STYLE.reference().image)
    # A ring around a star: the star's crops keep the star counted though the ring's box covers it.
    concepts = [Concept("a yellow star", (20, 20, 30, 30)), Concept("a pink ring", (10, 10, 40, 40)),
                Concept("a dot", (50, 50, 51, 51))]
    pairs = build_pairs(base, reference, concepts, PHRASE, seed=3, crops_per_concept=4)
    for caption, box, mask in zip(pairs.captions, pairs.boxes, pairs.masks):
        assert box[2] - box[0] >= base.size // 4  # no crop blown up from a few pixels
        if caption.startswith("a yellow star"):
            scale = base.size / (box[2] - box[0])
            star = mask[0, int((20 - box[1]) * scale):int((30 - box[1]) * scale),
                        int((20 - box[0]) * scale):int((30 - box[0]) * scale)]
            assert bool((star == 1).all())
    # A box that the centre crop cuts off leaves no region: that concept is located instead.
    assert map_box((0, 0, 20, 20), (128, 64), 64) is None
    assert map_box((30, 0, 60, 20), (128, 64), 64) == (0, 0, 28, 20)


def test_boxes_follow_the_image_to_the_training_resolution():
    # A 256x192 image is resized by 1/3 to 85x64 and centre-cropped to 64x64 (10 columns off the left).
    assert map_box((40, 32, 120, 96), (256, 192), 64) == (3, 11, 30, 32)  # x: 40/3 - 10, y: 32/3
    assert map_box((0, 0, 256, 192), (256, 192), 64) == (0, 0, 64, 64)


def test_cross_attention_locates_a_known_object_of_a_world_image(base):
    scene = Scene("solid", "blue", (WorldObject("star", "red", "solid", 0.3, 0.3, 0.2),
                                    WorldObject("circle", "white", "solid", 0.72, 0.7, 0.18)))
    sample = render(scene)
    maps = cross_attention_maps(base, Image.fromarray(sample.image), "a red star and a white circle",
                                ["a red star", "a white circle"])
    assert maps.shape == (2, base.size, base.size) and maps.min() >= 0 and maps.max() <= 1
    boxes = concept_regions(maps)
    for box, mask in zip(boxes, sample.masks):
        truth = _truth_box(mask)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        assert _inside((int(cx), int(cy), int(cx) + 1, int(cy) + 1), truth), (box, truth)  # centred on it
        assert _iou(box, truth) > 0.3, (box, truth)
    # The two phrases' maps peak in different places: the star's on the star, not on the circle.
    star_mask, circle_mask = sample.masks
    assert maps[0][star_mask].mean() > maps[0][circle_mask].mean()
    assert maps[1][circle_mask].mean() > maps[1][star_mask].mean()


def test_pairs_without_boxes_are_cut_around_the_located_concepts(base):
    reference = STYLE.reference()
    pairs = build_pairs(base, Image.fromarray(reference.image), CONCEPTS, PHRASE, crops_per_concept=3)
    for located, mask in zip(pairs.concept_boxes, reference.masks):
        assert located is not None and _iou(located, _truth_box(mask)) > 0.2, (located, _truth_box(mask))


# -- training and sampling ---------------------------------------------------------------------------


def style_spec(steps: int, **extra) -> TrainingSpec:
    d = defaults(FINESTYLE)
    return TrainingSpec(method=FINESTYLE, images=[Image.fromarray(STYLE.reference().image)], token=PHRASE,
                        class_word="", steps=steps, learning_rate=d.learning_rate * 2, rank=4, batch_size=4, seed=2,
                        concepts=CONCEPTS, style_phrase=PHRASE, extra=extra)


@pytest.fixture(scope="module")
def style_adapter(base):
    return serialize_adapter(train(base, style_spec(steps=80)))


@pytest.fixture(scope="module")
def engine(style_adapter):
    engine = Engine.from_pretrained(DEFAULT_MODEL_DIR)
    BankedAdapters.attach(engine, lambda key: parse_adapter(style_adapter), num_slots=2, max_rank=16, max_rows=24,
                          registry=CollectorRegistry())
    return engine


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_a_kv_only_style_adapter(base, style_adapter, engine):
    adapter = adapter_checker(DEFAULT_MODEL_DIR, 16)(parse_adapter(style_adapter))  # what the gateway checks
    assert adapter.kind == "style" and not adapter.token_embeddings
    assert adapter.lora and all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in adapter.lora)
    attn2 = {f"unet.{n}" for n, _ in base.unet.named_modules() if n.endswith("attn2")}
    assert {m.rsplit(".", 1)[0] for m in adapter.lora} == attn2  # every cross-attention layer, nothing else
    assert len(adapter.lora) == 2 * len(attn2)

    # The denoising loss of the style image with its caption, on fixed noise, through the serving bank.
    latents = Posteriors.of_images(base, [Image.fromarray(STYLE.reference().image)]).mean.repeat(6, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=step_generator(7, 0))
    t = torch.tensor([100, 250, 400, 550, 700, 850])
    noisy = base.schedule.scheduler.add_noise(latents, noise, t)
    caption = whole_caption(CONCEPTS, PHRASE)

    def loss(rows):
        embeds = engine.encode_prompts([caption] * 6, rows)
        return float(((engine.predict_noise(noisy, t, embeds, rows) - noise) ** 2).mean())

    with_adapter, without = loss([(AdapterUse("style"),)] * 6), loss([()] * 6)
    assert with_adapter < 0.9 * without, (with_adapter, without)


def test_style_guidance_formula():
    u, c, s = torch.randn(3, 2, 4, 8, 8)
    # Without a style adapter (styled == cond) it is ordinary CFG at the same guidance scale.
    assert torch.allclose(style_guidance(u, c, c, 7.5, 3.0), classifier_free_guidance(u, c, 7.5), atol=1e-5)
    # It is linear in the style scale, along the adapter's direction.
    assert torch.allclose(style_guidance(u, c, s, 5.0, 2.0) - style_guidance(u, c, s, 5.0, 1.0), s - c, atol=1e-5)


def _generate(engine, style_scale, style=True, prompt=f"a blue square {PHRASE}", n=2, guidance=4.0):
    spec = GenerationSpec(prompt=prompt, steps=12, guidance_scale=guidance, seed=5, num_images=n,
                          adapters=(AdapterUse("style", style=style),), style_guidance_scale=style_scale)
    return np.stack([np.asarray(im) for im in engine.generate(spec).images])


@pytest.mark.slow
def test_style_scale_zero_is_plain_generation_with_the_adapter(engine):
    plain = _generate(engine, 0.0, style=False)  # the adapter as any adapter: on both CFG predictions
    assert np.array_equal(_generate(engine, 0.0), plain)
    assert not np.array_equal(_generate(engine, 1.0), plain)


@pytest.mark.slow
def test_higher_style_scale_strengthens_the_style(engine):
    """The style image's background is black: the classifier's belief in a black background, and the
    pixels' darkness, grow with the style scale."""
    judge = Judge()
    black = HEADS["bg_color"].index("black")
    beliefs, darkness = [], []
    for scale in (0.5, 2.0, 5.0):
        images = _generate(engine, scale, n=4)
        out, _ = judge.read(list(images))
        probs = out["bg_color"][:, black]  # probabilities already
        beliefs.append(float(probs.mean()))
        darkness.append(float(255 - images.mean()))
    assert beliefs[0] < beliefs[1] < beliefs[2], beliefs
    assert darkness[0] < darkness[2], darkness


@pytest.mark.slow
def test_three_predictions_of_a_step_share_one_unet_call(engine):
    calls = []
    hook = engine.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[0]),
                                                 with_kwargs=True)
    try:
        _generate(engine, 2.0, n=2)
        styled_calls = list(calls)
        calls.clear()
        _generate(engine, 0.0, n=2)
    finally:
        hook.remove()
    assert styled_calls == [6] * 12  # 2 images x (uncond, cond, cond + style), one call per step
    assert calls == [4] * 12


@pytest.mark.slow
def test_a_resumed_style_job_equals_an_uninterrupted_one(base):
    from tests.test_personalize_methods import Recorder
    from service.personalize import TrainingStopped

    spec = style_spec(steps=6)
    spec.checkpoint_every = 2
    whole = train(base, spec)
    interrupted = Recorder(stop_after=5)
    with pytest.raises(TrainingStopped):
        train(base, spec, interrupted)
    resumed = train(base, spec, Recorder(), resume=interrupted.checkpoints[4])
    assert resumed.kind == "style"
    for name, module in whole.lora.items():
        torch.testing.assert_close(resumed.lora[name].up, module.up, rtol=0, atol=1e-6)
