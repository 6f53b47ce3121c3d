"""Textual Inversion: learn one new word embedding for the subject, nothing else (Gal et al., "An
Image is Worth One Word", ICLR 2023; diffusers' examples/textual_inversion/textual_inversion.py).
docs/personalize/textual_inversion.md says what we chose and why.

    a few photos of the subject  ->  one vector v for the placeholder token, initialised from the
                                     class word's embedding; the UNet and text encoder stay frozen

The loop: each step, a batch of the subject photos (VAE posterior samples), noised at a uniform
random timestep; the prompt "a <token> <class_word>" is encoded with v in the token's place, and
the MSE between the UNet's prediction and the noise is minimised over v alone. Gradients reach v
through the frozen text encoder and UNet. The tokenizer and the embedding table are never touched:
the vector is injected per prompt (service/engine/text.py), as at serving time.

On SDXL the token has a vector in each text encoder (one tensor, CLIP ViT-L's columns then
OpenCLIP ViT-bigG's, as the adapter format and the prompt encoder carry it), each initialised from
the initializer word in its own encoder's table and trained together, as diffusers' pivotal-tuning
SDXL script (advanced_diffusion_training, --train_text_encoder_ti) does; diffusers'
textual_inversion_sdxl.py trains the first encoder's alone. Each image is conditioned on its own
original size and crop (`time_ids`).
"""

from __future__ import annotations

from torch import nn

from service.adapters import Adapter

from .common import (
    FrozenBase,
    Posteriors,
    TrainingRun,
    adamw,
    batch_indices,
    denoising_loss,
    encode_text,
    step_generator,
    token_init,
    with_time_ids,
)
from .spec import NoProgress, Progress, TrainingSpec

# The method IS a learned placeholder word. Defaults: service/profiles.py.
LEARNS_TOKEN = True


def train(base: FrozenBase, spec: TrainingSpec, progress: Progress = NoProgress(), resume: bytes | None = None) -> Adapter:
    # 1. Data: the subject photos, encoded once.
    subject = Posteriors.of_images(base, spec.images)

    # 2. Trainable: the token's vector, starting at the class word's embedding.
    vector = nn.Parameter(token_init(base, spec.extra.get("initializer_word") or spec.class_word))
    params = {"token": vector}
    run = TrainingRun(spec, progress, params, adamw([vector], spec.learning_rate), resume)

    # 3. The loop.
    for step in run.steps():
        g = step_generator(spec.seed, step)
        index = batch_indices(len(subject), spec.batch_size, g)
        latents = subject.sample(index, g)
        noisy, t, target = base.schedule.noise(latents, g)
        text = encode_text(base, [spec.prompt], {spec.token: vector}).to(base.engine.dtype)
        embeds = with_time_ids(base, text.expand(latents.shape[0], -1, -1), subject.time_ids[index])
        pred = base.unet(noisy, t, encoder_hidden_states=embeds).sample
        run.update((denoising_loss(pred, target) * base.schedule.weight(t)).mean())

    # 4. The adapter: the token and its vector.
    return Adapter(token_embeddings={spec.token: vector.detach().cpu().clone()})
