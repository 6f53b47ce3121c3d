"""The engine as a library: offline loading, determinism, cancellation."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.default_model import seeded_model_dir
from service.engine.pipeline import Engine, GenerationCancelled, GenerationSpec
from service.engine.tokenizer import build_clip_tokenizer


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.from_pretrained(seeded_model_dir(tmp_path_factory.mktemp("models")))


def test_tokenizer_matches_openai_clip():
    ids = build_clip_tokenizer()("a photo of sks dog").input_ids
    assert ids == [49406, 320, 1125, 539, 48136, 1929, 49407]


def test_seeded_model_folder_is_reproducible(tmp_path):
    a = seeded_model_dir(tmp_path / "a")
    b = seeded_model_dir(tmp_path / "b")
    for part in ("unet", "vae", "text_encoder"):
        fa = next((a / part).glob("*.safetensors")).read_bytes()
        fb = next((b / part).glob("*.safetensors")).read_bytes()
        assert fa == fb, part


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        Engine.from_pretrained(tmp_path)


def test_generate_is_deterministic_and_guided(engine):
    spec = GenerationSpec(prompt="a red circle", steps=3, seed=5)
    a = np.asarray(engine.generate(spec).images[0])
    b = np.asarray(engine.generate(spec).images[0])
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    unguided = np.asarray(engine.generate(GenerationSpec(prompt="a red circle", steps=3, seed=5, guidance_scale=1.0)).images[0])
    assert not np.array_equal(a, unguided)


def test_should_stop_cancels_between_steps(engine):
    seen = []
    with pytest.raises(GenerationCancelled, match="step 3 of 10"):
        engine.generate(
            GenerationSpec(prompt="x", steps=10, seed=1),
            should_stop=lambda: len(seen) >= 2,
            on_step=lambda i, n: seen.append(i),
        )
    assert seen == [1, 2]


def test_adapters_without_a_bank_are_refused(engine):
    from service.engine.pipeline import AdapterUse

    with pytest.raises(LookupError, match="no adapter bank"):
        engine.generate(GenerationSpec(prompt="x", steps=1, adapters=(AdapterUse("ad-1"),)))
