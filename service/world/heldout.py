"""Held-out concepts and styles: what personalization has to teach the base model.

Concepts (subject personalization, DreamSteerer/DreamBooth-style): objects the base model never
saw, each with reference images of the object at varying positions and sizes on varied
backgrounds. Two are unseen shapes; one is an unseen combination of seen words (the base model
never saw a purple dotted object).

Styles (FineStyle-style): a background plus a rendering treatment the base model never saw. Each
style has reference images whose objects (`content`) belong to the style image, not to the style:
an output for "a blue circle in <style>" that shows them has leaked content.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .generator import DEFAULT_SIZE, Sample, Scene, WorldObject, place_objects, render, rng_for
from .vocab import BACKGROUNDS, COLOR_NAMES, SHAPES


@dataclass(frozen=True)
class HeldOutConcept:
    name: str
    shape: str
    color: str
    texture: str

    def obj(self, cx: float = 0.5, cy: float = 0.5, r: float = 0.3) -> WorldObject:
        return WorldObject(self.shape, self.color, self.texture, cx, cy, r)

    def references(self, n: int = 5, seed: int = 0, size: int = DEFAULT_SIZE) -> list[Sample]:
        """n reference images: the concept alone on random seen backgrounds, varied position/size."""
        out = []
        for i in range(n):
            rng = rng_for(seed * 7919 + hash_name(self.name), i)
            background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
            bg_color = _other_color(rng, self.color)
            (cx, cy, r), = place_objects(rng, 1)
            out.append(render(Scene(background, bg_color, (self.obj(cx, cy, r),)), size))
        return out


@dataclass(frozen=True)
class HeldOutStyle:
    name: str
    background: str
    bg_color: str
    treatment: str
    # Objects of the style reference image: the content that must not leak into other prompts.
    content: tuple[WorldObject, ...]

    def scene(self, objects: tuple[WorldObject, ...]) -> Scene:
        """Any objects drawn in this style (the ground truth of a stylized prompt)."""
        return Scene(self.background, self.bg_color, objects, self.treatment)

    def reference(self, size: int = DEFAULT_SIZE) -> Sample:
        """The one style image (FineStyle works from as few as one)."""
        return render(self.scene(self.content), size)


def hash_name(name: str) -> int:
    # Python's hash() is salted per process; this one is stable.
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


def _other_color(rng: np.random.Generator, avoid: str) -> str:
    while True:
        c = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        if c != avoid:
            return c


CONCEPTS: dict[str, HeldOutConcept] = {
    c.name: c
    for c in (
        HeldOutConcept("yellow-crescent", shape="crescent", color="yellow", texture="solid"),
        HeldOutConcept("green-striped-hexagon", shape="hexagon", color="green", texture="striped"),
        HeldOutConcept("purple-dotted-heart", shape="heart", color="purple", texture="dotted"),
    )
}

STYLES: dict[str, HeldOutStyle] = {
    s.name: s
    for s in (
        HeldOutStyle(
            "neon-outline",
            background="solid",
            bg_color="black",
            treatment="outline",
            content=(WorldObject("star", "yellow", "solid", 0.34, 0.36, 0.22), WorldObject("circle", "pink", "solid", 0.7, 0.7, 0.17)),
        ),
        HeldOutStyle(
            "pixel-checker",
            background="checker",
            bg_color="green",
            treatment="pixelated",
            content=(WorldObject("heart", "red", "solid", 0.5, 0.5, 0.3),),
        ),
        HeldOutStyle(
            "pastel-gradient",
            background="gradient",
            bg_color="blue",
            treatment="pastel",
            content=(WorldObject("triangle", "orange", "striped", 0.35, 0.62, 0.2), WorldObject("cross", "white", "solid", 0.72, 0.3, 0.15)),
        ),
    )
}

# Shapes a style prompt can ask for without touching the style image's content (for leakage tests).
def shapes_outside(style: HeldOutStyle) -> tuple[str, ...]:
    used = {o.shape for o in style.content}
    return tuple(s for s in SHAPES if s not in used)
