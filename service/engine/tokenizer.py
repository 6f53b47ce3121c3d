"""The CLIP tokenizer, built in memory from the BPE vocabulary shipped with the package.

Stable Diffusion 1.x/2.x/XL checkpoints carry their own tokenizer files and load them directly; this
builder is for models we create ourselves (the embedded default), so they tokenize exactly like
OpenAI CLIP (e.g. "a photo of sks dog" -> 49406 320 1125 539 48136 1929 49407) with no hub access.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

from transformers import CLIPTokenizer

BPE_VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# The first line of the file is a header; OpenAI's tokenizer uses the next 48,894 merges
# (49,152 - 256 - 2), giving 256 bytes + 256 "</w>" bytes + merges + 2 specials = 49,408 ids.
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(BPE_VOCAB_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer identical to OpenAI CLIP's, constructed without files or network."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
