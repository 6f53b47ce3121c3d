"""DreamBooth with LoRA: bind a rare token to a subject by fine-tuning low-rank updates of the UNet's
attention (Ruiz et al., "DreamBooth", CVPR 2023; LoRA as in diffusers'
examples/dreambooth/train_dreambooth_lora.py, and train_dreambooth_lora_sdxl.py on SDXL).
docs/personalize/dreambooth_lora.md says what we chose and why.

    a few photos of the subject, "a <token> <class_word>"  ->  LoRA on attn1/attn2 q, k, v, out
                                                              (+ the text encoders' attention, optional)

On SDXL, as diffusers' SDXL script: the same UNet layers (to_q, to_k, to_v, to_out.0 of every
attention), with the text encoders trained both get LoRA on q/k/v/out_proj, and each image is
conditioned on its own original size and centre-crop offset (`time_ids`; the class images on their
generated size).

The loop: each step, a batch of the subject photos (VAE posterior samples), noised at a uniform
random timestep; the loss is the MSE between the UNet's prediction and the noise, with the prompt
"a <token> <class_word>". With prior preservation, the batch also holds the base model's own images
of "a <class_word>" with that prompt, and their loss (weighted `prior_loss_weight`) keeps the class
word meaning what it meant, so only the rare token takes on the subject.
"""

from __future__ import annotations

import contextlib

import torch

from service.adapters import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS, Adapter

from . import lora
from .common import (
    FrozenBase,
    Posteriors,
    TrainingRun,
    adamw,
    batch_indices,
    denoising_loss,
    encode_text,
    step_generator,
    with_time_ids,
)
from .spec import NoProgress, Progress, TrainingSpec

# The subject is bound to a rare existing word ("sks"); no embedding is learned. Step counts and
# learning rates belong to the base model: service/profiles.py.
LEARNS_TOKEN = False


def train(base: FrozenBase, spec: TrainingSpec, progress: Progress = NoProgress(), resume: bytes | None = None) -> Adapter:
    # 1. Data: the subject photos, encoded once; the prompt that names the subject.
    subject = Posteriors.of_images(base, spec.images)
    prior = base.class_images(spec.class_word, spec.num_class_images, spec.seed) if spec.prior_loss_weight > 0 else None
    class_prompt = f"a {spec.class_word}"

    # 2. Trainable: LoRA on the UNet's attention projections (and the text encoders', optionally:
    # SDXL's two both, as diffusers' SDXL script does).
    with contextlib.ExitStack() as stack:
        layers = stack.enter_context(lora.lora_layers(base.unet, "unet", DEFAULT_UNET_TARGETS, spec.rank, spec.seed))
        if spec.train_text_encoder:
            for i, (prefix, encoder) in enumerate(base.text_encoders):
                # A new dict: each lora_layers block restores the layers of the dict IT yielded.
                layers = layers | stack.enter_context(
                    lora.lora_layers(encoder, prefix, DEFAULT_TEXT_ENCODER_TARGETS, spec.rank, spec.seed + 1 + i)
                )
        params = lora.parameters(layers)
        run = TrainingRun(spec, progress, params, adamw(list(params.values()), spec.learning_rate), resume)

        # A frozen text encoder gives the same embeddings every step: encode them once.
        fixed_text = None if spec.train_text_encoder else _embeddings(base, spec, class_prompt).detach()

        # 3. The loop.
        for step in run.steps():
            g = step_generator(spec.seed, step)
            index = batch_indices(len(subject), spec.batch_size, g)
            latents, time_ids = subject.sample(index, g), subject.time_ids[index]
            n = latents.shape[0]
            if prior is not None:
                prior_index = batch_indices(len(prior), n, g)
                latents = torch.cat([latents, prior.sample(prior_index, g)])
                time_ids = torch.cat([time_ids, prior.time_ids[prior_index]])
            noisy, t, target = base.schedule.noise(latents, g)
            text = fixed_text if fixed_text is not None else _embeddings(base, spec, class_prompt)
            embeds = torch.cat([text[:1].expand(n, -1, -1)] + ([text[1:].expand(n, -1, -1)] if prior is not None else []))
            embeds = with_time_ids(base, embeds, time_ids)
            pred = base.unet(noisy, t, encoder_hidden_states=embeds).sample
            losses = denoising_loss(pred, target) * base.schedule.weight(t)
            loss = losses[:n].mean()
            if prior is not None:
                loss = loss + spec.prior_loss_weight * losses[n:].mean()
            run.update(loss)

        # 4. The adapter: the LoRA updates, under the bank's module names.
        return Adapter(lora=lora.to_lora_modules(layers))


def _embeddings(base: FrozenBase, spec: TrainingSpec, class_prompt: str) -> torch.Tensor:
    """[2, L, D]: the subject prompt and the class prompt."""
    return encode_text(base, [spec.prompt, class_prompt]).to(base.engine.dtype)
