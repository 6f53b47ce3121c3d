"""Prompts to conditioning, each row with its own learned tokens (per-request textual inversion).

The model family (service/engine/families) says which text encoders a model has and how their
outputs become the UNet's `embeds`; this module runs them, for every place that encodes a prompt
(the engine, the trainers, the edit workbench, the adapter bank's text-encoder LoRA rows).

diffusers' ``load_textual_inversion`` adds the token to the shared tokenizer and grows the shared
embedding matrix, which leaks one user's token into everyone's requests and cannot be undone
cheaply. Here the tokenizer and the encoder weights are never changed: each row is tokenized around
its own tokens (a token of n vectors takes n positions, like diffusers' ``<tok> <tok>_1 ...``), and a
forward hook on the token-embedding layer, present only during the call, writes the vectors at
those positions.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .families import ModelFamily

# Id fed to the embedding at learned-token positions before the hook overwrites them. Any in-vocab
# id works; 0 keeps clear of CLIP's end-of-text id, whose position selects the pooled output.
_PLACEHOLDER_ID = 0


def _token_pattern(token: str) -> str:
    pattern = re.escape(token)
    if token[:1].isalnum():
        pattern = r"(?<!\w)" + pattern
    if token[-1:].isalnum():
        pattern += r"(?!\w)"
    return pattern


class PromptEncoder:
    """Encodes a batch of prompts with per-row textual-inversion tokens, thread-safely.

    towers: the model's (tokenizer, text encoder) pairs in its family's order. A learned token's
    vector is [n, sum of the encoders' embedding widths]: tower i reads its own columns (SDXL's
    `clip_l` then `clip_g`), so one tensor per token serves every family.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, family: ModelFamily | None = None,
                 *, more_towers: Sequence[tuple[object, nn.Module]] = (), default_size: int = 512):
        self.towers = [(tokenizer, text_encoder), *more_towers]
        self.family = family if family is not None else ModelFamily()
        self.default_size = default_size
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._embeddings = [encoder.get_input_embeddings() for _, encoder in self.towers]
        self._embedding = self._embeddings[0]
        self.widths = [e.embedding_dim for e in self._embeddings]
        # The hook is registered per call; the lock keeps two calls from sharing it.
        self._lock = threading.Lock()

    @classmethod
    def of_engine(cls, engine) -> "PromptEncoder":
        return cls(engine.tokenizer, engine.text_encoder, engine.family,
                   more_towers=[(engine.tokenizer_2, engine.text_encoder_2)] if engine.text_encoder_2 is not None else (),
                   default_size=engine.limits.default_size)

    @property
    def token_width(self) -> int:
        """Width of a learned token's vector: every tower's embedding width, concatenated."""
        return sum(self.widths)

    def tokenize(
        self, prompts: Sequence[str], tokens: Sequence[Mapping[str, torch.Tensor]] | None = None, tower: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, L], mask [B, L] of learned-token positions, and their vectors [mask.sum(), D]
        for one tower (its tokenizer, its columns of the token vectors).

        Without tokens, ids equal ``tokenizer(prompts, padding="max_length", truncation=True)``.
        """
        tokenizer = self.towers[tower][0]
        tokens = tokens if tokens is not None else [{}] * len(prompts)
        if len(tokens) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(tokens)} token maps")
        max_len = tokenizer.model_max_length
        ids = torch.full((len(prompts), max_len), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_len, dtype=torch.bool)
        vectors: list[torch.Tensor] = []
        for row, (prompt, row_tokens) in enumerate(zip(prompts, tokens)):
            row_ids, injected = self._tokenize_row(prompt, row_tokens, tower)
            # Truncate like the tokenizer does: keep the first max_len - 2 tokens between BOS and EOS.
            body = max_len - 2
            row_ids = [tokenizer.bos_token_id] + row_ids[:body] + [tokenizer.eos_token_id]
            ids[row, : len(row_ids)] = torch.tensor(row_ids)
            for pos, vec in injected:
                if pos < body:
                    mask[row, pos + 1] = True
                    vectors.append(vec)
        dim = self.widths[tower]
        stacked = torch.stack(vectors) if vectors else torch.zeros(0, dim)
        return ids, mask, stacked

    def _tokenize_row(
        self, prompt: str, row_tokens: Mapping[str, torch.Tensor], tower: int = 0,
    ) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
        tokenizer = self.towers[tower][0]
        start = sum(self.widths[:tower])

        def plain(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False).input_ids if text.strip() else []

        if not row_tokens:
            return plain(prompt), []
        # Longest first, so "<cat-v2>" is not matched as "<cat" + "-v2>"; a token that starts or ends
        # with a letter or digit only matches as a whole word ("sks" is not inside "asks").
        pattern = re.compile("|".join(_token_pattern(t) for t in sorted(row_tokens, key=len, reverse=True)))
        ids: list[int] = []
        injected: list[tuple[int, torch.Tensor]] = []
        pos = 0
        for m in pattern.finditer(prompt):
            ids += plain(prompt[pos : m.start()])
            for vec in row_tokens[m.group()].reshape(-1, self.token_width)[:, start : start + self.widths[tower]]:
                injected.append((len(ids), vec))
                ids.append(_PLACEHOLDER_ID)
            pos = m.end()
        ids += plain(prompt[pos:])
        return ids, injected

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], tokens: Sequence[Mapping[str, torch.Tensor]] | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The UNet's conditioning `embeds` [B, L, D], each row with its own learned tokens, for
        images of size (h, w) (SDXL's time_ids; default: the model's own size)."""
        return self.embed(prompts, tokens, size)

    def embed(
        self, prompts: Sequence[str], tokens: Sequence[Mapping[str, torch.Tensor]] | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """`encode` with gradients flowing to the token vectors (training a token: Textual
        Inversion, Custom Diffusion) and to any trainable layer of the encoders."""
        states, pooled = [], None
        with self._lock:
            for tower, (_, encoder) in enumerate(self.towers):
                s, p = self._run_tower(tower, encoder, prompts, tokens)
                states.append(s)
                pooled = p if p is not None else pooled
        size = size if size is not None else (self.default_size, self.default_size)
        return self.family.conditioning(states, pooled, list(prompts), size)

    def _run_tower(self, tower: int, encoder: nn.Module, prompts, tokens):
        ids, mask, vectors = self.tokenize(prompts, tokens, tower)
        embedding = self._embeddings[tower]
        device = embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        vectors = vectors.to(device, embedding.weight.dtype)

        def inject(module, args, output):
            output = output.clone()
            output[mask] = vectors
            return output

        handle = embedding.register_forward_hook(inject) if vectors.shape[0] else None
        try:
            return self.family.encode_tower(encoder, ids)
        finally:
            if handle is not None:
                handle.remove()
