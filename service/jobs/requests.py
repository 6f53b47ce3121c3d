"""A Personalize request, resolved into the fixed parameters a job trains with.

Everything the request leaves to the server (token, seed, the method's defaults) is decided once,
at submission, and written into the stored request: a job resumed after a restart, or under a
later server version with other defaults, trains with exactly the same settings.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.engine.images import decode_image
from service.personalize import Concept, TrainingSpec, concept_prompt, defaults, learns_token
from service.profiles import ModelProfile
from service.personalize.tokens import TokenError, check_token, default_token

DEFAULT_NUM_CLASS_IMAGES = 16  # when a request asks for prior preservation without a count


def method_name(request: pb.PersonalizeRequest) -> str:
    return pb.PersonalizationMethod.Name(request.method)


def resolve(request: pb.PersonalizeRequest, *, taken_tokens: Iterable[str], tokenizer,
            profile: ModelProfile) -> pb.PersonalizeRequest:
    """A copy with token, seed and the served model profile's defaults filled in. Raises TokenError
    for a token that cannot be used (the caller maps it to INVALID_ARGUMENT on `token`)."""
    resolved = pb.PersonalizeRequest()
    resolved.CopyFrom(request)
    method = method_name(request)
    d, new_word = defaults(method, profile), learns_token(method)
    if request.method == pb.FINESTYLE:
        # A style is invoked by its phrase, not by a token: the job and adapter record it as such.
        resolved.style_phrase = request.style_phrase.strip()
        resolved.token, resolved.class_word = resolved.style_phrase, ""
    else:
        taken = list(taken_tokens)
        token = request.token.strip()
        resolved.token = (
            check_token(token, learns_token=new_word, class_word=request.class_word, taken=taken, tokenizer=tokenizer)
            if token else default_token(learns_token=new_word, taken=taken)
        )
        resolved.class_word = request.class_word.strip()
    o = resolved.options
    o.steps = o.steps or d.steps
    o.learning_rate = o.learning_rate or d.learning_rate
    o.rank = o.rank or d.rank
    o.batch_size = o.batch_size or d.batch_size
    # Unset (not 0 / false) takes the profile's: a request can still turn either off explicitly.
    prior_methods = (pb.DREAMBOOTH_LORA, pb.CUSTOM_DIFFUSION)
    if not o.HasField("prior_loss_weight"):
        o.prior_loss_weight = d.prior_loss_weight if request.method in prior_methods else 0.0
        if o.prior_loss_weight and not o.num_class_images:
            o.num_class_images = d.num_class_images
    if o.prior_loss_weight and not o.num_class_images:
        o.num_class_images = DEFAULT_NUM_CLASS_IMAGES
    if not o.HasField("train_text_encoder"):
        o.train_text_encoder = d.train_text_encoder if request.method == pb.DREAMBOOTH_LORA else False
    if not o.HasField("seed"):
        o.seed = random.randrange(0, 2**31)
    return resolved


def training_spec(request: pb.PersonalizeRequest, max_input_pixels: int, checkpoint_every: int) -> TrainingSpec:
    """The TrainingSpec of a resolved, stored request (its images decoded again)."""
    o = request.options
    return TrainingSpec(
        method=method_name(request),
        images=[decode_image(image.data, max_input_pixels) for image in request.images],
        token=request.token,
        class_word=request.class_word,
        steps=o.steps,
        learning_rate=o.learning_rate,
        rank=o.rank,
        batch_size=o.batch_size,
        seed=o.seed,
        prior_loss_weight=o.prior_loss_weight,
        num_class_images=o.num_class_images or DEFAULT_NUM_CLASS_IMAGES,
        train_text_encoder=o.train_text_encoder,
        checkpoint_every=checkpoint_every,
        concepts=[Concept(c.phrase.strip(), (c.box.x0, c.box.y0, c.box.x1, c.box.y1) if c.HasField("box") else None)
                  for c in request.concepts],
        style_phrase=request.style_phrase,
    )


def preview_prompt(request: pb.PersonalizeRequest) -> str:
    """What a finished job's previews show: "a <token> <class_word>" for a subject; for a style,
    the style image's first concept in the style (the reference's content, so the previews can be
    put beside it)."""
    if request.method == pb.FINESTYLE:
        return f"{request.concepts[0].phrase.strip()} {request.style_phrase}".strip()
    return concept_prompt(request.token, request.class_word)


__all__ = ["TokenError", "method_name", "preview_prompt", "resolve", "training_spec"]
