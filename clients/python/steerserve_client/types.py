"""What calls return: plain dataclasses built from the API's messages (enums as their names,
timestamps as datetimes, images as bytes with a PIL view)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ._generated.steerserve.v1 import steerserve_pb2 as pb


@dataclass(frozen=True)
class ImageData:
    """An encoded image (PNG from the server)."""
    data: bytes
    width: int = 0
    height: int = 0
    mime_type: str = "image/png"

    @classmethod
    def from_pb(cls, image: pb.Image) -> "ImageData":
        return cls(bytes(image.data), image.width, image.height, image.mime_type or "image/png")

    def to_pil(self):
        """A PIL image (needs pillow: `pip install steerserve-client[images]`)."""
        from PIL import Image

        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class Timings:
    """Seconds the server spent in each stage (see the API's Timings)."""
    queue_seconds: float = 0.0
    text_encode_seconds: float = 0.0
    denoise_seconds: float = 0.0
    decode_seconds: float = 0.0
    total_seconds: float = 0.0
    adapter_load_seconds: float = 0.0
    mask_seconds: float = 0.0
    guided_seconds: float = 0.0
    steer_seconds: float = 0.0

    @classmethod
    def from_pb(cls, t: pb.Timings) -> "Timings":
        return cls(**{name: getattr(t, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class GenerateResult:
    images: list[ImageData]
    seeds: list[int]
    timings: Timings

    @classmethod
    def from_pb(cls, r: pb.GenerateResponse) -> "GenerateResult":
        return cls([ImageData.from_pb(i) for i in r.images], list(r.seeds), Timings.from_pb(r.timings))


@dataclass(frozen=True)
class EditResult:
    image: ImageData
    mask: ImageData | None  # DreamSteerer's subject mask (white = edited), else None
    seed: int
    timings: Timings

    @classmethod
    def from_pb(cls, r: pb.EditResponse) -> "EditResult":
        mask = ImageData.from_pb(r.mask) if r.mask.data else None
        return cls(ImageData.from_pb(r.image), mask, r.seed, Timings.from_pb(r.timings))


@dataclass(frozen=True)
class EditProgress:
    phase: str          # "queued", "mask", "guided", "preliminary", "steer", "dds", "done"
    step: int
    total_steps: int
    progress: float     # 0..1 over the whole edit


def _name(enum, value: int) -> str:
    """An enum value's name; a value this client does not know yet (v1 may add values) as its number."""
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


def _time(ts) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)


@dataclass(frozen=True)
class Job:
    job_id: str
    state: str          # QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED
    method: str
    name: str
    progress: float
    step: int
    total_steps: int
    loss: float
    eta_seconds: float
    adapter_id: str     # set when SUCCEEDED
    error: str          # set when FAILED
    message: str
    token: str
    class_word: str
    created_at: datetime
    updated_at: datetime
    previews: list[ImageData] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")

    @classmethod
    def from_pb(cls, j: pb.Job) -> "Job":
        return cls(j.job_id, _name(pb.JobState, j.state), _name(pb.PersonalizationMethod, j.method), j.name, j.progress,
                   j.step, j.total_steps, j.loss, j.eta_seconds, j.adapter_id, j.error, j.message, j.token,
                   j.class_word, _time(j.created_at), _time(j.updated_at), [ImageData.from_pb(i) for i in j.previews])


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    state: str
    step: int
    total_steps: int
    loss: float
    eta_seconds: float
    message: str
    job: Job

    @classmethod
    def from_pb(cls, e: pb.JobEvent) -> "JobEvent":
        return cls(e.job_id, _name(pb.JobState, e.state), e.step, e.total_steps, e.loss, e.eta_seconds, e.message,
                   Job.from_pb(e.job))


@dataclass(frozen=True)
class ComponentContents:
    component: str      # "unet", "text_encoder", "text_encoder_2"
    modules: int        # layers changed
    conv_modules: int   # of which convolutions
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]


@dataclass(frozen=True)
class AdapterContents:
    """What an imported file held, as the server read it (ImportAdapter's answer only)."""

    layout: str
    components: tuple[ComponentContents, ...]
    tokens: dict[str, int]  # learned token -> the prompt positions it takes

    @classmethod
    def from_pb(cls, c: pb.AdapterContents) -> "AdapterContents":
        return cls(c.layout, tuple(ComponentContents(x.component, x.modules, x.conv_modules, tuple(x.ranks),
                                                     tuple(x.alphas)) for x in c.components),
                   {t.token: t.vectors for t in c.tokens})


@dataclass(frozen=True)
class Adapter:
    adapter_id: str
    name: str
    method: str
    token: str
    class_word: str
    rank: int
    size_bytes: int
    num_parameters: int
    sha256: str
    created_at: datetime
    source: str         # "personalize" or "import"
    contents: AdapterContents | None = None  # set by import only

    @classmethod
    def from_pb(cls, a: pb.Adapter) -> "Adapter":
        return cls(a.adapter_id, a.name, _name(pb.PersonalizationMethod, a.method), a.token, a.class_word, a.rank,
                   a.size_bytes, a.num_parameters, a.sha256, _time(a.created_at), a.source,
                   AdapterContents.from_pb(a.contents) if a.HasField("contents") else None)
