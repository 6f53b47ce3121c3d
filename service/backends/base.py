from __future__ import annotations

from typing import Callable, Protocol

from service.engine.pipeline import GenerationResult, GenerationSpec, ModelLimits


class BackendBusy(RuntimeError):
    """The request queue is full (RESOURCE_EXHAUSTED): the caller should retry later."""


class BackendUnavailable(RuntimeError):
    """The model server cannot be reached (UNAVAILABLE)."""


class Backend(Protocol):
    name: str  # "inprocess" or "triton"
    model_name: str
    limits: ModelLimits

    def count_tokens(self, text: str) -> int: ...

    async def generate(
        self, spec: GenerationSpec, deadline: float | None, on_step: Callable[[int, int], None] | None = None
    ) -> GenerationResult:
        """Runs a generation; raises GenerationCancelled past `deadline` (time.monotonic())."""

    async def close(self) -> None: ...
