"""An image prompt packed into a row's conditioning, and read back by the attention layers.

Every row's cross-attention conditioning, as the attention layers see it, becomes

    [text tokens (L)] [image tokens (N, zero-padded)] [control token: scale, valid image tokens, 0...]

N is fixed per served model (the adapter's tokens per image x the most images a prompt holds), so
rows with and without image prompts share one shape and one batched UNet call, and a compiled UNet
sees one shape. A row without an image prompt has scale 0 and 0 valid tokens.

For SDXL the family's own trailing tokens (pooled embedding, time ids) follow these and are taken
off first by the family's UNet pre-hook, so the layout composes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImagePrompt:
    """One request's image prompt: its tokens [n, D] (every reference photo's, side by side, as
    diffusers concatenates them), the tokens guidance's unconditional prediction gets in their place
    (the model's own: its projection of a zero embedding or of a zero image, per photo), and the
    scale of the image attention."""

    tokens: torch.Tensor
    unconditional_tokens: torch.Tensor
    scale: float = 1.0

    def unconditional(self) -> "ImagePrompt":
        return ImagePrompt(self.unconditional_tokens, self.unconditional_tokens, self.scale)


@dataclass(frozen=True)
class ImagePromptLayout:
    text_tokens: int  # L: the family's text tokens (77)
    max_tokens: int  # N: image tokens a row can carry

    @property
    def extra_tokens(self) -> int:
        return self.max_tokens + 1

    def pack(self, text: torch.Tensor, image: torch.Tensor | None = None, scale: torch.Tensor | float = 0.0,
             count: torch.Tensor | int | None = None) -> torch.Tensor:
        """[B, L + N + 1, D] of text states [B, L, D] and image tokens [B, n <= N, D] (or none)."""
        b, length, d = text.shape
        if length != self.text_tokens:
            raise ValueError(f"text states have {length} tokens, the layout {self.text_tokens}")
        tokens = text.new_zeros(b, self.max_tokens, d)
        valid = torch.zeros(b, dtype=text.dtype, device=text.device)
        if image is not None:
            n = image.shape[1]
            if n > self.max_tokens:
                raise ValueError(f"{n} image tokens, at most {self.max_tokens} fit")
            tokens[:, :n] = image.to(text.dtype)
            valid = torch.as_tensor(n if count is None else count, dtype=text.dtype, device=text.device).expand(b)
        control = text.new_zeros(b, 1, d)
        control[:, 0, 0] = torch.as_tensor(scale, dtype=text.dtype, device=text.device).expand(b) * (valid > 0)
        control[:, 0, 1] = valid
        return torch.cat([text, tokens, control], dim=1)

    def pack_rows(self, states: torch.Tensor, prompts, trailing: int = 0) -> torch.Tensor:
        """Packed conditioning of encoded prompts [B, L + trailing, D] (trailing: the family's own
        tokens, kept last) with prompts[i] (an ImagePrompt or None) on row i."""
        text, tail = (states[:, : states.shape[1] - trailing], states[:, states.shape[1] - trailing :])
        rows = [self.pack(text[i : i + 1], None if p is None else p.tokens[None], 0.0 if p is None else p.scale)
                for i, p in enumerate(prompts)]
        return torch.cat([torch.cat(rows), tail], dim=1)

    def unpack(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(text [B, L, D], image tokens [B, N, D] or None, scale [B], valid count [B]) of packed
        states; states of L tokens alone (a caller that packs nothing: trainers, the edit
        workbench) have no image part."""
        if states.shape[1] == self.text_tokens:
            zeros = states.new_zeros(states.shape[0])
            return states, None, zeros, zeros
        if states.shape[1] != self.text_tokens + self.extra_tokens:
            raise ValueError(f"conditioning of {states.shape[1]} tokens: expected {self.text_tokens} "
                             f"or {self.text_tokens + self.extra_tokens} (text + image prompt)")
        text = states[:, : self.text_tokens]
        image = states[:, self.text_tokens : -1]
        control = states[:, -1]
        return text, image, control[:, 0], control[:, 1]
