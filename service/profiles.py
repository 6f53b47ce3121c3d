"""Model profiles: the training and editing defaults that belong to a base model, not to the code.

A learning rate or a step count that teaches our 64x64 world model a new shape is wrong for Stable
Diffusion 1.5, and the other way round. So every default a request may leave to the server (a
Personalize job's steps, learning rate, rank, batch, prior preservation; an Edit's guidance and
step size) lives in a profile, and the served model folder picks its profile:

1. `STEERSERVE_MODEL_PROFILE` (a setting) names one explicitly, else
2. the folder's `steerserve_profile.json` ({"profile": "<name>"}) names one (the embedded model's
   does), else
3. the folder says which Stable Diffusion generation it is: an SDXL folder (two text encoders, a
   UNet with `text_time` added conditioning: service/engine/families) or a UNet text width of 2048
   is SDXL; cross_attention_dim 768 is SD 1.x (CLIP ViT-L), 1024 is SD 2.x (OpenCLIP ViT-H);
   anything else gets SD 1.x's profile, with `source` saying it was a guess.

Every value says where it comes from (`sources`): the embedded model's from the recorded dev-split
sweep (bench/results/sweep_personalize.md), Stable Diffusion's from the papers' and diffusers'
training examples (docs/profiles.md lists each one with its reference). GetServerInfo and
`steerserve info` report the profile in use.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_FILE = "steerserve_profile.json"


@dataclass(frozen=True)
class TrainingDefaults:
    """What a Personalize job of one method trains with where the request leaves a field 0."""

    steps: int
    learning_rate: float
    rank: int  # 0: the method has no LoRA
    batch_size: int
    # Prior preservation: > 0 adds this weight x the loss on the base model's own images of the
    # class. The API cannot say "default" for it (0 means off), so a profile that turns it on does
    # so for every request that leaves it 0.
    prior_loss_weight: float = 0.0
    num_class_images: int = 16
    train_text_encoder: bool = False


@dataclass(frozen=True)
class ModelProfile:
    name: str
    description: str
    training: Mapping[str, TrainingDefaults]
    # EditOptions fields (service/edit/spec.py) whose default differs from the dataclass's own for
    # this model; guidance_scale is also the Edit request's default.
    edit: Mapping[str, object] = field(default_factory=dict)
    # Generate's defaults for a request that leaves them unset: its sampler (service/engine/
    # samplers.py) and Karras sigmas. Every profile keeps DDIM, the service's sampler so far.
    sampler: str = "ddim"
    karras_sigmas: bool = False
    # An image prompt's scale when a request leaves it 0 (reference_images, or an IMAGE_PROMPT
    # adapter's weight): IP-Adapter's 1.0 for published files; the embedded model's, chosen on dev.
    image_prompt_scale: float = 1.0
    sources: Mapping[str, str] = field(default_factory=dict)

    def training_defaults(self, method: str) -> TrainingDefaults:
        if method not in self.training:
            raise ValueError(f"profile {self.name!r} has no defaults for method {method!r}")
        return self.training[method]


SWEEP = "bench/results/sweep_personalize.md (dev split)"

WORLD = ModelProfile(
    name="steerserve-world",
    description="the embedded 64x64 world model (service/research/basemodel), defaults from the dev-split sweep",
    training={
        "DREAMBOOTH_LORA": TrainingDefaults(steps=600, learning_rate=1e-3, rank=8, batch_size=2, train_text_encoder=True),
        "TEXTUAL_INVERSION": TrainingDefaults(steps=600, learning_rate=5e-2, rank=0, batch_size=4),
        "CUSTOM_DIFFUSION": TrainingDefaults(steps=600, learning_rate=1.5e-3, rank=8, batch_size=4),
        "FINESTYLE": TrainingDefaults(steps=300, learning_rate=3e-3, rank=8, batch_size=4),
    },
    # EditOptions' own defaults were set on this model (docs/edit/dreamsteerer.md): guidance 4, the
    # scale this model's CFG is sharp at (7.5, SD's, oversaturates it). The guided samples inject the
    # source's self-attention only: injecting its decoder ResNet features (pnp's 80% of the steps,
    # EditOptions' default, kept for SD) repainted their backgrounds on this small UNet, and on the
    # dev split attention-only injection gave DreamBooth-LoRA +17 points of fidelity and Custom
    # Diffusion -2.1 background error (bench/results/quality_edit_dev_guided_feature_fraction-0.md);
    # on all 6 dev concepts the ResNet injection lost DreamBooth-LoRA 12 and Custom Diffusion 17
    # fidelity points against it (..._guided_feature_fraction-0.8.md).
    edit={"guidance_scale": 4.0, "guided_feature_fraction": 0.0},
    # Its own IP-Adapter at 1.4: on the dev split fidelity 3% / 8% / 24% / 26% / 21% at scale 0.7 / 1 /
    # 1.4 / 1.8 / 2, context kept 97% / 93% / 93% / 85% / 83% (bench/results/quality_image_prompt_dev*.md).
    image_prompt_scale=1.4,
    sources={
        "DREAMBOOTH_LORA": SWEEP,
        "TEXTUAL_INVERSION": SWEEP,
        "CUSTOM_DIFFUSION": SWEEP,
        "FINESTYLE": "docs/personalize/finestyle.md (first choice, not swept)",
        "edit": "docs/edit/dreamsteerer.md (dev split: bench.quality_edit --split dev ... --against-defaults)",
        "image_prompt_scale": "bench/results/quality_image_prompt_dev.md (dev split)",
    },
)

# Stable Diffusion 1.x at 512 px: the diffusers training examples' README commands and argument
# defaults, and the DDS notebook (docs/profiles.md gives each reference).
SD1 = ModelProfile(
    name="stable-diffusion-1",
    description="Stable Diffusion 1.x (512 px, CLIP ViT-L text encoder): published example settings",
    training={
        # train_dreambooth_lora.py README: lr 1e-4, 500 steps, batch 1, --rank default 4; its
        # LoRA example runs without prior preservation.
        "DREAMBOOTH_LORA": TrainingDefaults(steps=500, learning_rate=1e-4, rank=4, batch_size=1),
        # textual_inversion.py README: lr 5e-4 x (batch 1 x accumulation 4) with --scale_lr, 3000
        # steps; we have no accumulation, so batch 4 with the scaled lr 2e-3 is the same update.
        "TEXTUAL_INVERSION": TrainingDefaults(steps=3000, learning_rate=2e-3, rank=0, batch_size=4),
        # train_custom_diffusion.py README: 250 steps, batch 2, prior preservation with 200 class
        # images, weight 1.0; its lr (1e-5 x batch 2 with --scale_lr) is for full K/V weights: our
        # K/V are LoRA (rank 4, the LoRA example's), so the LoRA example's lr 1e-4.
        "CUSTOM_DIFFUSION": TrainingDefaults(steps=250, learning_rate=1e-4, rank=4, batch_size=2,
                                             prior_loss_weight=1.0, num_class_images=200),
        # FineStyle published no SD settings: a K/V LoRA with DreamBooth-LoRA's example settings.
        "FINESTYLE": TrainingDefaults(steps=500, learning_rate=1e-4, rank=4, batch_size=1),
    },
    # DDS notebook: 200 iterations, guidance 7.5, t in [50, 950), SGD lr 0.1 on a loss x2000 summed
    # over SD's 64x64 latent: 0.1 x 2000 / 4096 = 0.049 per element, EditOptions' own default.
    edit={"guidance_scale": 7.5},
    sources={
        "DREAMBOOTH_LORA": "diffusers examples/dreambooth/README_lora (train_dreambooth_lora.py)",
        "TEXTUAL_INVERSION": "diffusers examples/textual_inversion/README (textual_inversion.py)",
        "CUSTOM_DIFFUSION": "diffusers examples/custom_diffusion/README (train_custom_diffusion.py); LoRA lr from README_lora",
        "FINESTYLE": "none published for SD; DreamBooth-LoRA's example settings on K/V",
        "edit": "DDS notebook (google/prompt-to-prompt DDS_zeroshot.ipynb)",
    },
)

# Stable Diffusion 2.x (768 px v-prediction or 512 px base): the same example scripts and settings
# (they run unchanged on 2.x checkpoints); the schedule's prediction type is read from the model.
SD2 = ModelProfile(
    name="stable-diffusion-2",
    description="Stable Diffusion 2.x (OpenCLIP ViT-H text encoder): published example settings",
    training=SD1.training,
    edit=SD1.edit,
    sources={**SD1.sources, "note": "the diffusers examples use the same settings for 2.x"},
)

# Stable Diffusion XL at 1024 px: diffusers' SDXL training examples where there is one, each value
# with its reference (docs/profiles.md). Their READMEs run batch 1 with 4 accumulation steps; we
# have no accumulation, so batch 4 (the same update: the loss is a mean over the batch).
SDXL = ModelProfile(
    name="stable-diffusion-xl",
    description="Stable Diffusion XL (1024 px, CLIP ViT-L + OpenCLIP ViT-bigG text encoders): published example settings",
    training={
        # train_dreambooth_lora_sdxl.py README_sdxl: lr 1e-4 (no --scale_lr), batch 1 x accumulation
        # 4, 500 steps, --rank default 4, no prior preservation, text encoders not trained.
        "DREAMBOOTH_LORA": TrainingDefaults(steps=500, learning_rate=1e-4, rank=4, batch_size=4),
        # textual_inversion_sdxl.py README_sdxl: lr 5e-4 --scale_lr x (batch 1 x accumulation 4) =
        # 2e-3, 500 steps.
        "TEXTUAL_INVERSION": TrainingDefaults(steps=500, learning_rate=2e-3, rank=0, batch_size=4),
        # No SDXL recipe is published (train_custom_diffusion.py serves SD 1.x/2.x): SD 1.x's,
        # itself the README's with the LoRA example's lr and rank for our LoRA K/V.
        "CUSTOM_DIFFUSION": SD1.training["CUSTOM_DIFFUSION"],
        # FineStyle published no SD settings: a K/V LoRA with DreamBooth-LoRA's SDXL example settings
        # (as SD 1.x's FineStyle takes SD 1.x DreamBooth-LoRA's).
        "FINESTYLE": TrainingDefaults(steps=500, learning_rate=1e-4, rank=4, batch_size=4),
    },
    # DDS on SDXL: the notebook's method (200 iterations, t in [50, 950), 0.049 per latent element:
    # EditOptions' own) with SDXL's own sampling guidance, 5.0 (StableDiffusionXLPipeline's
    # default), where the notebook used SD 1.x's 7.5 (that pipeline's default).
    edit={"guidance_scale": 5.0},
    sources={
        "DREAMBOOTH_LORA": "diffusers examples/dreambooth/README_sdxl (train_dreambooth_lora_sdxl.py)",
        "TEXTUAL_INVERSION": "diffusers examples/textual_inversion/README_sdxl (textual_inversion_sdxl.py)",
        "CUSTOM_DIFFUSION": "carried over from the SD 1.x profile: no SDXL recipe published for Custom Diffusion",
        "FINESTYLE": "none published for SD: DreamBooth-LoRA's SDXL example settings on K/V",
        "edit": "DDS notebook (google/prompt-to-prompt DDS_zeroshot.ipynb) with SDXL's default guidance 5.0 "
                "(diffusers StableDiffusionXLPipeline)",
    },
)

PROFILES: dict[str, ModelProfile] = {p.name: p for p in (WORLD, SD1, SD2, SDXL)}
EMBEDDED = WORLD


@dataclass(frozen=True)
class ChosenProfile:
    profile: ModelProfile
    source: str  # "setting", "model folder", "detected (SD 1.x text width 768)", "guessed (...)"


@functools.lru_cache(maxsize=16)
def choose(model_dir: str | Path | None, override: str | None = None) -> ChosenProfile:
    """The profile of a model folder (None: the embedded default), or the one a setting names.
    Cached: a folder's files are read once per process."""
    if override:
        if override not in PROFILES:
            raise ValueError(f"model_profile: unknown profile {override!r}; one of {', '.join(PROFILES)}")
        return ChosenProfile(PROFILES[override], "setting")
    if model_dir is None:
        from service.research.basemodel import DEFAULT_MODEL_DIR

        model_dir = DEFAULT_MODEL_DIR
    root = Path(model_dir)
    marker = root / PROFILE_FILE
    if marker.is_file():
        name = json.loads(marker.read_text()).get("profile", "")
        if name not in PROFILES:
            raise ValueError(f"{marker}: unknown profile {name!r}; one of {', '.join(PROFILES)}")
        return ChosenProfile(PROFILES[name], "model folder")
    width = _cross_attention_dim(root)
    if _is_sdxl(root):
        return ChosenProfile(SDXL, "detected (two text encoders, UNet text_time conditioning: SDXL)")
    if width == 2048:
        return ChosenProfile(SDXL, "detected (UNet text width 2048: SDXL)")
    if width == 768:
        return ChosenProfile(SD1, "detected (UNet text width 768: SD 1.x)")
    if width == 1024:
        return ChosenProfile(SD2, "detected (UNet text width 1024: SD 2.x)")
    return ChosenProfile(SD1, f"guessed (UNet text width {width}: not SD 1.x, 2.x or XL; SD 1.x settings)")


def _is_sdxl(root: Path) -> bool:
    """Whether the folder is SDXL by the model families' own test (service/engine/families), which
    the engine serves it by: a tiny or fine-tuned SDXL of another width is SDXL too."""
    index, unet = root / "model_index.json", root / "unet" / "config.json"
    if not (index.is_file() and unet.is_file()):
        return False
    from service.engine.families import SDXL as SDXLFamily

    return SDXLFamily.matches(json.loads(index.read_text()), json.loads(unet.read_text()))


def _cross_attention_dim(root: Path) -> int | None:
    config = root / "unet" / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("cross_attention_dim")
    if isinstance(value, list):  # per-block widths: all the same on SD
        value = value[0]
    return int(value) if value is not None else None
