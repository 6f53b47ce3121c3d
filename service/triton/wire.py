"""The gateway <-> Triton contract, in one file: every model's tensors, how each request, response
and error travels as them, and the status codes errors carry.

Both sides use only this module: the gateway's backend (service/backends/triton.py, through
tritonclient) and the python-backend models (model_repo/*/1/model.py and service/triton/bls.py,
through pb_utils). Neither tritonclient nor pb_utils is imported here: a message is a dict of
numpy arrays (`Tensors`), and a received one is read through `get(name) -> array | None`, which
each side builds from its own client. `CONTRACT` names every tensor and its Triton type; a test
checks every model_repo/*/config.pbtxt against it.

Models:
- `generate`: GenerationSpec in, progress responses (optional), then images, seeds, timings and
  per step the UNet batch it ran in; decoupled.
- `edit`: EditSpec (JSON) + source image in, progress responses (optional), then the edited image,
  mask, timings, steering losses; decoupled.
- `personalize`: TrainingSpec (JSON) + PNGs (+ a checkpoint to resume) in; a response per step
  (STEP, LOSS), per checkpoint (STEP, CHECKPOINT), and the adapter file last; decoupled.
- `text_encoder`, `unet`, `vae_decode`: the edit loops' model calls (Encode, Denoise, Decode) as
  BLS calls from `edit`; `unet` batches rows of many edits. (`generate` runs its loops' calls on
  its own engine, no BLS.)

Errors: a model answers a failed request with `status_message(exc)`, "<CODE>: <message>" (Triton's
python backend has no code of its own for NOT_FOUND and the like); the gateway turns it back into
the domain error with `error_from_status`, and the gateway's servicer alone maps domain errors to
gRPC codes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from service.engine import samplers
from service.engine.pipeline import AdapterUse, GenerationCancelled, GenerationResult, GenerationSpec
from service.errors import Busy, InvalidRequest, Unavailable

if TYPE_CHECKING:
    import torch

    from service.edit import Edited, EditSpec
    from service.engine.sampling import Decode, Denoise, Encode, StepResult
    from service.personalize import TrainingSpec

Tensors = dict[str, np.ndarray]
Get = Callable[[str], "np.ndarray | None"]  # a received message's tensor by name, None when absent

GENERATE, EDIT, PERSONALIZE = "generate", "edit", "personalize"
TEXT_ENCODER, UNET, VAE_DECODE = "text_encoder", "unet", "vae_decode"

# Every model's tensors and their Triton types (config.pbtxt's data_type without TYPE_; STRING is
# BYTES on the wire). "?" marks an optional input.
CONTRACT: dict[str, dict[str, dict[str, str]]] = {
    GENERATE: {
        "inputs": {"PROMPT": "STRING", "NEGATIVE_PROMPT": "STRING", "STEPS": "INT32", "GUIDANCE_SCALE": "FP32",
                   "WIDTH": "INT32", "HEIGHT": "INT32", "SEED": "INT64", "NUM_IMAGES": "INT32", "ADAPTERS": "STRING",
                   "STYLE_GUIDANCE_SCALE?": "FP32", "SAMPLER?": "STRING", "KARRAS_SIGMAS?": "BOOL",
                   "TIMEOUT_S?": "FP32", "PROGRESS?": "BOOL", "IMAGE_PROMPT?": "FP32", "IMAGE_PROMPT_SCALE?": "FP32"},
        "outputs": {"STEP": "INT32", "BATCH_SIZE": "INT32", "QUEUE_US": "INT64", "IMAGES": "UINT8", "SEEDS": "INT64",
                    "TIMINGS": "STRING", "STEP_BATCH_SIZES": "INT32", "STEP_QUEUE_US": "INT64", "STEP_COST_S": "FP64"},
    },
    EDIT: {
        "inputs": {"SPEC": "STRING", "SOURCE": "UINT8", "TIMEOUT_S?": "FP32", "PROGRESS?": "BOOL"},
        "outputs": {"PHASE": "STRING", "STEP": "INT32", "TOTAL": "INT32", "IMAGE": "UINT8", "MASK": "FP32",
                    "TIMINGS": "STRING", "STEER_LOSSES": "STRING"},
    },
    PERSONALIZE: {
        "inputs": {"SPEC": "STRING", "IMAGES": "STRING", "RESUME?": "STRING"},
        "outputs": {"STEP": "INT32", "LOSS": "FP32", "CHECKPOINT": "STRING", "ADAPTER": "STRING"},
    },
    TEXT_ENCODER: {"inputs": {"PROMPTS": "STRING", "ADAPTERS": "STRING", "SIZE?": "INT32"}, "outputs": {"EMBEDS": "FP32"}},
    UNET: {
        "inputs": {"LATENTS": "FP32", "TIMESTEP": "FP32", "EMBEDS": "FP32", "ADAPTERS": "STRING"},
        "outputs": {"NOISE": "FP32", "BATCH_SIZE": "INT32", "COMPUTE_US": "INT64"},
    },
    VAE_DECODE: {"inputs": {"LATENTS": "FP32"}, "outputs": {"IMAGES": "UINT8"}},
}


def strings(values) -> np.ndarray:
    """A BYTES tensor of str or bytes values."""
    return np.array([v if isinstance(v, bytes) else v.encode() for v in values], dtype=np.object_)


def _one(get: Get, name: str):
    """The single value of a [1] tensor, None when absent."""
    value = get(name)
    return None if value is None else value.reshape(-1)[0]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- adapters: one JSON string per row -----------------------------------------------------------


def encode_adapters(uses: Sequence[AdapterUse]) -> bytes:
    """[[key, weight], ...], with a third element 1 for a FineStyle style adapter (else 0 when a
    fourth follows) and a fourth, the owning tenant, when known (the bank's fair eviction)."""
    def one(u: AdapterUse) -> list:
        if u.tenant:
            return [u.key, u.weight, int(u.style), u.tenant]
        return [u.key, u.weight, 1] if u.style else [u.key, u.weight]

    return json.dumps([one(u) for u in uses]).encode()


def decode_adapters(raw: bytes | str) -> tuple[AdapterUse, ...]:
    return tuple(AdapterUse(key=str(u[0]), weight=float(u[1]), style=len(u) > 2 and bool(u[2]),
                            tenant=str(u[3]) if len(u) > 3 else "") for u in json.loads(raw or "[]"))


def _deadline_tensors(timeout_s: float | None) -> Tensors:
    return {} if timeout_s is None else {"TIMEOUT_S": np.array([timeout_s], np.float32)}


def _read_deadline(get: Get) -> tuple[float | None, bool]:
    """(seconds to the caller's deadline or None, whether progress responses are wanted)."""
    timeout, progress = _one(get, "TIMEOUT_S"), _one(get, "PROGRESS")
    return (float(timeout) if timeout is not None and timeout > 0 else None), bool(progress)


# -- generate ------------------------------------------------------------------------------------


def generate_request(spec: GenerationSpec, progress: bool, timeout_s: float | None) -> Tensors:
    return {
        "PROMPT": strings([spec.prompt]),
        "NEGATIVE_PROMPT": strings([spec.negative_prompt]),
        "STEPS": np.array([spec.steps], np.int32),
        "GUIDANCE_SCALE": np.array([spec.guidance_scale], np.float32),
        "STYLE_GUIDANCE_SCALE": np.array([spec.style_guidance_scale], np.float32),
        "WIDTH": np.array([spec.width], np.int32),
        "HEIGHT": np.array([spec.height], np.int32),
        "SEED": np.array([spec.seed], np.int64),
        "NUM_IMAGES": np.array([spec.num_images], np.int32),
        "ADAPTERS": strings([encode_adapters(spec.adapters)]),
        "SAMPLER": strings([spec.sampler]),
        "KARRAS_SIGMAS": np.array([spec.karras_sigmas]),
        "PROGRESS": np.array([progress]),
        **_deadline_tensors(timeout_s),
        **_image_prompt_tensors(spec.image_prompt),
    }


def _image_prompt_tensors(prompt) -> Tensors:
    """An image prompt as IMAGE_PROMPT [2, n, D] (its tokens, then guidance's unconditional ones)
    and IMAGE_PROMPT_SCALE [1]; nothing without one."""
    if prompt is None:
        return {}
    import torch

    both = torch.stack([prompt.tokens, prompt.unconditional_tokens]).detach().float().cpu().numpy()
    return {"IMAGE_PROMPT": both, "IMAGE_PROMPT_SCALE": np.array([prompt.scale], np.float32)}


def _read_image_prompt(get: Get):
    tokens = get("IMAGE_PROMPT")
    if tokens is None:
        return None
    import torch

    from service.image_prompt.packing import ImagePrompt

    if tokens.ndim != 3 or tokens.shape[0] != 2:
        raise ValueError(f"IMAGE_PROMPT must be [2, tokens, width] (got {list(tokens.shape)})")
    both = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32))
    return ImagePrompt(both[0], both[1], float(_one(get, "IMAGE_PROMPT_SCALE") or 1.0))


def read_generate_request(get: Get) -> tuple[GenerationSpec, float | None, bool]:
    """(spec, seconds to the deadline or None, progress wanted)."""
    spec = GenerationSpec(
        prompt=_text(_one(get, "PROMPT")),
        negative_prompt=_text(_one(get, "NEGATIVE_PROMPT")),
        steps=int(_one(get, "STEPS")),
        guidance_scale=float(_one(get, "GUIDANCE_SCALE")),
        width=int(_one(get, "WIDTH")),
        height=int(_one(get, "HEIGHT")),
        seed=int(_one(get, "SEED")),
        num_images=int(_one(get, "NUM_IMAGES")),
        adapters=decode_adapters(_one(get, "ADAPTERS")),
        style_guidance_scale=float(_one(get, "STYLE_GUIDANCE_SCALE") or 0.0),
        sampler=_text(_one(get, "SAMPLER") or samplers.DEFAULT_SAMPLER.encode()),
        karras_sigmas=bool(_one(get, "KARRAS_SIGMAS") or False),
        image_prompt=_read_image_prompt(get),
    )
    if spec.steps < 1 or spec.num_images < 1 or spec.width < 1 or spec.height < 1:
        raise ValueError("STEPS, NUM_IMAGES, WIDTH and HEIGHT must be positive")
    problem = samplers.check(spec.sampler, spec.steps, spec.karras_sigmas)
    if problem:
        raise ValueError(": ".join(problem))
    return (spec, *_read_deadline(get))


def generate_progress(step: int, batch_size: int, queue_seconds: float) -> Tensors:
    return {"STEP": np.array([step], np.int32), "BATCH_SIZE": np.array([batch_size], np.int32),
            "QUEUE_US": np.array([int(queue_seconds * 1e6)], np.int64)}


def generate_result(images: np.ndarray, seeds: Sequence[int], timings: dict, steps,
                    step_cost: tuple[float, float] | None = None) -> Tensors:
    """`steps`: the loop's per-step records (batch_size, queue_seconds); `step_cost`: what a step
    of the instance's step batcher costs, (fixed seconds, seconds per row) as its BatchWidth fits it
    (empty while not measured): the gateway's admission runs as many requests at once as that pays."""
    return {
        "IMAGES": images,
        "SEEDS": np.array(seeds, np.int64),
        "TIMINGS": strings([json.dumps(timings)]),
        "STEP_BATCH_SIZES": np.array([s.batch_size for s in steps], np.int32),
        "STEP_QUEUE_US": np.array([int(s.queue_seconds * 1e6) for s in steps], np.int64),
        "STEP_COST_S": np.array(step_cost or (), np.float64),
    }


@dataclass
class GenerateResponse:
    """One response of the generate stream: a progress step, or the result (with per-step batch sizes
    and queue seconds, the figures the gateway exports)."""

    step: int | None = None
    result: GenerationResult | None = None
    step_batch_sizes: list[int] = dataclasses.field(default_factory=list)
    step_queue_seconds: list[float] = dataclasses.field(default_factory=list)
    step_cost: tuple[float, float] | None = None  # (fixed, per row) seconds of the instance's steps


def read_generate_response(get: Get) -> GenerateResponse:
    from PIL import Image

    images = get("IMAGES")
    if images is None:
        return GenerateResponse(step=int(_one(get, "STEP")))
    return GenerateResponse(
        result=GenerationResult(images=[Image.fromarray(a) for a in images], seeds=[int(s) for s in get("SEEDS")],
                                timings=json.loads(_one(get, "TIMINGS"))),
        step_batch_sizes=[int(v) for v in get("STEP_BATCH_SIZES")],
        step_queue_seconds=[int(v) / 1e6 for v in get("STEP_QUEUE_US")],
        step_cost=_pair(get("STEP_COST_S")),
    )


def _pair(values) -> tuple[float, float] | None:
    """Two floats, or None (absent: a model of an earlier version; empty: not measured yet)."""
    return (float(values[0]), float(values[1])) if values is not None and len(values) == 2 else None


# -- edit ----------------------------------------------------------------------------------------


def edit_request(spec: "EditSpec", progress: bool, timeout_s: float | None) -> Tensors:
    """The spec as JSON of every field but the source, the source as uint8 [H, W, 3]."""
    if spec.image_prompt is not None:
        raise ValueError("edits with an image prompt are served in-process only (not through Triton yet)")
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
              if f.name not in ("source", "options", "adapter", "image_prompt")}
    fields["options"] = dataclasses.asdict(spec.options)
    fields["adapter"] = [spec.adapter.key, spec.adapter.weight, spec.adapter.tenant] if spec.adapter is not None else None
    return {"SPEC": strings([json.dumps(fields)]), "SOURCE": np.ascontiguousarray(spec.source, dtype=np.uint8),
            "PROGRESS": np.array([progress]), **_deadline_tensors(timeout_s)}


def read_edit_request(get: Get) -> tuple["EditSpec", float | None, bool]:
    from service.edit import EditOptions, EditSpec

    fields = json.loads(_one(get, "SPEC"))
    fields["options"] = EditOptions(**fields["options"])
    adapter = fields.pop("adapter")
    fields["adapter"] = (AdapterUse(key=str(adapter[0]), weight=float(adapter[1]),
                                    tenant=str(adapter[2]) if len(adapter) > 2 else "") if adapter else None)
    spec = EditSpec(source=np.asarray(get("SOURCE"), dtype=np.uint8), **fields)
    return (spec, *_read_deadline(get))


def edit_progress(phase: str, step: int, total: int) -> Tensors:
    return {"PHASE": strings([phase]), "STEP": np.array([step], np.int32), "TOTAL": np.array([total], np.int32)}


def edit_result(out: "Edited") -> Tensors:
    mask = out.mask.astype(np.float32) if out.mask is not None else np.zeros((0, 0), np.float32)
    return {"IMAGE": np.ascontiguousarray(out.image, dtype=np.uint8), "MASK": mask,
            "TIMINGS": strings([json.dumps(out.timings)]), "STEER_LOSSES": strings([json.dumps(out.steer_losses)])}


@dataclass
class EditResponse:
    progress: tuple[str, int, int] | None = None  # (phase, step, total)
    result: "Edited | None" = None


def read_edit_response(get: Get, seed: int) -> EditResponse:
    from service.edit import Edited

    image = get("IMAGE")
    if image is None:
        return EditResponse(progress=(_text(_one(get, "PHASE")), int(_one(get, "STEP")), int(_one(get, "TOTAL"))))
    mask = get("MASK")
    return EditResponse(result=Edited(image=image, mask=mask if mask is not None and mask.size else None, seed=seed,
                                      timings=json.loads(_one(get, "TIMINGS")),
                                      steer_losses=json.loads(_one(get, "STEER_LOSSES"))))


# -- personalize ---------------------------------------------------------------------------------


def training_request(spec: "TrainingSpec", resume: bytes | None) -> Tensors:
    """The spec as JSON of every field but the images, the images as PNG bytes."""
    from service.engine.images import encode_png

    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "images"}
    fields["concepts"] = [dataclasses.asdict(c) for c in spec.concepts]
    tensors = {"SPEC": strings([json.dumps(fields)]), "IMAGES": strings([encode_png(image) for image in spec.images])}
    if resume is not None:
        tensors["RESUME"] = strings([resume])
    return tensors


def read_training_request(get: Get) -> tuple["TrainingSpec", bytes | None]:
    from service.engine.images import decode_image
    from service.personalize import Concept, TrainingSpec

    fields = json.loads(_one(get, "SPEC"))
    images = [decode_image(bytes(png), max_pixels=2**31) for png in get("IMAGES").reshape(-1)]
    fields["concepts"] = [Concept(c["phrase"], tuple(c["box"]) if c["box"] is not None else None)
                          for c in fields.get("concepts", [])]
    resume = _one(get, "RESUME")
    return TrainingSpec(images=images, **fields), (bytes(resume) if resume is not None else None)


def training_step(step: int, loss: float) -> Tensors:
    return {"STEP": np.array([step], np.int32), "LOSS": np.array([loss], np.float32)}


def training_checkpoint(step: int, state: bytes) -> Tensors:
    return {"STEP": np.array([step], np.int32), "CHECKPOINT": strings([state])}


def training_result(adapter: bytes) -> Tensors:
    return {"ADAPTER": strings([adapter])}


@dataclass
class TrainingResponse:
    step: int | None = None
    loss: float | None = None  # a progress response
    checkpoint: bytes | None = None  # a checkpoint response
    adapter: bytes | None = None  # the last response: the adapter file


def read_training_response(get: Get) -> TrainingResponse:
    adapter = _one(get, "ADAPTER")
    if adapter is not None:
        return TrainingResponse(adapter=bytes(adapter))
    step, checkpoint = int(_one(get, "STEP")), _one(get, "CHECKPOINT")
    if checkpoint is not None:
        return TrainingResponse(step=step, checkpoint=bytes(checkpoint))
    return TrainingResponse(step=step, loss=float(_one(get, "LOSS")))


# -- the loop's model calls (BLS from edit) ------------------------------------------------------


def encode_call(call: "Encode") -> Tensors:
    if call.image_prompts is not None and any(p is not None for p in call.image_prompts):
        # Only the edit loops call the text_encoder part, and edits take no image prompts yet.
        raise ValueError("image prompts do not travel to Triton's text_encoder (edits take none yet)")
    tensors = {"PROMPTS": strings(call.prompts), "ADAPTERS": strings([encode_adapters(r) for r in call.rows])}
    if call.size is not None:  # the image size (h, w) the conditioning is for (SDXL's time_ids)
        tensors["SIZE"] = np.array(call.size, dtype=np.int32)
    return tensors


def read_encode_call(get: Get) -> tuple[list[str], list[tuple[AdapterUse, ...]], tuple[int, int] | None]:
    size = get("SIZE")
    return ([_text(p) for p in get("PROMPTS")], [decode_adapters(a) for a in get("ADAPTERS")],
            None if size is None else (int(size.reshape(-1)[0]), int(size.reshape(-1)[1])))


def embeds_result(embeds: np.ndarray) -> Tensors:
    return {"EMBEDS": embeds}


def read_embeds(get: Get) -> "torch.Tensor":
    import torch

    return torch.from_numpy(get("EMBEDS"))


@dataclass
class StepSample:
    """The part of one UNet call that belongs to one Triton request: m independent predictions
    (CFG's two rows per image, FineStyle's three, an edit's source and target rows)."""

    latents: np.ndarray  # [m, C, h, w]
    timesteps: np.ndarray  # [m]
    embeds: np.ndarray  # [m, L, D]
    adapters: list[tuple[AdapterUse, ...]]  # m rows


def denoise_call(call: "Denoise") -> Tensors:
    return {
        "LATENTS": call.latents.detach().float().cpu().numpy(),
        # float: the sigma-based samplers' timesteps fall between the integers
        "TIMESTEP": call.timesteps.detach().float().cpu().numpy().reshape(-1, 1),
        "EMBEDS": call.embeds.detach().float().cpu().numpy(),
        "ADAPTERS": strings([encode_adapters(r) for r in call.rows]).reshape(-1, 1),
    }


def read_denoise_call(get: Get) -> StepSample:
    return StepSample(latents=get("LATENTS"), timesteps=get("TIMESTEP").reshape(-1), embeds=get("EMBEDS"),
                      adapters=[decode_adapters(a) for a in get("ADAPTERS").reshape(-1)])


def noise_result(noise: np.ndarray, batch_size: int, seconds: float) -> Tensors:
    """Per row: its noise, the rows of the UNet call it ran in, that call's compute time."""
    n = noise.shape[0]
    return {"NOISE": noise, "BATCH_SIZE": np.full((n, 1), batch_size, dtype=np.int32),
            "COMPUTE_US": np.full((n, 1), int(seconds * 1e6), dtype=np.int64)}


def read_noise(get: Get) -> "StepResult":
    import torch

    from service.engine.sampling import StepResult

    return StepResult(torch.from_numpy(get("NOISE")), int(get("BATCH_SIZE")[0, 0]), float(get("COMPUTE_US")[0, 0]) / 1e6)


def decode_call(call: "Decode") -> Tensors:
    return {"LATENTS": call.latents.detach().float().cpu().numpy()}


def read_decode_call(get: Get) -> np.ndarray:
    return get("LATENTS")


def images_result(images: np.ndarray) -> Tensors:
    return {"IMAGES": images}


def read_images(get: Get) -> np.ndarray:
    return get("IMAGES")


# The outputs a BLS caller asks each part for.
CALL_OUTPUTS = {TEXT_ENCODER: ["EMBEDS"], UNET: ["NOISE", "BATCH_SIZE", "COMPUTE_US"], VAE_DECODE: ["IMAGES"]}


# -- errors --------------------------------------------------------------------------------------

STATUS_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "CANCELLED",
                "UNAVAILABLE", "INTERNAL")
# Phrases Triton itself uses when a model (or one it calls through BLS) is not loaded.
NOT_LOADED = ("is not ready", "unknown model", "is not found", "unavailable model")


class RemoteError(RuntimeError):
    """An error a BLS call returned, already in status_message form; passed on unchanged."""


def _code_of(exc: BaseException) -> str:
    from service.adapters import AdapterBankFull, AdapterFormatError, AdapterNotFoundError
    from service.edit import EditRefused
    from service.personalize import TrainingStopped

    table = ((EditRefused, "FAILED_PRECONDITION"), (AdapterNotFoundError, "NOT_FOUND"),
             ((AdapterFormatError, ValueError, LookupError), "INVALID_ARGUMENT"),
             ((AdapterBankFull, Busy), "RESOURCE_EXHAUSTED"), ((GenerationCancelled, TrainingStopped), "CANCELLED"))
    return next((code for types, code in table if isinstance(exc, types)), "INTERNAL")


def status_message(exc: BaseException) -> str:
    """'<CODE>: message', the form every model's errors take."""
    if isinstance(exc, RemoteError):
        return str(exc)
    code = _code_of(exc)
    return f"{code}: {type(exc).__name__}: {exc}" if code == "INTERNAL" else f"{code}: {exc}"


def parse_status(message: str) -> tuple[str, str]:
    """(code, rest) of a status_message; UNAVAILABLE for Triton's own not-loaded answers,
    ('INTERNAL', message) for anything else."""
    if any(phrase in message.lower() for phrase in NOT_LOADED):
        return "UNAVAILABLE", message
    for code in STATUS_CODES:
        marker = f"{code}: "
        at = message.find(marker)
        if at != -1:
            return code, message[at + len(marker):]
    return "INTERNAL", message


def error_from_status(message: str) -> BaseException:
    """The domain error a model's error message stands for (the gateway maps domain errors to gRPC)."""
    return error_for(*parse_status(message), message)


def error_for(code: str, detail: str, message: str) -> BaseException:
    """The domain error of a parsed status (parse_status); `message`, the whole text, for INTERNAL."""
    from service.adapters import AdapterNotFoundError
    from service.edit import EditRefused

    errors = {"INVALID_ARGUMENT": InvalidRequest, "NOT_FOUND": AdapterNotFoundError, "FAILED_PRECONDITION": EditRefused,
              "RESOURCE_EXHAUSTED": Busy, "CANCELLED": GenerationCancelled, "UNAVAILABLE": Unavailable}
    return errors[code](detail) if code in errors else RuntimeError(f"Triton: {message}")
