from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

from service.edit import Edited, EditProgress, EditSpec
from service.errors import Busy, Unavailable
from service.engine.pipeline import GenerationResult, GenerationSpec, ModelLimits
from service.personalize import Progress, TrainingSpec


class ImagePromptSide:
    """A backend's image-prompt side, over `image_prompt_encoder` (service.image_prompt.served.
    ImagePromptEncoder, or None where the model serves none): in-process the engine's, on Triton
    the gateway's own (the tokens then travel to the `generate` model)."""

    image_prompt_encoder = None

    @property
    def image_prompt_model(self) -> str | None:
        """What stored image prompts belong to (the encoder's identity), None: none served."""
        encoder = self.image_prompt_encoder
        return encoder.identity if encoder is not None else None

    @property
    def max_image_prompt_images(self) -> int:
        encoder = self.image_prompt_encoder
        return encoder.max_images if encoder is not None else 0

    async def encode_image_prompt(self, photos: list, scale: float):
        """The photos' ImagePrompt at `scale`, on a thread (milliseconds on the embedded model; the
        event loop keeps serving)."""
        import asyncio

        from service import tracing

        encoder = self.image_prompt_encoder
        if encoder is None:
            raise ValueError(f"model {self.model_name} serves no image prompts")
        with tracing.span("backend.encode_image_prompt"):
            return await asyncio.to_thread(encoder.prompt, photos, scale)


class BackendBusy(Busy):
    """The request queue is full (RESOURCE_EXHAUSTED): the caller should retry later."""


class BackendUnavailable(Unavailable):
    """The model server cannot be reached (UNAVAILABLE)."""


class Backend(Protocol):
    name: str  # "inprocess" or "triton"
    model_name: str
    model_dir: Path  # the diffusers folder served (the gateway validates adapters against it)
    limits: ModelLimits
    tokenizer: object  # the served model's CLIPTokenizer (prompt lengths, personalization tokens)

    # The model server this backend started and stops on close (Triton's embedded one), or None.
    server: object | None
    # How many requests to run at once, measured where the UNet runs (service/engine/width.py),
    # or None (the admission slots setting).
    batch_width: object | None

    def count_tokens(self, text: str) -> int: ...

    # Image prompts (service/image_prompt): what stored ones belong to (None: the model serves none)
    # and how many photos one takes.
    image_prompt_model: str | None
    max_image_prompt_images: int
    edits_take_image_prompts: bool  # whether Edit (DDS) takes one

    async def encode_image_prompt(self, photos: list, scale: float) -> object:
        """The photos' ImagePrompt (tokens and unconditional tokens) at `scale`."""

    def start_supervision(self, on_change: Callable[[bool, str], object] | None = None, **options) -> object | None:
        """Starts watching the model server; `on_change(up, reason)` hears every change (the
        gateway's health follows it). In-process: nothing to watch (None)."""

    async def wait_available(self) -> None:
        """Returns once the model server is up (at once when nothing is watched)."""

    def forget_adapter(self, key: str) -> None:
        """The adapter was deleted from the store: drop it from any cache."""

    def preload_adapter(self, key: str, tenant: str) -> None:
        """A job just stored this adapter: start loading it where requests will use it (returns at once)."""

    async def generate(
        self, spec: GenerationSpec, deadline: float | None, on_step: Callable[[int, int], None] | None = None
    ) -> GenerationResult:
        """Runs a generation; raises GenerationCancelled past `deadline` (time.monotonic())."""

    async def edit(self, spec: EditSpec, deadline: float | None, progress: EditProgress | None = None) -> Edited:
        """Runs an edit (service.edit); raises GenerationCancelled past `deadline`. The steered
        adapter copy of DREAMSTEERER lives only inside this call. `progress` hears the edit
        throttled (service.edit.spec.throttled), so callers pass every report on."""

    async def personalize(self, spec: TrainingSpec, resume: bytes | None, progress: Progress) -> bytes:
        """Trains an adapter (service.personalize) where the model runs; returns its serialized
        file. Raises TrainingStopped when progress.should_stop() turns true, BackendUnavailable
        when the model server cannot be reached."""

    async def unet_runtime(self) -> tuple[str, str]:
        """How the UNet runs where the model does: (runtime, why), e.g. ("onnx", "measured at start:
        ..."); ("", "") when the model server does not say."""

    async def close(self) -> None: ...
