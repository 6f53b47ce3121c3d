"""Building the API's request messages from Python arguments: one place for the sync and async
clients (and the CLI through them)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from ._generated.steerserve.v1 import steerserve_pb2 as pb
from .types import ImageData

ImageInput = "bytes | str | Path | ImageData | PIL.Image.Image"


def image(value) -> pb.Image:
    """Encoded bytes, a file path, an ImageData or a PIL image (sent as PNG)."""
    if isinstance(value, pb.Image):
        return value
    if isinstance(value, ImageData):
        return pb.Image(data=value.data)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return pb.Image(data=bytes(value))
    if isinstance(value, (str, Path)):
        return pb.Image(data=Path(value).read_bytes())
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return pb.Image(data=buf.getvalue(), width=value.size[0], height=value.size[1], mime_type="image/png")
    raise TypeError(f"an image must be bytes, a path, ImageData or a PIL image (got {type(value).__name__})")


def enum_value(enum, value, what: str) -> int:
    """`"dreambooth-lora"`, `"DREAMBOOTH_LORA"` or the enum's number."""
    if isinstance(value, int):
        return value
    name = str(value).upper().replace("-", "_")
    try:
        return enum.Value(name)
    except ValueError:
        names = ", ".join(n.lower().replace("_", "-") for n in enum.keys() if not n.endswith("UNSPECIFIED"))
        raise ValueError(f"{what}: {value!r} is not one of {names}") from None


def adapter_refs(adapters) -> list[pb.AdapterRef]:
    """Ids, (id, weight) pairs, or {id: weight}. A bare id sends weight 0, the server's default
    (1.0 for a LoRA, the model profile's scale for an image prompt)."""
    if adapters is None:
        return []
    if isinstance(adapters, str):
        adapters = [adapters]
    items = adapters.items() if isinstance(adapters, Mapping) else adapters
    refs = []
    for item in items:
        adapter_id, weight = (item, 0.0) if isinstance(item, str) else item
        refs.append(pb.AdapterRef(adapter_id=adapter_id, weight=float(weight)))
    return refs


def key_or_new(key: str | None) -> str:
    """The caller's key, or a fresh one: every Personalize / ImportAdapter carries one, so a retry
    (ours after a lost reply, or the caller's with its own key) never creates a second job/adapter."""
    return key if key else uuid.uuid4().hex


def generate(prompt: str, *, adapters=None, negative_prompt: str = "", steps: int = 0, guidance_scale: float = 0.0,
             width: int = 0, height: int = 0, seed: int | None = None, num_images: int = 1,
             style_guidance_scale: float = 0.0, sampler: str = "",
             karras_sigmas: bool | None = None, reference_images: Iterable = (),
             image_prompt_scale: float = 0.0) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=prompt, negative_prompt=negative_prompt, adapters=adapter_refs(adapters),
                             steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                             num_images=num_images, style_guidance_scale=style_guidance_scale, sampler=sampler,
                             reference_images=[image(i) for i in reference_images],
                             image_prompt_scale=image_prompt_scale)
    if seed is not None:
        req.seed = seed
    if karras_sigmas is not None:
        req.karras_sigmas = karras_sigmas
    return req


def concept(value) -> pb.Concept:
    """A phrase, or (phrase, (x0, y0, x1, y1)) with its box in the style image's pixels."""
    if isinstance(value, pb.Concept):
        return value
    if isinstance(value, str):
        return pb.Concept(phrase=value)
    phrase, box = value
    return pb.Concept(phrase=phrase, box=pb.Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3]))


def personalize(method, name: str, images: Iterable, *, class_word: str = "", token: str = "",
                concepts: Iterable = (), style_phrase: str = "", idempotency_key: str | None = None,
                steps: int = 0, rank: int = 0, learning_rate: float = 0.0, batch_size: int = 0,
                seed: int | None = None, prior_loss_weight: float | None = None,
                train_text_encoder: bool | None = None, num_class_images: int = 0) -> pb.PersonalizeRequest:
    options = pb.TrainingOptions(steps=steps, rank=rank, learning_rate=learning_rate, batch_size=batch_size,
                                 num_class_images=num_class_images)
    if seed is not None:
        options.seed = seed
    if prior_loss_weight is not None:  # unset: the server's model profile decides
        options.prior_loss_weight = prior_loss_weight
    if train_text_encoder is not None:
        options.train_text_encoder = train_text_encoder
    return pb.PersonalizeRequest(
        method=enum_value(pb.PersonalizationMethod, method, "method"), name=name,
        images=[image(i) for i in images], class_word=class_word, token=token,
        concepts=[concept(c) for c in concepts], style_phrase=style_phrase, options=options,
        idempotency_key=key_or_new(idempotency_key))


def edit(source, source_prompt: str, target_prompt: str, *, adapter_id: str = "", method="dreamsteerer",
         steps: int = 0, guidance_scale: float = 0.0, seed: int | None = None,
         options: Mapping | None = None, reference_images: Iterable = (),
         image_prompt_scale: float = 0.0) -> pb.EditRequest:
    """`options`: EditOptions fields by name, e.g. {"steer_steps": 10, "edsd": False};
    `reference_images`: an image prompt on DDS's target branch."""
    req = pb.EditRequest(source_image=image(source), source_prompt=source_prompt, target_prompt=target_prompt,
                         adapter_id=adapter_id, method=enum_value(pb.EditMethod, method, "method"), steps=steps,
                         guidance_scale=guidance_scale, options=pb.EditOptions(**dict(options or {})),
                         reference_images=[image(i) for i in reference_images], image_prompt_scale=image_prompt_scale)
    if seed is not None:
        req.seed = seed
    return req


def import_adapter(name: str, safetensors, *, token: str = "", alpha: float = 0.0,
                   idempotency_key: str | None = None) -> pb.ImportAdapterRequest:
    data = Path(safetensors).read_bytes() if isinstance(safetensors, (str, Path)) else bytes(safetensors)
    return pb.ImportAdapterRequest(name=name, safetensors=data, token=token, alpha=alpha,
                                   idempotency_key=key_or_new(idempotency_key))


def create_image_prompt(name: str, images: Iterable) -> pb.CreateImagePromptRequest:
    return pb.CreateImagePromptRequest(name=name, images=[image(i) for i in images])
