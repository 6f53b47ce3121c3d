"""What the personalization methods share: the frozen base model, training data as latents, the
noise schedule and loss, class images for prior preservation, and the optimisation loop's
bookkeeping (stop checks, progress, checkpoints, exact resume).

Each method's module uses these pieces and reads top to bottom as its own algorithm.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image

from service.adapters import PromptEncoder
from service.engine.pipeline import Engine, GenerationSpec, flush_denormals

from .spec import Progress, TrainingSpec, TrainingStopped, pack_checkpoint, unpack_checkpoint


class FrozenBase:
    """The base model a trainer adapts, never modified outside a job's `lora_layers` block.

    One per training worker: its modules are not shared with serving (a job wraps layers in LoRA
    while it runs). It also keeps the class images it sampled for prior preservation, since many
    jobs of one class ("dog") reuse them, as diffusers' class_data_dir does.
    """

    def __init__(self, engine: Engine, model_dir=None, class_cache_size: int = 8):
        self.engine = engine
        self.schedule = NoiseSchedule.of_model(model_dir, engine.scheduler_config, engine.device)
        self.prompt_encoder = PromptEncoder.of_engine(engine)
        self.lock = threading.Lock()  # one job at a time on these modules
        self._class_cache: OrderedDict[tuple, Posteriors] = OrderedDict()
        self._class_cache_size = class_cache_size

    @classmethod
    def from_pretrained(cls, model_dir, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "FrozenBase":
        return cls(Engine.from_pretrained(model_dir, device=device, dtype=dtype), model_dir)

    @property
    def unet(self):
        return self.engine.unet

    @property
    def text_encoder(self):
        return self.engine.text_encoder

    @property
    def text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        """(adapter-format prefix, encoder) of each text encoder: SDXL's two, one otherwise."""
        second = getattr(self.engine, "text_encoder_2", None)
        return [("text_encoder", self.engine.text_encoder)] + ([("text_encoder_2", second)] if second is not None else [])

    @property
    def size(self) -> int:
        return self.engine.limits.default_size

    def class_images(self, class_word: str, n: int, seed: int) -> "Posteriors":
        """DreamBooth's class prior: n images of "a <class_word>" sampled from the base model itself
        with the ordinary sampling loop (Engine.generate), as VAE posteriors."""
        key = (class_word, n, seed)
        if key not in self._class_cache:
            images = []
            for start in range(0, n, 4):
                spec = GenerationSpec(prompt=f"a {class_word}", steps=25, seed=seed + start, num_images=min(4, n - start),
                                      width=self.size, height=self.size)
                images += self.engine.generate(spec).images
            self._class_cache[key] = Posteriors.of_images(self, images)
            while len(self._class_cache) > self._class_cache_size:
                self._class_cache.popitem(last=False)
        self._class_cache.move_to_end(key)
        return self._class_cache[key]


# -- data ------------------------------------------------------------------------------------------


def centre_crop(image_size: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of an image of (w, h) pixels: its shorter
    side resized to `size`, a centred size x size crop (diffusers' DreamBooth data pipeline with
    --center_crop; the offsets round down, as `to_pixels` crops)."""
    width, height = image_size
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    return w, h, (w - size) // 2, (h - size) // 2


def to_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """[N, 3, size, size] in [-1, 1]: each image RGB, its shorter side resized to `size` (bicubic),
    centre-cropped (diffusers' DreamBooth data pipeline with --center_crop)."""
    out = []
    for image in images:
        image = image.convert("RGB")
        w, h, left, top = centre_crop(image.size, size)
        if (w, h) != image.size:
            image = image.resize((w, h), Image.BICUBIC)
        image = image.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


def crop_time_ids(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """[N, 6] SDXL's size and crop conditioning of each image as `to_pixels` prepares it: original
    (height, width), the crop's (top, left) in the resized image, the target (size, size). What
    diffusers' train_dreambooth_lora_sdxl.py records per image (`original_sizes`,
    `crop_top_lefts`) and its compute_time_ids makes of them."""
    rows = []
    for image in images:
        _, _, left, top = centre_crop(image.size, size)
        rows.append([image.height, image.width, top, left, size, size])
    return torch.tensor(rows, dtype=torch.float32)


def square_time_ids(n: int, height: int, width: int | None = None) -> torch.Tensor:
    """[n, 6] time ids of images drawn at (height, width) and not cropped: (h, w, 0, 0, h, w), what
    generation uses (the class images of prior preservation are such images)."""
    width = height if width is None else width
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(n, 1)


@dataclass
class Posteriors:
    """The VAE posterior of each training image, encoded once. Sampling from it each step is what
    encoding the image each step (as diffusers' scripts do) draws from, without the VAE's cost."""

    mean: torch.Tensor  # [N, C, h, w], already multiplied by the VAE's scaling factor
    std: torch.Tensor
    # [N, 6]: each image's size and crop conditioning (SDXL's time_ids: original h, w, crop top,
    # left, target h, w); read only by families that take it (`with_time_ids`).
    time_ids: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def of_pixels(cls, base: FrozenBase, pixels: torch.Tensor, time_ids: torch.Tensor | None = None) -> "Posteriors":
        """Posteriors of [N, 3, H, W] pixels; `time_ids` [N, 6] where they were cut from larger
        images (default: whole H x W images, uncropped)."""
        flush_denormals()
        vae = base.engine.vae
        means, stds = [], []
        for chunk in pixels.split(8):
            dist = vae.encode(chunk.to(base.engine.device, base.engine.vae_dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        scaling = vae.config.scaling_factor
        if time_ids is None:
            time_ids = square_time_ids(pixels.shape[0], pixels.shape[-2], pixels.shape[-1])
        return cls(torch.cat(means) * scaling, torch.cat(stds) * scaling, time_ids.float().cpu())

    @classmethod
    def of_images(cls, base: FrozenBase, images: Sequence[Image.Image]) -> "Posteriors":
        return cls.of_pixels(base, to_pixels(images, base.size), crop_time_ids(images, base.size))

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean[index].shape, generator=g).to(self.mean.device)
        return self.mean[index] + self.std[index] * noise


def batch_indices(n: int, batch_size: int, g: torch.Generator) -> torch.Tensor:
    """A shuffled pass over the n images, repeated to fill the batch (every image equally often)."""
    reps = -(-batch_size // n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:batch_size]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one training step: a function of (seed, step) alone, so a job resumed
    from a checkpoint draws exactly the batches an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# -- the diffusion objective -----------------------------------------------------------------------


OBJECTIVE_FILE = "training_objective.json"


class NoiseSchedule:
    """The base model's forward process (its own betas), the target its UNet predicts, and the
    per-timestep loss weights it was trained with.

    Fine-tuning keeps the base model's own objective. A model folder may declare it in
    training_objective.json ({"snr_gamma": 5, "low_snr_boost": 20}); without one it is plain MSE,
    which is what Stable Diffusion was trained with. Our world model declares both: with plain MSE
    a new subject's colour was learned but not its shape (the high-noise steps that decide shape
    barely weigh in an epsilon loss; docs/world.md explains it for the base model).
    """

    def __init__(self, scheduler_config, device, snr_gamma: float | None = None, low_snr_boost: float | None = None):
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.num_timesteps = self.scheduler.config.num_train_timesteps
        self.prediction_type = self.scheduler.config.prediction_type
        self.device = device
        self.snr_gamma, self.low_snr_boost = snr_gamma, low_snr_boost

    @classmethod
    def of_model(cls, model_dir, scheduler_config, device) -> "NoiseSchedule":
        path = Path(model_dir) / OBJECTIVE_FILE if model_dir is not None else None
        objective = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        return cls(scheduler_config, device, objective.get("snr_gamma"), objective.get("low_snr_boost"))

    def noise(self, latents: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, target): t uniform over the training steps, epsilon noise; the
        target is the noise, or the velocity for v-prediction models (SD 2.x 768)."""
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=g).to(latents)
        t = torch.randint(0, self.num_timesteps, (n,), generator=g)
        noisy = self.scheduler.add_noise(latents.cpu(), noise.cpu(), t).to(latents)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents.cpu(), noise.cpu(), t).to(latents)
        elif self.prediction_type == "epsilon":
            target = noise
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        return noisy, t.to(self.device), target

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """[B] loss weights of timesteps t. min-SNR-gamma (Hang et al., ICCV 2023; diffusers'
        --snr_gamma) counts the low-noise steps less; the low-SNR boost raises the steps below
        SNR 0.1 as 0.1/SNR, at most `low_snr_boost` times (service/research/basemodel/train.py)."""
        weight = torch.ones(t.shape[0])
        alpha = self.scheduler.alphas_cumprod[t.cpu()]
        snr = alpha / (1 - alpha)
        if self.snr_gamma:
            capped = torch.clamp(snr, max=self.snr_gamma)
            weight = capped / (snr + 1) if self.prediction_type == "v_prediction" else capped / snr
        if self.low_snr_boost:
            weight = weight * torch.clamp(0.1 / snr, min=1.0, max=self.low_snr_boost)
        return weight.to(self.device)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE [B]; with a mask [B, 1, h, w], the mean over the masked cells only (Custom
    Diffusion's loss on the part of a shrunken image that is image, not padding)."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    mask = mask.to(err).expand_as(err)
    return (err * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp(min=1)


def encode_text(base: FrozenBase, prompts: Sequence[str], tokens: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Prompt embeddings with gradients: through learned token vectors (`tokens`) and any LoRA on
    the text encoder(s). The same per-row token injection serves them (service/adapters). For the
    training resolution; `with_time_ids` gives each row its own image's size conditioning."""
    return base.prompt_encoder.embed(list(prompts), [tokens or {}] * len(prompts), (base.size, base.size))


def with_time_ids(base: FrozenBase, embeds: torch.Tensor, time_ids: torch.Tensor | None) -> torch.Tensor:
    """embeds [B, L, D] with row i conditioned on time_ids[i] (SDXL: the training image's original
    size, crop and target size, as diffusers' SDXL training scripts pass `add_time_ids` per image);
    `embeds` as they are for a family without size conditioning (SD 1.x, 2.x)."""
    family = base.engine.family
    if time_ids is None or not hasattr(family, "with_time_ids"):
        return embeds
    return family.with_time_ids(embeds, time_ids.to(embeds.device))


def token_init(base: FrozenBase, word: str) -> torch.Tensor:
    """[1, D] starting vector of a learned token: the mean input embedding of `word`'s tokens
    (Textual Inversion's initializer word; one token in the paper, averaged when it splits), in
    every text encoder's own table: D is their widths together, in the prompt encoder's order
    (SDXL: CLIP ViT-L's 768 columns, then OpenCLIP ViT-bigG's 1280)."""
    parts = []
    for tokenizer, encoder in base.prompt_encoder.towers:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"initializer word {word!r} has no tokens")
        table = encoder.get_input_embeddings().weight
        parts.append(table[torch.tensor(ids, device=table.device)].float().mean(0, keepdim=True).detach())
    return torch.cat(parts, dim=-1).clone()


# -- the optimisation loop's bookkeeping --------------------------------------------------------------


def adamw(params: Sequence[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """diffusers' training scripts' optimizer settings (betas 0.9/0.999, weight decay 1e-2, eps 1e-8).

    Fused: one kernel updates every tensor instead of a dozen small ops per tensor (a LoRA has about
    a hundred tensors; the per-tensor loop cost about a tenth of a CPU step). Same update, same state."""
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=fused)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, max_grad_norm: float = 1.0) -> None:
    """One update: gradients of `loss`, clipped to `max_grad_norm` (global norm, diffusers' default
    1.0), then the optimizer's step. The one shape of a training step: the trainers, DreamSteerer's
    steering and the base model's training all take it."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params), max_grad_norm, foreach=True)
    optimizer.step()


class TrainingRun:
    """Steps of one job: resumes from a checkpoint, stops when told, reports and checkpoints.

        run = TrainingRun(spec, progress, params, optimizer, resume)
        for step in run.steps():
            loss = ...
            run.update(loss)
    """

    def __init__(
        self, spec: TrainingSpec, progress: Progress, params: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer, resume: bytes | None = None, max_grad_norm: float = 1.0,
    ):
        self.spec, self.progress, self.params, self.optimizer = spec, progress, params, optimizer
        self.max_grad_norm = max_grad_norm
        self.step = 0
        self.losses: list[float] = []
        if resume is not None:
            state = unpack_checkpoint(resume)
            missing = set(params) ^ set(state["params"])
            if missing:
                raise ValueError(f"checkpoint does not match this job's parameters: {sorted(missing)[:3]}")
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(state["params"][name])
            optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])

    def steps(self) -> Iterator[int]:
        """Each step's number; the caller's loop body is the step. A Progress with `step_turn()` (a
        job trained beside serving: service/engine/priority.py) holds each step until its turn."""
        flush_denormals()
        turn = getattr(self.progress, "step_turn", None)
        while self.step < self.spec.steps:
            if self.progress.should_stop():
                raise TrainingStopped(f"stopped before step {self.step + 1} of {self.spec.steps}")
            if turn is None:
                yield self.step
                continue
            # Held while the caller's loop body (the step) runs. If the body raises, the turn ends
            # when this generator is closed: at once for `for step in run.steps()` (the trainers'
            # only form); code keeping the iterator must close it (contextlib.closing).
            with turn():
                if self.progress.should_stop():
                    raise TrainingStopped(f"stopped before step {self.step + 1} of {self.spec.steps}")
                yield self.step

    def update(self, loss: torch.Tensor) -> None:
        optimizer_step(self.optimizer, loss, self.params.values(), self.max_grad_norm)
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        self.progress.step(self.step, self.spec.steps, value)
        every = self.spec.checkpoint_every
        if every and self.step % every == 0 and self.step < self.spec.steps:
            self.progress.checkpoint(self.step, pack_checkpoint(self.step, self.params, self.optimizer))
