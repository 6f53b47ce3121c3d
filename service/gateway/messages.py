"""What the service's records and results look like on the wire: one function per API message the
handlers in servicer.py answer with."""

from __future__ import annotations

import numpy as np
from PIL import Image
from google.protobuf.timestamp_pb2 import Timestamp

from service._generated.steerserve.v1 import steerserve_pb2 as pb
from service.engine.images import encode_png
from service.stores import AdapterRecord, JobRecord

PNG = "image/png"


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def image(img: Image.Image) -> pb.Image:
    """A PIL image, sent as PNG."""
    return pb.Image(data=encode_png(img), width=img.width, height=img.height, mime_type=PNG)


def png_image(png: bytes) -> pb.Image:
    """PNG bytes as they are; width and height are the first fields of the IHDR chunk (bytes 16-24)."""
    return pb.Image(data=png, mime_type=PNG, width=int.from_bytes(png[16:20], "big"),
                    height=int.from_bytes(png[20:24], "big"))


def generate_response(result) -> pb.GenerateResponse:
    return pb.GenerateResponse(images=[image(img) for img in result.images], seeds=result.seeds,
                               timings=pb.Timings(**result.timings))


def edit_response(edited, seed: int) -> pb.EditResponse:
    """An edit's image, its mask (a float array in [0, 1], when the method made one) as a grey PNG,
    and its timings under the API's names."""
    mask = None
    if edited.mask is not None:
        mask = image(Image.fromarray((np.asarray(edited.mask) * 255).round().astype(np.uint8), mode="L"))
    t = edited.timings
    return pb.EditResponse(
        image=image(Image.fromarray(edited.image)),
        mask=mask,
        seed=seed,
        timings=pb.Timings(queue_seconds=t.get("queue_seconds", 0.0), denoise_seconds=t.get("dds_seconds", 0.0),
                           decode_seconds=t.get("decode_seconds", 0.0), total_seconds=t.get("total_seconds", 0.0),
                           mask_seconds=t.get("mask_seconds", 0.0), guided_seconds=t.get("guided_seconds", 0.0),
                           steer_seconds=t.get("steer_seconds", 0.0)),
    )


def profile_message(chosen) -> pb.ModelProfile:
    """The served model's profile (service/profiles.ChosenProfile) as the API reports it."""
    p = chosen.profile
    return pb.ModelProfile(
        name=p.name, chosen_by=chosen.source, description=p.description,
        edit_guidance_scale=float(p.edit.get("guidance_scale", 0.0)),
        sampler=p.sampler, karras_sigmas=p.karras_sigmas, image_prompt_scale=p.image_prompt_scale,
        training=[
            pb.MethodDefaults(method=pb.PersonalizationMethod.Value(method), steps=d.steps, learning_rate=d.learning_rate,
                              rank=d.rank, batch_size=d.batch_size, prior_loss_weight=d.prior_loss_weight,
                              num_class_images=d.num_class_images if d.prior_loss_weight else 0,
                              train_text_encoder=d.train_text_encoder, source=p.sources.get(method, ""))
            for method, d in p.training.items()
        ],
    )


def adapter_message(record: AdapterRecord) -> pb.Adapter:
    return pb.Adapter(
        adapter_id=record.adapter_id,
        name=record.name,
        method=pb.PersonalizationMethod.Value(record.method)
        if record.method in pb.PersonalizationMethod.keys()
        else pb.PERSONALIZATION_METHOD_UNSPECIFIED,
        token=record.token,
        class_word=record.class_word,
        rank=record.rank,
        size_bytes=record.size_bytes,
        num_parameters=record.num_parameters,
        sha256=record.sha256,
        created_at=timestamp(record.created_at),
        source=record.source,
    )


def adapter_contents(adapter, module_shapes=None) -> pb.AdapterContents:
    """What an imported file held (service.adapters.Adapter as parsed): its layout, per component
    the layers it changes with their ranks and alphas, and its learned tokens. `module_shapes`: the
    bank's layer shapes ((out, in, kh, kw) for a convolution, whose 1x1 LoRA is stored flat)."""
    shapes = module_shapes or {}
    components = []
    for component in ("unet", "text_encoder", "text_encoder_2"):
        named = [(name, m) for name, m in adapter.lora.items() if name.startswith(component + ".")]
        modules = [m for _, m in named]
        if modules:
            components.append(pb.ComponentContents(
                component=component, modules=len(modules),
                conv_modules=sum(len(shapes.get(n, ())) == 4 or m.down.dim() == 4 for n, m in named),
                ranks=sorted({m.rank for m in modules}), alphas=sorted({float(m.alpha) for m in modules})))
    tokens = [pb.LearnedToken(token=t, vectors=int(v.reshape(-1, v.shape[-1]).shape[0]))
              for t, v in adapter.token_embeddings.items()]
    return pb.AdapterContents(layout=adapter.layout, components=components, tokens=tokens)


def job_message(job: JobRecord, previews: list[bytes] = ()) -> pb.Job:
    return pb.Job(
        job_id=job.job_id,
        state=pb.JobState.Value(job.state.value),
        progress=job.progress,
        adapter_id=job.adapter_id,
        error=job.error,
        method=pb.PersonalizationMethod.Value(job.method),
        name=job.name,
        step=job.step,
        total_steps=job.total_steps,
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        loss=job.loss or 0.0,
        eta_seconds=job.eta_seconds or 0.0,
        token=job.token,
        class_word=job.class_word,
        message=job.message,
        previews=[png_image(png) for png in previews],
    )


def job_event(job: JobRecord, message: pb.Job) -> pb.JobEvent:
    """A WatchJob event for the job's current row; `message`: the job as sent with it."""
    return pb.JobEvent(
        job_id=job.job_id,
        state=pb.JobState.Value(job.state.value),
        step=job.step,
        total_steps=job.total_steps,
        loss=job.loss or 0.0,
        message=job.error or job.message,
        time=timestamp(job.updated_at),
        job=message,
        eta_seconds=job.eta_seconds or 0.0,
    )
