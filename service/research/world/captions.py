"""Reading captions back into attributes: the inverse of `Scene.caption`.

Benchmarks ask the model for a prompt and then check the image against what the prompt said; this
turns "a red dotted star on a blue striped background" into the attributes to check. Words outside
the vocabulary (e.g. a personalization token such as "sks") leave the attribute they stand for
unknown (None), so it is simply not scored.
"""

from __future__ import annotations

import re

from .vocab import ALL_SHAPES, BACKGROUND_WORDS, COLOR_NAMES, TEXTURE_WORDS

_BG_BY_WORD = {w: k for k, w in BACKGROUND_WORDS.items() if w}
_TEX_BY_WORD = {w: k for k, w in TEXTURE_WORDS.items() if w}


def _parse_object(words: list[str]) -> dict:
    obj = {"shape": None, "color": None, "texture": "solid"}
    for w in words:
        if w in COLOR_NAMES:
            obj["color"] = w
        elif w in _TEX_BY_WORD:
            obj["texture"] = _TEX_BY_WORD[w]
        elif w in ALL_SHAPES:
            obj["shape"] = w
    if obj["shape"] is None:  # "a sks object": nothing about its texture is known either
        obj["texture"] = None if obj["texture"] == "solid" else obj["texture"]
    return obj


def parse_caption(text: str) -> dict:
    """Attributes a caption asks for: {"objects": [...], "background": ..., "bg_color": ...}."""
    text = text.lower().strip().rstrip(".")
    head, _, bg = re.sub(r" on an? ", " on a ", text).partition(" on a ")
    bg_words = re.sub(r"\bbackground\b.*", "", bg).split()
    background, bg_color = ("solid" if bg else None), None
    for w in bg_words:
        if w in COLOR_NAMES:
            bg_color = w
        elif w in _BG_BY_WORD:
            background = _BG_BY_WORD[w]
    objects = [_parse_object(part.split()) for part in re.split(r"\band\b", head) if part.strip()]
    return {"objects": objects, "background": background, "bg_color": bg_color}
