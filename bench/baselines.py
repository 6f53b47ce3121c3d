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

Given `script=ScriptRun(...)`, each instead runs a WHOLE training the way its script does, at the
step count, learning rate, rank, batch and seed it is given, and returns `Trained`: the files the
script writes to its --output_dir and the same weights as our `Adapter` (bench/parity_personalize
judges them against our trainers). What each whole run keeps of its script:

- every script: its dataset (a DataLoader with shuffle=True: a new permutation each epoch, the
  last batch of an epoch short), its transforms, a VAE posterior sample and the prompt encoded
  every step, DDPM noise at a uniform timestep, plain MSE (none of the three has --snr_gamma), AdamW
  (0.9, 0.999, weight decay 1e-2, eps 1e-8) under diffusers' `get_scheduler` ("constant", warm-up 0
  as their READMEs run them), fp32, one process;
- train_dreambooth_lora.py: peft LoRA (gaussian init, alpha = rank) on to_k/to_q/to_v/to_out.0
  (and add_k_proj/add_v_proj where they exist), with --train_text_encoder a second LoRA on the text
  encoder's q/k/v/out_proj; Resize (lanczos) + RandomCrop; with prior preservation each item pairs
  an instance photo with a class image (the dataset is as long as the larger set) and the loss is
  MSE(instance) + weight x MSE(class); gradients clipped at 1.0; saved by `save_lora_weights` and
  read back by `parse_adapter` (service/adapters/layouts.py reads its keys);
- textual_inversion.py: the placeholder added to the tokenizer (the initializer must be ONE
  token, as the script requires), the table resized, encoder/final norm/position embedding frozen,
  AdamW on the whole table with every other row restored after each step, no clipping; its dataset
  (photos x --repeats 100) with a random `imagenet_templates_small` prompt ("a photo of a <token>")
  per item: the class word is not in its prompts, bicubic resize to a square, horizontal flip
  p = 0.5; saved as learned_embeds.safetensors ({token: [1, D]}, read by `parse_adapter`);
- train_custom_diffusion.py (--freeze_model crossattn_kv): full trainable K/V copies on every
  cross-attention layer, the modifier token's row (initializer "ktn", the script's default), the
  other rows' gradients zeroed, clipping at 1.0; its dataset as its README runs it (--hflip; scale
  augmentation on unless --noaug: photos shrunk onto a blank canvas or enlarged and cropped, "a far
  away " / "very small " / "zoomed in " / "close up " prefixed to the prompt, the loss masked to
  the image); with prior preservation the class images after it. Saved by `save_attn_procs` and
  as <token>.safetensors. Those K/V files hold whole matrices (no reader of layouts.py takes them:
  their keys are refused as model weights), so the conversion takes each one's difference from the
  base weight and factors it exactly (SVD, rank min(out, in), alpha = rank) into peft LoRA keys,
  which `parse_adapter` reads with the token file. Serving it needs a bank of that rank.

What a whole run leaves to its caller: the scripts' arguments that are a user's choice (instance
and class prompts, the class images in --class_data_dir) come from the ScriptRun and the caller;
the prior's class images are not sampled here (the scripts sample theirs with the pipeline and
save them as JPEG; parity passes the base model's own, the ones our trainers use).
"""

from __future__ import annotations

import itertools
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import CLIPTextModel, CLIPTokenizer

from service.adapters import Adapter, parse_adapter


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
                    seed: int = 0, *, script: "ScriptRun | None" = None) -> "list[float] | Trained":
    """Step times; with `script`, a whole train_dreambooth_lora.py run (`Trained`)."""
    if script is not None:
        return _dreambooth_lora_run(model_dir, images, prompt, rank, steps, learning_rate, batch_size, seed, script)
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
                      learning_rate: float, batch_size: int, seed: int = 0, *,
                      script: "ScriptRun | None" = None) -> "list[float] | Trained":
    """Step times; with `script`, a whole textual_inversion.py run (`Trained`; its prompts are the
    script's templates, so `prompt` is not used)."""
    if script is not None:
        return _textual_inversion_run(model_dir, images, placeholder_token, initializer_word, steps, learning_rate,
                                      batch_size, seed, script)
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
                     learning_rate: float, batch_size: int, seed: int = 0, *,
                     script: "ScriptRun | None" = None) -> "list[float] | Trained":
    """Step times; with `script`, a whole train_custom_diffusion.py run (`Trained`)."""
    if script is not None:
        return _custom_diffusion_run(model_dir, images, modifier_token, initializer_word, prompt, steps, learning_rate,
                                     batch_size, seed, script)
    tokenizer, text_encoder, vae, unet, noise_scheduler, token_id, data, g = _token_setup(
        model_dir, images, modifier_token, initializer_word, batch_size, seed)
    embeddings = text_encoder.get_input_embeddings()
    layers = _custom_diffusion_processors(unet)
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


def _custom_diffusion_processors(unet) -> torch.nn.ModuleList:
    """The script's processor set-up (--freeze_model crossattn_kv): full trainable K/V copies on
    every cross-attention layer, plain processors elsewhere; the trainable layers."""
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
    return torch.nn.ModuleList(p for p in unet.attn_processors.values())


# -- whole runs: each script's training at given settings, its weights as our Adapter -------------

# textual_inversion.py's prompts for --learnable_property object (its `imagenet_templates_small`).
IMAGENET_TEMPLATES_SMALL = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)


@dataclass(frozen=True)
class ScriptRun:
    """The rest of a script's command line for a whole run (steps, learning rate, rank, batch and
    seed are the functions' own arguments). Defaults: as the scripts' READMEs run them."""

    # --with_prior_preservation --prior_loss_weight W (train_dreambooth_lora.py, train_custom_diffusion.py;
    # textual_inversion.py has none); 0: off.
    prior_loss_weight: float = 0.0
    # --class_data_dir's images (the scripts use min(len, --num_class_images) of them) and --class_prompt.
    class_images: tuple = field(default=(), compare=False, repr=False)
    class_prompt: str = ""
    train_text_encoder: bool = False  # train_dreambooth_lora.py --train_text_encoder
    hflip: bool = True  # train_custom_diffusion.py --hflip (every command of its README passes it)
    augment: bool = True  # train_custom_diffusion.py's scale augmentation (off only with --noaug)
    repeats: int = 100  # textual_inversion.py --repeats
    lr_scheduler: str = "constant"  # --lr_scheduler (the scripts' default and their READMEs')
    lr_warmup_steps: int = 0  # the READMEs' --lr_warmup_steps=0

    def describe(self) -> dict:
        """Every setting but the class images themselves (their count instead): for cache keys."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "class_images"}
        return {**out, "num_class_images": len(self.class_images)}


@dataclass
class Trained:
    """A whole run's result: the files the script writes to --output_dir (name -> bytes), the same
    weights as our Adapter, the loss of every step and the training loop's wall seconds."""

    adapter: Adapter
    files: dict[str, bytes]
    losses: list[float]
    seconds: float


class _Streams:
    """The random streams a script draws from, seeded as accelerate's set_seed seeds the global
    ones, but private (a run leaves the process's generators alone): torch (DataLoader shuffling,
    torchvision's random transforms, VAE samples, noise, timesteps), Python's `random` (templates,
    Custom Diffusion's one shuffle of its photos) and NumPy's (Custom Diffusion's augmentation)."""

    def __init__(self, seed: int):
        self.torch = torch.Generator().manual_seed(seed)
        self.py = random.Random(seed)
        self.np = np.random.RandomState(seed)


def _loader(length: int, batch_size: int, g: torch.Generator):
    """DataLoader(dataset, batch_size, shuffle=True) over dataset indices: a new permutation every
    epoch, cut into batches, the last one short when batch_size does not divide the length."""
    while True:
        order = torch.randperm(length, generator=g).tolist()
        for start in range(0, length, batch_size):
            yield order[start:start + batch_size]


def _resize(image: Image.Image, size: int, resample) -> Image.Image:
    """transforms.Resize(size): the shorter side to `size`, the aspect kept (torchvision's rounding)."""
    w, h = image.size
    long = int(size * max(w, h) / min(w, h))
    new = (size, long) if w <= h else (long, size)
    return image if new == image.size else image.resize(new, resample)


def _crop(image: Image.Image, size: int, g: torch.Generator, center: bool) -> Image.Image:
    """transforms.CenterCrop(size) or transforms.RandomCrop(size) (no draw when nothing to crop)."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    if center:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        top = int(torch.randint(0, h - size + 1, (1,), generator=g))
        left = int(torch.randint(0, w - size + 1, (1,), generator=g))
    return image.crop((left, top, left + size, top + size))


def _flip(image: Image.Image, p: float, g: torch.Generator) -> Image.Image:
    """transforms.RandomHorizontalFlip(p) (it draws even when p is 0)."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if float(torch.rand(1, generator=g)) < p else image


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """ToTensor() + Normalize([0.5], [0.5]): [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def _ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def _optimizer(params, learning_rate: float, steps: int, script: ScriptRun):
    """The scripts' AdamW (their argument defaults) and lr scheduler."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    return optimizer, get_scheduler(script.lr_scheduler, optimizer=optimizer, num_warmup_steps=script.lr_warmup_steps,
                                    num_training_steps=steps)


def _noised(unet, vae, noise_scheduler, pixel_values: torch.Tensor, g: torch.Generator):
    """The scripts' shared start of a step: a VAE posterior sample, DDPM noise at a uniform
    timestep; (noisy latents, timesteps, target)."""
    latents = vae.encode(pixel_values).latent_dist.sample(generator=g) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    return noisy, timesteps, target


def _steps(steps: int, length: int, batch_size: int, g: torch.Generator, one_step) -> tuple[list[float], float]:
    """The scripts' epoch loop, stopped at `steps` updates: (every step's loss, wall seconds)."""
    losses, started, batches = [], time.perf_counter(), _loader(length, batch_size, g)
    for _ in range(steps):
        losses.append(float(one_step(next(batches)).detach()))
    return losses, time.perf_counter() - started


def _written(save) -> dict[str, bytes]:
    """What `save(directory)` writes, by file name (a script's --output_dir)."""
    with tempfile.TemporaryDirectory() as directory:
        save(directory)
        return {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir()) if path.is_file()}


def _add_placeholder(tokenizer, text_encoder, token: str, initializer: str, as_vocabulary_entry: bool = False) -> int:
    """Both token scripts: the token added (refused if the tokenizer has it), the table resized, the
    row copied from the initializer, which must be ONE token.

    textual_inversion.py tokenizes the initializer word (`encode(word)`). train_custom_diffusion.py
    calls `encode([word])`: the slow tokenizer it loads (use_fast=False) reads a list of strings as
    tokens already split, so the initializer is the vocabulary ENTRY of that spelling (`as_vocabulary_entry`):
    its default "ktn" is entry 42170 (the word-internal piece; as a word, "ktn" is two tokens)."""
    if tokenizer.add_tokens(token) != 1:
        raise ValueError(f"The tokenizer already contains the token {token}.")
    if as_vocabulary_entry:
        init_ids = [tokenizer.convert_tokens_to_ids(initializer)]
        if init_ids[0] in (None, tokenizer.unk_token_id):
            raise ValueError(f"{initializer!r} is no entry of the tokenizer's vocabulary")
    else:
        init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"The initializer token must be a single token ({initializer!r} is {len(init_ids)}).")
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[token_id] = table[init_ids[0]].clone()
    # encoder, final_layer_norm and position_embedding stay frozen; the token table trains.
    table.requires_grad_(True)
    return token_id


def _dreambooth_lora_run(model_dir, images, prompt, rank, steps, learning_rate, batch_size, seed,
                         script: ScriptRun) -> Trained:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)  # set_seed: peft's gaussian init draws from the global stream
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load(Path(model_dir))
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    if script.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    if script.train_text_encoder:
        params += [p for p in text_encoder.parameters() if p.requires_grad]
    optimizer, lr_scheduler = _optimizer(params, learning_rate, steps, script)
    rng = _Streams(seed)
    size = _resolution(unet, vae)
    prior = script.prior_loss_weight > 0
    class_images = list(script.class_images) if prior else []
    if prior and not class_images:
        raise ValueError("prior preservation needs class images (--class_data_dir)")
    instance_ids, class_ids = _ids(tokenizer, [prompt]), _ids(tokenizer, [script.class_prompt])

    def transform(image):  # Resize(size, lanczos) + RandomCrop(size) (no --center_crop) + ToTensor + Normalize
        return _to_tensor(_crop(_resize(image.convert("RGB"), size, Image.LANCZOS), size, rng.torch, center=False))

    unet.train()
    if script.train_text_encoder:
        text_encoder.train()

    def one_step(batch):
        # DreamBoothDataset items (instance, then its class image), collated instances first.
        items = [(transform(images[i % len(images)]),
                  transform(class_images[i % len(class_images)]) if prior else None) for i in batch]
        pixels = [a for a, _ in items] + ([b for _, b in items] if prior else [])
        input_ids = torch.cat([instance_ids] * len(batch) + ([class_ids] * len(batch) if prior else []))
        noisy, timesteps, target = _noised(unet, vae, noise_scheduler, torch.stack(pixels), rng.torch)
        model_pred = unet(noisy, timesteps, text_encoder(input_ids)[0]).sample
        if prior:
            model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            loss = loss + script.prior_loss_weight * F.mse_loss(model_pred_prior.float(), target_prior.float(),
                                                                 reduction="mean")
        else:
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        return loss

    losses, seconds = _steps(steps, max(len(images), len(class_images)), batch_size, rng.torch, one_step)
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)) \
        if script.train_text_encoder else None
    files = _written(lambda d: StableDiffusionLoraLoaderMixin.save_lora_weights(
        save_directory=d, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers))
    return Trained(parse_adapter(files["pytorch_lora_weights.safetensors"]), files, losses, seconds)


def _textual_inversion_run(model_dir, images, placeholder_token, initializer_word, steps, learning_rate, batch_size,
                           seed, script: ScriptRun) -> Trained:
    torch.manual_seed(seed)
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load(Path(model_dir))
    token_id = _add_placeholder(tokenizer, text_encoder, placeholder_token, initializer_word)
    embeddings = text_encoder.get_input_embeddings()
    optimizer, lr_scheduler = _optimizer(embeddings.parameters(), learning_rate, steps, script)
    rng = _Streams(seed)
    size = _resolution(unet, vae)
    orig_embeds_params = embeddings.weight.data.clone()
    index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
    index_no_updates[token_id] = False

    def item(i):
        """TextualInversionDataset[i]: a random template, the photo resized to a square (bicubic, no
        --center_crop), flipped with p = 0.5."""
        text = rng.py.choice(IMAGENET_TEMPLATES_SMALL).format(placeholder_token)
        image = images[i % len(images)].convert("RGB").resize((size, size), resample=Image.BICUBIC)
        return _to_tensor(_flip(image, 0.5, rng.torch)), text

    text_encoder.train()

    def one_step(batch):
        pixels, texts = zip(*(item(i) for i in batch))
        noisy, timesteps, target = _noised(unet, vae, noise_scheduler, torch.stack(pixels), rng.torch)
        model_pred = unet(noisy, timesteps, text_encoder(_ids(tokenizer, texts))[0]).sample
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        with torch.no_grad():  # only the placeholder's row learns
            embeddings.weight[index_no_updates] = orig_embeds_params[index_no_updates]
        return loss

    losses, seconds = _steps(steps, len(images) * script.repeats, batch_size, rng.torch, one_step)
    learned = embeddings.weight[token_id:token_id + 1].detach().cpu().contiguous()  # save_progress: [1, D]
    files = {"learned_embeds.safetensors": save_safetensors({placeholder_token: learned}, metadata={"format": "pt"})}
    return Trained(parse_adapter(files["learned_embeds.safetensors"], token=placeholder_token), files, losses, seconds)


def _custom_diffusion_preprocess(image: Image.Image, size: int, scale: int, factor: int, rs: np.random.RandomState):
    """CustomDiffusionDataset.preprocess: the photo at `scale` px pasted on a blank canvas (or, when
    larger, cropped), and the latent-resolution mask of the cells wholly inside the photo."""
    outer, inner = (scale, size) if scale > size else (size, scale)
    top, left = rs.randint(0, outer - inner + 1), rs.randint(0, outer - inner + 1)
    pixels = np.array(image.resize((scale, scale), resample=Image.BILINEAR)).astype(np.uint8)
    pixels = (pixels / 127.5 - 1.0).astype(np.float32)
    cells = size // factor
    if scale > size:
        canvas, mask = pixels[top:top + inner, left:left + inner, :], np.ones((cells, cells))
    else:
        canvas, mask = np.zeros((size, size, 3), dtype=np.float32), np.zeros((cells, cells))
        canvas[top:top + inner, left:left + inner, :] = pixels
        mask[top // factor + 1:(top + scale) // factor - 1, left // factor + 1:(left + scale) // factor - 1] = 1.0
    return torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1), torch.from_numpy(mask)


def _custom_diffusion_run(model_dir, images, modifier_token, initializer_word, prompt, steps, learning_rate,
                          batch_size, seed, script: ScriptRun) -> Trained:
    torch.manual_seed(seed)
    tokenizer, text_encoder, vae, unet, noise_scheduler = _load(Path(model_dir))
    token_id = _add_placeholder(tokenizer, text_encoder, modifier_token, initializer_word, as_vocabulary_entry=True)
    embeddings = text_encoder.get_input_embeddings()
    base = {k: v.clone() for k, v in unet.state_dict().items()
            if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    layers = _custom_diffusion_processors(unet)
    # No --scale_lr: the caller's learning rate is the one every step uses.
    optimizer, lr_scheduler = _optimizer(itertools.chain(embeddings.parameters(), layers.parameters()), learning_rate,
                                         steps, script)
    rng = _Streams(seed)
    size = _resolution(unet, vae)
    factor = size // unet.config.sample_size  # the script's mask_size is the latent's side
    cells = size // factor
    prior = script.prior_loss_weight > 0
    class_images = list(script.class_images) if prior else []
    if prior and not class_images:
        raise ValueError("prior preservation needs class images (--class_data_dir)")
    instances = list(images)
    rng.py.shuffle(instances)  # the dataset shuffles its photos once

    def instance_item(index):
        image = _flip(instances[index % len(instances)].convert("RGB"), 0.5 * script.hflip, rng.torch)
        scale = size
        if script.augment:
            scale = rng.np.randint(size // 3, size + 1) if rng.np.uniform() < 0.66 else \
                rng.np.randint(int(1.2 * size), int(1.4 * size))
        pixels, mask = _custom_diffusion_preprocess(image, size, int(scale), factor, rng.np)
        text = prompt
        if scale < 0.6 * size:
            text = rng.np.choice(["a far away ", "very small "]) + text
        elif scale > size:
            text = rng.np.choice(["zoomed in ", "close up "]) + text
        return pixels, mask, text

    def class_item(index):  # flip, Resize(bilinear), RandomCrop, ToTensor, Normalize; the whole image counts
        image = _flip(class_images[index % len(class_images)].convert("RGB"), 0.5 * script.hflip, rng.torch)
        image = _crop(_resize(image, size, Image.BILINEAR), size, rng.torch, center=False)
        return _to_tensor(image), torch.ones(cells, cells), script.class_prompt

    unet.train()
    text_encoder.train()
    keep = torch.arange(len(tokenizer)) != token_id

    def one_step(batch):
        items = [(instance_item(i), class_item(i) if prior else None) for i in batch]
        rows = [a for a, _ in items] + ([b for _, b in items] if prior else [])
        pixels, masks, texts = zip(*rows)
        noisy, timesteps, target = _noised(unet, vae, noise_scheduler, torch.stack(pixels), rng.torch)
        model_pred = unet(noisy, timesteps, text_encoder(_ids(tokenizer, texts))[0]).sample
        mask = torch.stack(masks).float().unsqueeze(1)
        if prior:
            model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            mask = torch.chunk(mask, 2, dim=0)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        loss = ((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
        if prior:
            loss = loss + script.prior_loss_weight * F.mse_loss(model_pred_prior.float(), target_prior.float(),
                                                                 reduction="mean")
        loss.backward()
        grads = embeddings.weight.grad  # only the modifier token's row learns
        grads.data[keep, :] = grads.data[keep, :].fill_(0)
        torch.nn.utils.clip_grad_norm_(itertools.chain(text_encoder.parameters(), layers.parameters()), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=False)
        return loss

    losses, seconds = _steps(steps, max(len(class_images), len(instances)), batch_size, rng.torch, one_step)
    files = _written(lambda d: unet.save_attn_procs(d, safe_serialization=True))
    learned = embeddings.weight[token_id].detach().cpu().clone()  # save_new_embed: [D]
    files[f"{modifier_token}.safetensors"] = save_safetensors({modifier_token: learned}, metadata={"format": "pt"})
    adapter = custom_diffusion_adapter(files["pytorch_custom_diffusion_weights.safetensors"], base,
                                       files[f"{modifier_token}.safetensors"], modifier_token)
    return Trained(adapter, files, losses, seconds)


def custom_diffusion_adapter(weights: bytes, base: dict[str, torch.Tensor], embedding: bytes, token: str) -> Adapter:
    """train_custom_diffusion.py's files as our Adapter. Its K/V file holds whole matrices
    (`<layer>.processor.to_k_custom_diffusion.weight`), not updates, and no reader of
    service/adapters/layouts.py takes it; each one's difference from the base weight (`base`, the
    UNet's `<layer>.to_k.weight`) is factored exactly (SVD, rank min(out, in), alpha = rank: scale
    1) into peft LoRA keys, which `parse_adapter` reads; the token file is diffusers' embedding
    layout ({token: vector})."""
    tensors = {}
    for key, trained in sorted(load_safetensors(weights).items()):
        layer, _, name = key.partition(".processor.")
        proj = {"to_k_custom_diffusion.weight": "to_k", "to_v_custom_diffusion.weight": "to_v"}.get(name)
        if proj is None:
            raise ValueError(f"{key}: not a Custom Diffusion K/V weight (--freeze_model crossattn_kv)")
        delta = trained.double() - base[f"{layer}.{proj}.weight"].double()
        if not delta.any():
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        up, down = (u * s).float(), vh.float()
        error = float((up.double() @ down.double() - delta).norm() / delta.norm())
        if error > 1e-5:
            raise AssertionError(f"{key}: the factors miss the update by {error:.1e} (relative)")
        tensors[f"unet.{layer}.{proj}.lora_A.weight"] = down.contiguous()
        tensors[f"unet.{layer}.{proj}.lora_B.weight"] = up.contiguous()
    lora = parse_adapter(save_safetensors(tensors)) if tensors else Adapter()
    vectors = parse_adapter(embedding, token=token)
    return Adapter(lora=lora.lora, token_embeddings=vectors.token_embeddings,
                   layout=", ".join(filter(None, (lora.layout, vectors.layout))))
