"""The word that invokes a learned subject: which tokens are allowed, and which one to pick.

DreamBooth binds the subject to a *rare existing* token ("sks"): the token's embedding stays frozen,
and a rare one carries little meaning to overwrite. Textual Inversion and Custom Diffusion learn a
*new* embedding, so their token is a placeholder ("<sks>") whose vector the adapter carries; the
prompt encoder swaps it in per request (service/engine/text.py).

A token must not collide with a real word, or prompts that use the word would change meaning:
a token is refused when its letters (angle brackets aside) are an English dictionary word
(Webster's 2nd, from the `english-words` package) or one of CLIP's 10,000 most frequent whole-word
tokens (the BPE vocabulary is ordered by frequency, so this catches "lol", "btw", brand names).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

TOKEN_RE = re.compile(r"^[A-Za-z0-9<>_-]{2,32}$")
# Whole-word CLIP tokens with a lower id than this are common words.
_FREQUENT_TOKEN_IDS = 10_000
# Rare single CLIP tokens that are no dictionary word (checked by tests): DreamBooth's "sks" first.
RARE_WORDS = ("sks", "ohwx", "bnha", "olis", "shld", "pll", "rly", "tok", "tsb", "laq", "lix", "bhk", "kly", "lhp")


class TokenError(ValueError):
    """The token cannot be used; the message says why."""


@functools.lru_cache(maxsize=1)
def _dictionary() -> frozenset[str]:
    from english_words import get_english_words_set

    return frozenset(get_english_words_set(["web2"], lower=True, alpha=True))


def core(token: str) -> str:
    """The letters of a token without placeholder brackets, lower case: "<Sks>" -> "sks"."""
    return token.strip("<>").lower()


def is_real_word(word: str, tokenizer) -> bool:
    word = core(word)
    if word in _dictionary():
        return True
    vocab_id = tokenizer.get_vocab().get(word + "</w>")
    return vocab_id is not None and vocab_id < _FREQUENT_TOKEN_IDS


def check_token(token: str, *, learns_token: bool, class_word: str, taken: Iterable[str], tokenizer) -> str:
    """The token, or TokenError saying why it cannot be used.

    `taken`: the tokens of the tenant's adapters and active jobs (two adapters of one tenant with
    one token could not be told apart in a prompt that mixes them)."""
    if not TOKEN_RE.match(token):
        raise TokenError("must be 2-32 letters, digits, '_', '-', '<' or '>' (one word, no spaces)")
    if not core(token):
        raise TokenError("must have letters or digits inside the brackets")
    if core(token) == core(class_word):
        raise TokenError(f"must differ from the class word {class_word!r}")
    if is_real_word(token, tokenizer):
        raise TokenError(f"{token!r} is a real word; prompts using it would change meaning. Use a rare word such as 'sks'")
    if core(token) in {core(t) for t in taken}:
        raise TokenError(f"{token!r} is already the token of another of your adapters or jobs")
    if not learns_token and len(tokenizer(token, add_special_tokens=False).input_ids) > 3:
        raise TokenError(f"{token!r} splits into many tokens; DreamBooth needs a short rare word such as 'sks'")
    return token


def default_token(*, learns_token: bool, taken: Iterable[str]) -> str:
    """The first rare word not taken; a placeholder "<word>" for methods that learn the token."""
    used = {core(t) for t in taken}
    for word in RARE_WORDS:
        if word not in used:
            return f"<{word}>" if learns_token else word
    for i in range(2, 10_000):
        if f"sks{i}" not in used:
            return f"<sks{i}>" if learns_token else f"sks{i}"
    raise TokenError("no free token left; name one")
