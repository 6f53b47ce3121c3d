from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

from service.edit import Edited, EditProgress, EditSpec
from service.engine.pipeline import GenerationResult, GenerationSpec, ModelLimits
from service.personalize import Progress, TrainingSpec


class BackendBusy(RuntimeError):
    """The request queue is full (RESOURCE_EXHAUSTED): the caller should retry later."""


class BackendUnavailable(RuntimeError):
    """The model server cannot be reached (UNAVAILABLE)."""


class Backend(Protocol):
    name: str  # "inprocess" or "triton"
    model_name: str
    model_dir: Path  # the diffusers folder served (the gateway validates adapters against it)
    limits: ModelLimits
    tokenizer: object  # the served model's CLIPTokenizer (prompt lengths, personalization tokens)

    def count_tokens(self, text: str) -> int: ...

    def forget_adapter(self, key: str) -> None:
        """The adapter was deleted from the store: drop it from any cache."""

    async def generate(
        self, spec: GenerationSpec, deadline: float | None, on_step: Callable[[int, int], None] | None = None
    ) -> GenerationResult:
        """Runs a generation; raises GenerationCancelled past `deadline` (time.monotonic())."""

    async def edit(self, spec: EditSpec, deadline: float | None, progress: EditProgress | None = None) -> Edited:
        """Runs an edit (service.edit); raises GenerationCancelled past `deadline`. The steered
        adapter copy of DREAMSTEERER lives only inside this call."""

    async def personalize(self, spec: TrainingSpec, resume: bytes | None, progress: Progress) -> bytes:
        """Trains an adapter (service.personalize) where the model runs; returns its serialized
        file. Raises TrainingStopped when progress.should_stop() turns true, BackendUnavailable
        when the model server cannot be reached."""

    async def close(self) -> None: ...
