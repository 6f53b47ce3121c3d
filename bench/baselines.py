"""The same personalization written the usual way: diffusers' training examples with peft.

What a user would otherwise run, reduced to its training step so bench_personalize can time it per
step against service/personalize on the same model, photos, batch and learning rate. Each function
follows its example script (examples/dreambooth/train_dreambooth_lora.py,
examples/textual_inversion/textual_inversion.py, examples/custom_diffusion/train_custom_diffusion.py,
diffusers 0.42) with accelerate left out (one CPU process, fp32):

- the dataset transforms each photo every step (resize, centre crop, normalise);
- the VAE encodes the batch every step and the text encoder encodes the prompt every step;
- DreamBooth-LoRA: peft `LoraConfig` on to_q/to_k/to_v/to_out.0 through `unet.add_adapter`;
- Textual Inversion: the token added to the tokenizer, the embedding table resized, the whole table's
  gradient computed, the other rows restored after each step;
- Custom Diffusion: `CustomDiffusionAttnProcessor2_0` with full trainable K/V copies on every
  cross-attention layer, the new token's row of the table, other rows' gradients zeroed.

Each returns the wall time of every training step in seconds. Quality is not their purpose (plain
MSE, no prior preservation): only the cost of a step.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from peft import LoraConfig
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer


def _load(model_dir: Path):
    kw = dict(local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", **kw)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", **kw)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", **kw)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler", **kw)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def _transform(image: Image.Image, size: int) -> torch.Tensor:
    """transforms.Resize(size, BILINEAR) + CenterCrop(size) + ToTensor() + Normalize([0.5], [0.5])."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _resolution(unet, vae) -> int:
    return unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


def _batches(images, batch_size: int, size: int, g: torch.Generator):
    """A shuffled DataLoader over the photos (repeated, as the scripts' datasets repeat them)."""
    while True:
        order = torch.randperm(len(images), generator=g).tolist() * batch_size
        for start in range(0, len(images), batch_size):
            yield torch.stack([_transform(images[i], size) for i in order[start:start + batch_size]])


def _input_ids(tokenizer, prompt: str, n: int) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return ids.expand(n, -1)


def _denoising_step(unet, vae, text_encoder, tokenizer, noise_scheduler, pixel_values, prompt: str, g):
    """The body every example shares: encode the batch and the prompt, noise, predict, MSE."""
    input_ids = _input_ids(tokenizer, prompt, pixel_values.shape[0])
    latents = vae.encode(pixel_values).latent_dist.sample(generator=g) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(input_ids)[0]
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def _timed(steps: int, one_step) -> list[float]:
    times = []
    for step in range(steps):
        started = time.perf_counter()
        one_step(step)
        times.append(time.perf_counter() - started)
    return times


def dreambooth_lora(model_dir, images, prompt: str, rank: int, steps: int, learning_rate: float, batch_size: int,
                    seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load(Path(model_dir))
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    g = torch.Generator().manual_seed(seed)
    data = _batches(images, batch_size, _resolution(unet, vae), g)
    unet.train()

    def one_step(step):
        loss = _denoising_step(unet, vae, text_encoder, tokenizer, noise_scheduler, next(data), prompt, g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return _timed(steps, one_step)


def _add_token(tokenizer, text_encoder, token: str, initializer_word: str) -> int:
    """Both scripts: add the placeholder to the tokenizer, grow the table, start from the initializer."""
    if tokenizer.add_tokens(token) != 1:
        raise ValueError(f"tokenizer already has {token!r}")
    init_ids = tokenizer.encode(initializer_word, add_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        table[token_id] = table[init_ids].mean(0)  # the scripts take a one-token initializer; ours may split
    return token_id


def _token_setup(model_dir, images, token: str, initializer_word: str, batch_size: int, seed: int):
    """What the two token-learning scripts share: the models, the token added, its row trainable."""
    torch.manual_seed(seed)
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load(Path(model_dir))
    token_id = _add_token(tokenizer, text_encoder, token, initializer_word)
    text_encoder.get_input_embeddings().weight.requires_grad_(True)
    text_encoder.train()
    g = torch.Generator().manual_seed(seed)
    data = _batches(images, batch_size, _resolution(unet, vae), g)
    return tokenizer, text_encoder, vae, unet, noise_scheduler, token_id, data, g


def textual_inversion(model_dir, images, placeholder_token: str, initializer_word: str, prompt: str, steps: int,
                      learning_rate: float, batch_size: int, seed: int = 0) -> list[float]:
    tokenizer, text_encoder, vae, unet, noise_scheduler, token_id, data, g = _token_setup(
        model_dir, images, placeholder_token, initializer_word, batch_size, seed)
    embeddings = text_encoder.get_input_embeddings()
    optimizer = torch.optim.AdamW(embeddings.parameters(), lr=learning_rate, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)
    orig_embeds_params = embeddings.weight.data.clone()
    index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
    index_no_updates[token_id] = False

    def one_step(step):
        loss = _denoising_step(unet, vae, text_encoder, tokenizer, noise_scheduler, next(data), prompt, g)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # make sure only the placeholder's embedding is updated
            embeddings.weight[index_no_updates] = orig_embeds_params[index_no_updates]

    return _timed(steps, one_step)


def custom_diffusion(model_dir, images, modifier_token: str, initializer_word: str, prompt: str, steps: int,
                     learning_rate: float, batch_size: int, seed: int = 0) -> list[float]:
    tokenizer, text_encoder, vae, unet, noise_scheduler, token_id, data, g = _token_setup(
        model_dir, images, modifier_token, initializer_word, batch_size, seed)
    embeddings = text_encoder.get_input_embeddings()

    # The script's processor set-up: full K/V copies on cross-attention, plain processors elsewhere.
    weights = unet.state_dict()
    processors = {}
    for name in unet.attn_processors.keys():
        cross_attention_dim = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden_size = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden_size = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden_size = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        layer = name.split(".processor")[0]
        if cross_attention_dim is not None:
            processor = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=hidden_size,
                                                        cross_attention_dim=cross_attention_dim)
            processor.load_state_dict({"to_k_custom_diffusion.weight": weights[layer + ".to_k.weight"],
                                       "to_v_custom_diffusion.weight": weights[layer + ".to_v.weight"]})
        else:
            processor = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False, hidden_size=hidden_size,
                                                        cross_attention_dim=cross_attention_dim)
        processors[name] = processor
    del weights
    unet.set_attn_processor(processors)
    layers = torch.nn.ModuleList(p for p in unet.attn_processors.values())
    optimizer = torch.optim.AdamW(itertools.chain(embeddings.parameters(), layers.parameters()), lr=learning_rate,
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet.train()

    def one_step(step):
        loss = _denoising_step(unet, vae, text_encoder, tokenizer, noise_scheduler, next(data), prompt, g)
        loss.backward()
        # Only the modifier token's row learns: zero the other rows' gradients (as the script does).
        grads = embeddings.weight.grad
        keep = torch.arange(len(tokenizer)) != token_id
        grads.data[keep, :] = grads.data[keep, :].fill_(0)
        torch.nn.utils.clip_grad_norm_(itertools.chain(embeddings.parameters(), layers.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return _timed(steps, one_step)
