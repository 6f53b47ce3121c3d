"""The engine-facing hook: requests name adapters by key; the bank serves every row in one call.

Implements service.engine.pipeline.AdapterHook: ``activate(rows)`` pins each row's adapters in the
manager and routes the UNet's rows to their slots; ``encode_prompts`` encodes each row with its
adapters' textual-inversion tokens and, when the bank covers the text encoder, its LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from prometheus_client import CollectorRegistry

from .bank import DEFAULT_UNET_CONV_TARGETS, SERVED_TEXT_ENCODER_TARGETS, SERVED_UNET_TARGETS, AdapterBank
from .manager import AdapterManager, Loader
from service.engine.text import PromptEncoder


class AdapterUseLike(Protocol):
    key: str
    weight: float


class BankedAdapters:
    """Adapters served through an AdapterBank, for an engine with ``unet``, ``text_encoder``, ``tokenizer``."""

    def __init__(self, bank: AdapterBank, manager: AdapterManager, prompt_encoder: PromptEncoder | None = None):
        self.bank = bank
        self.manager = manager
        self.prompt_encoder = prompt_encoder

    @classmethod
    def attach(
        cls,
        engine,
        loader: Loader,
        *,
        num_slots: int = 16,
        max_rank: int = 16,
        max_rows: int = 64,
        max_adapters_per_row: int = 4,
        host_cache_size: int = 64,
        host_cache_bytes: int | None = None,
        acquire_timeout_s: float = 0.0,
        text_encoder_lora: bool = True,
        conv_target_modules: Sequence[str] = DEFAULT_UNET_CONV_TARGETS,
        registry: CollectorRegistry | None = None,
    ) -> "BankedAdapters":
        """Build a bank on ``engine.unet`` (and text encoder), its manager, and set ``engine.adapters``.

        ``conv_target_modules``: the UNet convolutions served (bank.CONV_LAYERS by the setting
        adapter_conv_layers; default kohya's 1x1 proj_in/proj_out, ``CONV_LAYERS["locon"]`` adds
        LoCon's resnet and sampler convs, ``()`` serves attention only). The gateway's import check
        (loading.adapter_checker) takes the same. Call after the engine has put its models on their
        device and dtype.
        """
        bank = AdapterBank(
            engine.unet,
            num_slots,
            max_rank,
            target_modules=SERVED_UNET_TARGETS,
            conv_target_modules=conv_target_modules,
            text_encoder=engine.text_encoder,
            text_encoder_2=getattr(engine, "text_encoder_2", None),
            text_encoder_target_modules=SERVED_TEXT_ENCODER_TARGETS if text_encoder_lora else (),
            max_rows=max_rows,
            max_adapters_per_row=max_adapters_per_row,
            family_title=getattr(getattr(engine, "family", None), "title", None),
        )
        manager = AdapterManager(
            bank, loader, host_cache_size=host_cache_size, host_cache_bytes=host_cache_bytes,
            acquire_timeout_s=acquire_timeout_s, registry=registry,
        )
        hook = cls(bank, manager, PromptEncoder.of_engine(engine))
        engine.adapters = hook
        return hook

    @staticmethod
    def _keys(rows: Sequence[Sequence[AdapterUseLike]]) -> list[str]:
        return list(dict.fromkeys(use.key for row in rows for use in row))

    @staticmethod
    def _owners(rows: Sequence[Sequence[AdapterUseLike]]) -> dict[str, str]:
        return {use.key: use.tenant for row in rows for use in row if getattr(use, "tenant", "")}

    @property
    def slot_capacity(self) -> int:
        """Distinct adapters one model call can apply (the bank's slots but the base model's)."""
        return self.bank.num_slots - 1

    def prefetch(self, rows: Sequence[Sequence[AdapterUseLike]]) -> None:
        """Start reading the rows' adapters that are not at hand, off the request path (returns at once)."""
        self.manager.prefetch_async(self._keys(rows), self._owners(rows))

    @contextmanager
    def hold(self, rows: Sequence[Sequence[AdapterUseLike]]) -> Iterator[dict[str, int]]:
        """Pin the rows' adapters for a whole request (so per-step ``activate`` calls always hit)."""
        with self.manager.acquire(self._keys(rows), self._owners(rows)) as slots:
            yield slots

    @contextmanager
    def activate(self, rows: Sequence[Sequence[AdapterUseLike]]) -> Iterator[None]:
        """Within the block, model-call row i applies ``rows[i]``'s adapters with their weights."""
        with self.manager.acquire(self._keys(rows), self._owners(rows)) as slots:
            routed = [[(slots[use.key], float(use.weight)) for use in row] for row in rows]
            with self.bank.activate(routed):
                yield

    def encode_prompts(
        self, engine, prompts: Sequence[str], rows: Sequence[Sequence[AdapterUseLike]],
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor | None:
        """Prompt embeddings with each row's textual-inversion tokens and text-encoder LoRA."""
        if self.prompt_encoder is None:
            return None
        with self.manager.acquire(self._keys(rows), self._owners(rows)) as slots:
            tokens = [self._row_tokens(row, slots) for row in rows]
            routed = [[(slots[use.key], float(use.weight)) for use in row] for row in rows]
            with self.bank.activate(routed):
                return self.prompt_encoder.encode(prompts, tokens, size)

    def _row_tokens(self, row: Sequence[AdapterUseLike], slots: Mapping[str, int]) -> dict[str, torch.Tensor]:
        tokens: dict[str, torch.Tensor] = {}
        for use in row:
            tokens.update(self.manager.token_embeddings(slots[use.key]))
        return tokens
