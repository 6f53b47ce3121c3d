"""What the steps (mask.py, guided.py, steering.py) use of the workbench that runs them: a Protocol,
so that they need not import bench.py, which imports them (no import circle)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

import torch

from .applied import Applied

if TYPE_CHECKING:
    from service.adapters import Adapter
    from service.personalize.common import FrozenBase


class Bench(Protocol):
    """service.edit.workbench.bench.Workbench, as the steps see it."""

    base: FrozenBase

    def applied(self, adapter: Adapter, trainable: bool = False) -> AbstractContextManager[Applied]: ...

    def embed(self, prompts: Sequence[str], tokens: dict[str, torch.Tensor],
              size: tuple[int, int] | None = None) -> torch.Tensor: ...

    def size_of(self, latent: torch.Tensor) -> tuple[int, int]: ...

    def epsilon(self, prediction: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor: ...

    def unet(self, latents, t, embeds) -> torch.Tensor: ...
