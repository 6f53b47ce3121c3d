"""The personalization methods as a library (service/personalize), on the embedded world model.

Each method trains a few steps on a held-out concept's photos; its adapter, loaded into the
serving adapter bank, lowers the denoising loss of the subject photos (measured on fixed noise and
timesteps, as served), holds exactly the parameters the method trains, and changes Generate. A job
resumed from a checkpoint ends exactly where an uninterrupted one does.
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
from service.personalize import SUBJECT_METHODS, FrozenBase, NoProgress, TrainingSpec, TrainingStopped, defaults, learns_token, train
from service.personalize.common import Posteriors, step_generator
from service.personalize.custom_diffusion import scale_augmented
from service.personalize.tokens import RARE_WORDS, TokenError, check_token, default_token, is_real_word
from service.research.world.heldout import CONCEPTS

PHOTOS = [Image.fromarray(s.image) for s in CONCEPTS["purple-dotted-heart"].references(3, seed=0)]


@pytest.fixture(scope="module")
def base(one_torch_thread):
    return FrozenBase.from_pretrained(DEFAULT_MODEL_DIR)


def spec_for(method: str, steps: int = 30, **kw) -> TrainingSpec:
    d = defaults(method)
    kw.setdefault("learning_rate", d.learning_rate * 2)
    return TrainingSpec(method=method, images=PHOTOS, token="<sks>" if learns_token(method) else "sks", class_word="heart",
                        steps=steps, rank=min(d.rank, 4), batch_size=2, seed=3, **kw)


def served_engine(blob: bytes | None) -> Engine:
    engine = Engine.from_pretrained(DEFAULT_MODEL_DIR)
    BankedAdapters.attach(engine, lambda key: parse_adapter(blob), num_slots=2, max_rank=16, max_rows=16,
                          registry=CollectorRegistry())
    return engine


def served_loss(engine: Engine, spec: TrainingSpec, use_adapter: bool) -> float:
    """Denoising loss of the subject photos with "a <token> heart", through the serving path, on
    fixed noise and timesteps (200..900: where the subject's shape and colour are decided)."""
    rows = [(AdapterUse("x"),)] * 6 if use_adapter else [()] * 6
    base = FrozenBase(engine)
    latents = Posteriors.of_images(base, PHOTOS).mean.repeat(2, 1, 1, 1)
    g = step_generator(99, 0)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([200, 350, 500, 650, 800, 900])
    noisy = base.schedule.scheduler.add_noise(latents, noise, t)
    embeds = engine.encode_prompts([spec.prompt] * 6, rows)
    return float(((engine.predict_noise(noisy, t, embeds, rows) - noise) ** 2).mean())


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SUBJECT_METHODS))
def test_method_lowers_its_loss_and_writes_a_servable_adapter(base, method):
    spec = spec_for(method)
    adapter = train(base, spec)
    blob = serialize_adapter(adapter)
    adapter = adapter_checker(DEFAULT_MODEL_DIR, 16)(parse_adapter(blob))  # what the gateway checks

    # Each method trains exactly its own parameter set.
    modules = set(adapter.lora)
    if method == "DREAMBOOTH_LORA":
        assert not adapter.token_embeddings and len(modules) > 0
        assert {m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] for m in modules if "to_out" not in m} == {
            f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")}
    elif method == "TEXTUAL_INVERSION":
        assert not modules and list(adapter.token_embeddings) == ["<sks>"]
    else:
        assert modules and all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in modules)
        assert list(adapter.token_embeddings) == ["<sks>"]
    assert all(m.rank == spec.rank for m in adapter.lora.values())

    engine = served_engine(blob)
    before, after = served_loss(engine, spec, False), served_loss(engine, spec, True)
    assert after < before * 0.97, (before, after)

    # Generate with the adapter differs from the base model; the base model is untouched.
    prompt = f"{spec.prompt} on a white background"
    plain = np.asarray(engine.generate(GenerationSpec(prompt=prompt, steps=4, seed=1)).images[0], np.int16)
    tuned = np.asarray(engine.generate(GenerationSpec(prompt=prompt, steps=4, seed=1,
                                                      adapters=(AdapterUse("x"),))).images[0], np.int16)
    assert np.abs(plain - tuned).mean() > 0.5
    fresh = Engine.from_pretrained(DEFAULT_MODEL_DIR)
    assert all(torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), fresh.unet.state_dict().values()))


class Recorder(NoProgress):
    def __init__(self, stop_after: int | None = None):
        self.checkpoints: dict[int, bytes] = {}
        self.steps: list[int] = []
        self.stop_after = stop_after

    def step(self, step, total, loss):
        self.steps.append(step)

    def checkpoint(self, step, state):
        self.checkpoints[step] = state

    def should_stop(self):
        return self.stop_after is not None and len(self.steps) >= self.stop_after


@pytest.mark.slow
@pytest.mark.parametrize("method", ["DREAMBOOTH_LORA", "CUSTOM_DIFFUSION"])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(base, method):
    spec = spec_for(method, steps=8, checkpoint_every=3, prior_loss_weight=0.5, num_class_images=2)
    whole = train(base, spec)

    interrupted = Recorder(stop_after=7)
    with pytest.raises(TrainingStopped):
        train(base, spec, interrupted)
    assert sorted(interrupted.checkpoints) == [3, 6]  # none at the last step: the adapter is the result
    resumed_progress = Recorder()
    resumed = train(base, spec, resumed_progress, resume=interrupted.checkpoints[6])
    assert resumed_progress.steps == [7, 8]
    for name, module in whole.lora.items():
        torch.testing.assert_close(resumed.lora[name].down, module.down, rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed.lora[name].up, module.up, rtol=0, atol=1e-6)


def test_textual_inversion_starts_from_the_class_word_and_trains_only_the_vector(base):
    spec = spec_for("TEXTUAL_INVERSION", steps=1)
    table = base.text_encoder.get_input_embeddings().weight.detach().clone()
    heart = table[base.engine.tokenizer("heart", add_special_tokens=False).input_ids[0]]
    vector = train(base, spec).token_embeddings["<sks>"][0]
    # One Adam step away from "heart": Adam's first step moves each coordinate by about the learning rate.
    assert 0 < (vector - heart).abs().max() < 1.5 * spec.learning_rate
    assert torch.equal(table, base.text_encoder.get_input_embeddings().weight)  # the table is untouched


def test_custom_diffusion_scale_augmentation_masks_the_padding():
    views = scale_augmented(PHOTOS[:1], 64, 4, per_image=12, seed=0)
    assert views.pixels.shape == (12, 3, 64, 64) and views.masks.shape == (12, 1, 16, 16)
    assert views.modifiers[0] == "" and views.masks[0].all()
    shrunk = [i for i, m in enumerate(views.masks) if not m.all()]
    assert shrunk, "some views are shrunk onto a canvas"
    for i in shrunk:
        # Outside the mask is canvas (0 in [-1, 1] pixels), inside it the photo.
        cells = views.masks[i, 0].repeat_interleave(4, 0).repeat_interleave(4, 1).bool()
        assert views.pixels[i][:, ~cells].abs().max() <= 1.0
    small = [views.modifiers[i] for i in shrunk if views.masks[i].sum() < 0.3 * 256]
    assert small and all(m in ("far away", "very small") for m in small)


@pytest.mark.slow
def test_training_with_prior_preservation_samples_class_images_once(base):
    spec = spec_for("DREAMBOOTH_LORA", steps=2, prior_loss_weight=1.0, num_class_images=3)
    train(base, spec)
    prior = base.class_images("heart", 3, spec.seed)
    assert len(prior) == 3
    assert base.class_images("heart", 3, spec.seed) is prior  # cached for the next job of the class


def test_tokens(base):
    tokenizer = base.engine.tokenizer
    for word in RARE_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1 and not is_real_word(word, tokenizer)
    for word in ("dog", "circle", "dotted", "lol"):
        assert is_real_word(word, tokenizer), word
    assert default_token(learns_token=False, taken=[]) == "sks"
    assert default_token(learns_token=True, taken=["sks", "<ohwx>"]) == "<bnha>"
    check = dict(learns_token=True, class_word="dog", taken=["<zzq>"], tokenizer=tokenizer)
    assert check_token("<mydog>", **check) == "<mydog>"
    for bad in ("dog", "<dog>", "two words", "x", "<zzq>", "ZZQ", "<>"):
        with pytest.raises(TokenError):
            check_token(bad, **check)


@pytest.mark.slow
def test_text_encoder_lora_trains_and_restores_both_models(base):
    """DreamBooth-LoRA with train_text_encoder: the adapter holds text-encoder LoRA too, and both
    frozen models are exactly as before afterwards (a regression: the UNet's restore once walked the
    text encoder's layer names too and failed at the end of every such job)."""
    from service.personalize.lora import LoRALinear

    before = {k: v.clone() for k, v in base.text_encoder.state_dict().items()}
    adapter = train(base, spec_for("DREAMBOOTH_LORA", steps=2, train_text_encoder=True))
    assert any(name.startswith("text_encoder.") for name in adapter.lora)
    assert any(name.startswith("unet.") for name in adapter.lora)
    for model in (base.unet, base.text_encoder):
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
    after = base.text_encoder.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
