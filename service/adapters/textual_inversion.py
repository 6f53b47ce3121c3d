"""Per-request textual inversion: prompts where each row has its own learned tokens.

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
    """Encodes a batch of prompts with per-row textual-inversion tokens, thread-safely."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._embedding = text_encoder.get_input_embeddings()
        # The hook is registered per call; the lock keeps two calls from sharing it.
        self._lock = threading.Lock()

    def tokenize(
        self, prompts: Sequence[str], tokens: Sequence[Mapping[str, torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, L], mask [B, L] of learned-token positions, and their vectors [mask.sum(), D].

        Without tokens, ids equal ``tokenizer(prompts, padding="max_length", truncation=True)``.
        """
        tokens = tokens if tokens is not None else [{}] * len(prompts)
        if len(tokens) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(tokens)} token maps")
        max_len = self.tokenizer.model_max_length
        ids = torch.full((len(prompts), max_len), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_len, dtype=torch.bool)
        vectors: list[torch.Tensor] = []
        for row, (prompt, row_tokens) in enumerate(zip(prompts, tokens)):
            row_ids, injected = self._tokenize_row(prompt, row_tokens)
            # Truncate like the tokenizer does: keep the first max_len - 2 tokens between BOS and EOS.
            body = max_len - 2
            row_ids = [self.tokenizer.bos_token_id] + row_ids[:body] + [self.tokenizer.eos_token_id]
            ids[row, : len(row_ids)] = torch.tensor(row_ids)
            for pos, vec in injected:
                if pos < body:
                    mask[row, pos + 1] = True
                    vectors.append(vec)
        dim = self._embedding.embedding_dim
        stacked = torch.stack(vectors) if vectors else torch.zeros(0, dim)
        return ids, mask, stacked

    def _tokenize_row(
        self, prompt: str, row_tokens: Mapping[str, torch.Tensor]
    ) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
        def plain(text: str) -> list[int]:
            return self.tokenizer(text, add_special_tokens=False).input_ids if text.strip() else []

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
            for vec in row_tokens[m.group()].reshape(-1, self._embedding.embedding_dim):
                injected.append((len(ids), vec))
                ids.append(_PLACEHOLDER_ID)
            pos = m.end()
        ids += plain(prompt[pos:])
        return ids, injected

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], tokens: Sequence[Mapping[str, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Last hidden states [B, L, D] of the text encoder, each row with its own learned tokens."""
        return self.embed(prompts, tokens)

    def embed(
        self, prompts: Sequence[str], tokens: Sequence[Mapping[str, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """`encode` with gradients flowing to the token vectors (training a token: Textual
        Inversion, Custom Diffusion) and to any trainable layer of the encoder."""
        ids, mask, vectors = self.tokenize(prompts, tokens)
        device = self._embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        vectors = vectors.to(device, self._embedding.weight.dtype)

        def inject(module, args, output):
            output = output.clone()
            output[mask] = vectors
            return output

        with self._lock:
            handle = self._embedding.register_forward_hook(inject) if vectors.shape[0] else None
            try:
                return self.text_encoder(ids)[0]
            finally:
                if handle is not None:
                    handle.remove()
