"""Request validation: every field is checked, and an error names the field.

Validators turn protobuf requests into engine specs; they never touch the model, so a bad request
costs nothing and cannot disturb other requests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.config import Settings
from service.edit import EditOptions, EditSpec
from service.engine import samplers
from service.engine.images import ImageDecodeError, decode_image
from service.engine.pipeline import GenerationSpec, ModelLimits
from service.stores import idempotency

from .errors import invalid

MAX_SEED = 2**63 - 1
MAX_NAME_CHARS = 128


@dataclass(frozen=True)
class Limits:
    settings: Settings
    model: ModelLimits

    @property
    def max_size(self) -> int:
        """The largest side a request may ask for: the setting, else twice the model's own size
        (at least 512), so an SDXL model takes its 1024 px and its wide aspect ratios by default."""
        s = self.settings.max_size
        return s if s is not None else max(512, 2 * self.model.default_size)

    @property
    def max_pixels(self) -> int:
        """The most pixels of one image (the cost bound): the setting, else the model's own size
        squared (at least 512 x 512)."""
        s = self.settings.max_pixels
        return s if s is not None else max(512 * 512, self.model.default_size ** 2)


def _check_prompt(field: str, text: str, limits: Limits, count_tokens, required: bool) -> None:
    if required and not text.strip():
        raise invalid(field, "must not be empty")
    if len(text) > 4 * limits.settings.max_prompt_tokens * 8:  # cheap bound before tokenizing
        raise invalid(field, f"is too long ({len(text)} characters)")
    n = count_tokens(text)
    if n > limits.settings.max_prompt_tokens:
        raise invalid(field, f"has {n} tokens; at most {limits.settings.max_prompt_tokens} are allowed")


def _check_size(field: str, value: int, default: int, limits: Limits) -> int:
    s = limits.settings
    if value == 0:
        return default
    if value < s.min_size or value > limits.max_size:
        raise invalid(field, f"must be between {s.min_size} and {limits.max_size} (got {value})")
    # Multiples of 8 like SD pipelines, and of the latent grid the UNet needs (vae factor x 2 for
    # one downsampling level at least).
    multiple = max(8, limits.model.vae_scale_factor * 2)
    if value % multiple:
        raise invalid(field, f"must be a multiple of {multiple} (got {value})")
    return value


def _check_steps(field: str, value: int, limits: Limits) -> int:
    s = limits.settings
    if value == 0:
        return s.default_steps
    if not 1 <= value <= s.max_steps:
        raise invalid(field, f"must be between 1 and {s.max_steps} (got {value})")
    return value


def _check_guidance(field: str, value: float, default: float, limits: Limits) -> float:
    if not math.isfinite(value):
        raise invalid(field, "must be a finite number")
    if value == 0:
        return default
    if not 1.0 <= value <= limits.settings.max_guidance_scale:
        raise invalid(field, f"must be between 1 and {limits.settings.max_guidance_scale} (got {value})")
    return value


def check_seed(field: str, has_seed: bool, value: int) -> int:
    if not has_seed:
        return random.randrange(0, 2**31)
    if not 0 <= value <= MAX_SEED:
        raise invalid(field, f"must be between 0 and {MAX_SEED} (got {value})")
    return value


def check_adapter_refs(refs, limits: Limits) -> list[tuple[str, float]]:
    if len(refs) > limits.settings.max_adapters_per_request:
        raise invalid("adapters", f"at most {limits.settings.max_adapters_per_request} adapters per request (got {len(refs)})")
    out, seen = [], set()
    for i, ref in enumerate(refs):
        field = f"adapters[{i}]"
        if not ref.adapter_id:
            raise invalid(f"{field}.adapter_id", "must not be empty")
        if ref.adapter_id in seen:
            raise invalid(f"{field}.adapter_id", f"{ref.adapter_id!r} is listed twice")
        seen.add(ref.adapter_id)
        weight = ref.weight if ref.weight != 0 else 1.0
        if not math.isfinite(weight) or not -4.0 <= weight <= 4.0:
            raise invalid(f"{field}.weight", f"must be between -4 and 4 (got {ref.weight})")
        out.append((ref.adapter_id, weight))
    return out


def generate_spec(req: pb.GenerateRequest, limits: Limits, count_tokens) -> tuple[GenerationSpec, list[tuple[str, float]]]:
    """Validated GenerationSpec (adapters resolved later, by id) and the requested adapter ids."""
    s = limits.settings
    _check_prompt("prompt", req.prompt, limits, count_tokens, required=True)
    _check_prompt("negative_prompt", req.negative_prompt, limits, count_tokens, required=False)
    width = _check_size("width", req.width, limits.model.default_size, limits)
    height = _check_size("height", req.height, limits.model.default_size, limits)
    if width * height > limits.max_pixels:
        raise invalid("width", f"{width}x{height} exceeds {limits.max_pixels} pixels")
    num_images = req.num_images or 1
    if not 1 <= num_images <= s.max_num_images:
        raise invalid("num_images", f"must be between 1 and {s.max_num_images} (got {req.num_images})")
    if req.style_guidance_scale and not (
        math.isfinite(req.style_guidance_scale) and 0 < req.style_guidance_scale <= s.max_guidance_scale
    ):
        raise invalid("style_guidance_scale", f"must be between 0 and {s.max_guidance_scale}")
    seed = check_seed("seed", req.HasField("seed"), req.seed)
    if seed + num_images - 1 > MAX_SEED:
        raise invalid("seed", "seed + num_images overflows int64")
    steps = _check_steps("steps", req.steps, limits)
    profile = limits.settings.profile().profile
    sampler = req.sampler.strip().lower() or profile.sampler
    karras_sigmas = req.karras_sigmas if req.HasField("karras_sigmas") else (
        profile.karras_sigmas and not req.sampler)  # the profile's Karras goes with the profile's sampler
    problem = samplers.check(sampler, steps, karras_sigmas)
    if problem:
        raise invalid(*problem)
    spec = GenerationSpec(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        steps=steps,
        guidance_scale=_check_guidance("guidance_scale", req.guidance_scale, 7.5, limits),
        width=width,
        height=height,
        seed=seed,
        num_images=num_images,
        style_guidance_scale=req.style_guidance_scale,
        sampler=sampler,
        karras_sigmas=karras_sigmas,
    )
    return spec, check_adapter_refs(req.adapters, limits)


def check_image(field: str, image: pb.Image, limits: Limits):
    try:
        return decode_image(image.data, limits.settings.max_input_image_pixels)
    except ImageDecodeError as exc:
        raise invalid(field, str(exc)) from exc


def check_name(field: str, name: str) -> str:
    name = name.strip()
    if not name:
        raise invalid(field, "must not be empty")
    if len(name) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name):
        raise invalid(field, f"must be at most {MAX_NAME_CHARS} printable characters")
    return name


def check_id(field: str, value: str) -> str:
    if not value:
        raise invalid(field, "must not be empty")
    if len(value) > 64:
        raise invalid(field, "is too long to be an id")
    return value


# Bounds of TrainingOptions: anything outside is a mistake, not a choice.
MAX_TRAINING_STEPS = 5000
MAX_BATCH_SIZE = 16
MAX_CLASS_IMAGES = 200
MAX_PRIOR_LOSS_WEIGHT = 10.0


MAX_CONCEPTS = 8


def personalize_request(req: pb.PersonalizeRequest, limits: Limits, count_tokens=None) -> list:
    """Checks every field of a Personalize request; returns the decoded images."""
    method = pb.PersonalizationMethod.Name(req.method) if req.method in pb.PersonalizationMethod.values() else None
    if req.method == pb.PERSONALIZATION_METHOD_UNSPECIFIED or method is None:
        raise invalid("method", "must be one of DREAMBOOTH_LORA, TEXTUAL_INVERSION, CUSTOM_DIFFUSION, FINESTYLE")
    if req.method == pb.IMAGE_PROMPT:
        raise invalid("method", "IMAGE_PROMPT trains nothing: CreateImagePrompt stores one from the photos at once")
    check_name("name", req.name)
    if req.idempotency_key:
        idempotency.check_key(req.idempotency_key)
    if req.method == pb.FINESTYLE:
        if len(req.images) != 1:
            raise invalid("images", f"FINESTYLE takes exactly 1 style image (got {len(req.images)})")
        if not req.concepts:
            raise invalid("concepts", "FINESTYLE needs the style image's caption as concepts: a phrase for each "
                                      "object in it (e.g. 'a yellow star'), so the adapter learns them apart from the style")
        if len(req.concepts) > MAX_CONCEPTS:
            raise invalid("concepts", f"at most {MAX_CONCEPTS} concepts (got {len(req.concepts)})")
        style_phrase = req.style_phrase.strip()
        if not style_phrase:
            raise invalid("style_phrase", "FINESTYLE needs the words that will invoke the style (e.g. 'in zwx style')")
        if len(style_phrase) > 80 or not all(c.isalnum() or c in " -'" for c in style_phrase):
            raise invalid("style_phrase", "must be a short phrase of letters, digits, spaces, '-' or \"'\"")
        if req.token.strip():
            raise invalid("token", "FINESTYLE has no token: the style_phrase invokes the style; leave token empty")
        if req.class_word.strip():
            raise invalid("class_word", "FINESTYLE learns a style, not a subject of a class: leave class_word empty")
        if req.options.num_class_images:
            raise invalid("options.num_class_images", "FINESTYLE has no prior preservation: leave it 0")
        phrases = [c.phrase.strip() for c in req.concepts]
        for i, phrase in enumerate(phrases):
            if not phrase:
                raise invalid(f"concepts[{i}].phrase", "must not be empty")
            if len(phrase) > 80 or not all(c.isalnum() or c in " -'" for c in phrase):
                raise invalid(f"concepts[{i}].phrase", "must be a short phrase of letters, digits, spaces, '-' or \"'\"")
        if len(set(phrases)) != len(phrases):
            raise invalid("concepts", "two concepts have the same phrase")
        if count_tokens is not None:
            caption = " and ".join(phrases) + " " + style_phrase
            _check_prompt("style_phrase", caption, limits, count_tokens, required=True)
    else:
        if not 3 <= len(req.images) <= 5:
            raise invalid("images", f"{method} takes 3 to 5 subject images (got {len(req.images)})")
        class_word = req.class_word.strip()
        if not class_word:
            raise invalid("class_word", f"{method} needs the subject's class word (e.g. 'dog')")
        if len(class_word) > 64 or not all(c.isalnum() or c in " -'" for c in class_word):
            raise invalid("class_word", "must be a short phrase of letters, digits, spaces, '-' or \"'\"")
    images = []
    # Training sees each image resized to the model's resolution: much smaller ones are noise.
    min_side = max(16, limits.model.default_size // 2)
    for i, image in enumerate(req.images):
        decoded = check_image(f"images[{i}]", image, limits)
        if min(decoded.size) < min_side:
            raise invalid(f"images[{i}]", f"is {decoded.width}x{decoded.height}; this model needs at least "
                                          f"{min_side} pixels on the shorter side")
        images.append(decoded)
    for i, concept in enumerate(req.concepts if req.method == pb.FINESTYLE else ()):
        if concept.HasField("box"):
            b, (w, h) = concept.box, images[0].size
            where = f"({b.x0}, {b.y0}, {b.x1}, {b.y1})"
            if not (0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h):
                raise invalid(f"concepts[{i}].box", f"{where} is not a box inside the {w}x{h} image "
                                                    "(x0 < x1 <= width, y0 < y1 <= height)")
            # Training sees the image's centre square (resized): most of the box must be in it.
            side = min(w, h)
            sx0, sy0 = (w - side) // 2, (h - side) // 2
            inside = max(0, min(b.x1, sx0 + side) - max(b.x0, sx0)) * max(0, min(b.y1, sy0 + side) - max(b.y0, sy0))
            if inside < 0.5 * (b.x1 - b.x0) * (b.y1 - b.y0):
                raise invalid(f"concepts[{i}].box", f"{where} lies mostly outside the image's centre square "
                                                    f"({sx0}, {sy0}, {sx0 + side}, {sy0 + side}), the part training sees")
    o = req.options
    if o.steps and not 1 <= o.steps <= MAX_TRAINING_STEPS:
        raise invalid("options.steps", f"must be between 1 and {MAX_TRAINING_STEPS} (got {o.steps})")
    max_rank = limits.settings.adapter_max_rank
    if o.rank and req.method == pb.TEXTUAL_INVERSION:
        raise invalid("options.rank", "TEXTUAL_INVERSION learns a token embedding, no LoRA: leave rank 0")
    if o.rank and not 1 <= o.rank <= max_rank:
        raise invalid("options.rank", f"must be between 1 and {max_rank}, the adapter bank's largest rank (got {o.rank})")
    if o.learning_rate and not (math.isfinite(o.learning_rate) and 0 < o.learning_rate <= 1):
        raise invalid("options.learning_rate", f"must be in (0, 1] (got {o.learning_rate})")
    if o.HasField("seed") and not 0 <= o.seed <= MAX_SEED:
        raise invalid("options.seed", f"must be between 0 and {MAX_SEED} (got {o.seed})")
    if o.batch_size and not 1 <= o.batch_size <= MAX_BATCH_SIZE:
        raise invalid("options.batch_size", f"must be between 1 and {MAX_BATCH_SIZE} (got {o.batch_size})")
    if not (math.isfinite(o.prior_loss_weight) and 0 <= o.prior_loss_weight <= MAX_PRIOR_LOSS_WEIGHT):
        raise invalid("options.prior_loss_weight", f"must be between 0 and {MAX_PRIOR_LOSS_WEIGHT} (got {o.prior_loss_weight})")
    if o.prior_loss_weight and req.method in (pb.TEXTUAL_INVERSION, pb.FINESTYLE):
        raise invalid("options.prior_loss_weight", f"{method} has no prior preservation: leave it 0")
    if o.num_class_images and not 1 <= o.num_class_images <= MAX_CLASS_IMAGES:
        raise invalid("options.num_class_images", f"must be between 1 and {MAX_CLASS_IMAGES} (got {o.num_class_images})")
    if o.train_text_encoder and req.method != pb.DREAMBOOTH_LORA:
        raise invalid("options.train_text_encoder", "only DREAMBOOTH_LORA trains the text encoder")
    return images


EDIT_METHODS = {pb.DDS: "DDS", pb.DREAMSTEERER: "DREAMSTEERER"}
MAX_GUIDED_SAMPLES = 8
MAX_GUIDED_STEPS = 100
NUM_TRAIN_TIMESTEPS = 1000  # SD 1.x/2.x/XL and our world model


def edit_request(req: pb.EditRequest, limits: Limits, count_tokens) -> EditSpec:
    """Checks every field of an Edit request; returns its EditSpec (adapter resolved later, by id)."""
    s = limits.settings
    image = check_image("source_image", req.source_image, limits)
    for field, value in (("width", image.width), ("height", image.height)):
        multiple = max(8, limits.model.vae_scale_factor * 2)
        if value % multiple:
            raise invalid("source_image", f"{field} must be a multiple of {multiple} (got {image.width}x{image.height})")
        if not s.min_size <= value <= limits.max_size:
            raise invalid("source_image", f"{field} must be between {s.min_size} and {limits.max_size} "
                                          f"(got {image.width}x{image.height})")
    if image.width * image.height > limits.max_pixels:
        raise invalid("source_image", f"{image.width}x{image.height} exceeds {limits.max_pixels} pixels")
    _check_prompt("source_prompt", req.source_prompt, limits, count_tokens, required=True)
    _check_prompt("target_prompt", req.target_prompt, limits, count_tokens, required=True)
    if req.method not in EDIT_METHODS:
        raise invalid("method", "must be DDS or DREAMSTEERER")
    if req.method == pb.DREAMSTEERER:
        check_id("adapter_id", req.adapter_id)
    elif req.adapter_id:
        check_id("adapter_id", req.adapter_id)
    defaults = edit_defaults(limits)
    iterations = req.steps or defaults.iterations
    if not 1 <= iterations <= s.max_edit_iterations:
        raise invalid("steps", f"DDS iterations must be between 1 and {s.max_edit_iterations} (got {req.steps})")
    guidance = _check_guidance("guidance_scale", req.guidance_scale, defaults.guidance_scale, limits)
    seed = check_seed("seed", req.HasField("seed"), req.seed)
    return EditSpec(
        method=EDIT_METHODS[req.method], source=np.asarray(image, dtype=np.uint8), source_prompt=req.source_prompt,
        target_prompt=req.target_prompt, seed=seed,
        options=edit_options(req.options, limits, iterations=iterations, guidance_scale=guidance),
    )


def edit_defaults(limits: Limits) -> EditOptions:
    """EditOptions' defaults for the served model: its profile's values over the dataclass's."""
    return EditOptions(**limits.settings.profile().profile.edit)


def edit_options(o: pb.EditOptions, limits: Limits, **fixed) -> EditOptions:
    """EditOptions from the message: zero/unset fields take the model profile's defaults, the rest
    are range-checked."""
    s, d = limits.settings, edit_defaults(limits)

    def number(field: str, value, default, low, high, low_open=False):
        if value == 0:
            return default
        if not math.isfinite(value) or value > high or value < low or (low_open and value <= low):
            raise invalid(f"options.{field}", f"must be in {'(' if low_open else '['}{low}, {high}] (got {value})")
        return value

    def flag(field: str, default: bool) -> bool:
        return getattr(o, field) if o.HasField(field) else default

    t_min = number("t_min", o.t_min, d.t_min, 0, NUM_TRAIN_TIMESTEPS - 1)
    t_max = number("t_max", o.t_max, d.t_max, 1, NUM_TRAIN_TIMESTEPS)
    if t_min >= t_max:
        raise invalid("options.t_min", f"must be below options.t_max ({t_min} >= {t_max})")
    preliminary = o.preliminary_iterations if o.HasField("preliminary_iterations") else d.preliminary_iterations
    if not 0 <= preliminary <= s.max_edit_iterations:
        raise invalid("options.preliminary_iterations", f"must be between 0 and {s.max_edit_iterations} (got {preliminary})")
    guided = o.guided_samples if o.HasField("guided_samples") else d.guided_samples
    if not 0 <= guided <= MAX_GUIDED_SAMPLES:
        raise invalid("options.guided_samples", f"must be between 0 and {MAX_GUIDED_SAMPLES} (got {guided})")
    return EditOptions(
        learning_rate=number("learning_rate", o.learning_rate, d.learning_rate, 0, 10, low_open=True),
        t_min=int(t_min), t_max=int(t_max),
        edsd=flag("edsd", d.edsd), mode_shifting=flag("mode_shifting", d.mode_shifting),
        bias_correction=flag("bias_correction", d.bias_correction),
        use_subject_mask=flag("use_subject_mask", d.use_subject_mask),
        steer_steps=int(number("steer_steps", o.steer_steps, d.steer_steps, 1, s.max_steer_steps)),
        steer_learning_rate=number("steer_learning_rate", o.steer_learning_rate, d.steer_learning_rate, 0, 1, low_open=True),
        preliminary_iterations=int(preliminary), guided_samples=int(guided),
        guided_steps=int(number("guided_steps", o.guided_steps, d.guided_steps, 1, MAX_GUIDED_STEPS)),
        mode_shifting_weight=number("mode_shifting_weight", o.mode_shifting_weight, d.mode_shifting_weight, 0, 100,
                                    low_open=True),
        mask_threshold=number("mask_threshold", o.mask_threshold, d.mask_threshold, 0, 1, low_open=True),
        **fixed,
    )


# Photos of an image prompt: each side at least this many pixels (a thumbnail says nothing of the subject).
MIN_REFERENCE_SIDE = 16


def reference_images(field: str, images, limits: Limits, max_images: int, required: bool) -> list:
    """The decoded photos of an image prompt (Generate's reference_images, CreateImagePrompt's
    images): 1..max_images of them (0 allowed where not `required`), each decodable, at least
    MIN_REFERENCE_SIDE px a side, and showing something (a one-colour image shows no subject)."""
    if not images and not required:
        return []
    if not 1 <= len(images) <= max_images:
        raise invalid(field, f"an image prompt takes 1 to {max_images} photos (got {len(images)})")
    out = []
    for i, image in enumerate(images):
        photo = check_image(f"{field}[{i}]", image, limits)
        if min(photo.size) < MIN_REFERENCE_SIDE:
            raise invalid(f"{field}[{i}]", f"is {photo.width}x{photo.height} px: each side must be at least "
                                            f"{MIN_REFERENCE_SIDE} px")
        pixels = np.asarray(photo.convert("RGB"), dtype=np.int16)
        if int((pixels.max(axis=(0, 1)) - pixels.min(axis=(0, 1))).max()) < 8:
            raise invalid(f"{field}[{i}]", "shows no subject: the image is one flat colour")
        out.append(photo.convert("RGB"))
    return out


def image_prompt_scale(field: str, value: float, limits: Limits) -> float:
    """0 means the model profile's; else in (0, 2] (IP-Adapter's scale: 1 as trained, below 1 weaker)."""
    scale = value if value != 0 else limits.settings.profile().profile.image_prompt_scale
    if not math.isfinite(scale) or not 0 < scale <= 2.0:
        raise invalid(field, f"must be between 0 and 2 (got {value})")
    return scale
