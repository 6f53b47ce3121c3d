"""Held-out concepts and styles: what personalization has to teach the base model.

Concepts (subject personalization, DreamSteerer/DreamBooth-style): objects each with reference
images of the object at varying positions and sizes on varied backgrounds. Three kinds:
  - unseen shape: a shape the base model never drew (crescent, hexagon; HELDOUT_SHAPES);
  - unseen combination: a colour/texture pair the base model never saw on any object (purple
    dotted; HELDOUT_COMBOS), on a seen shape;
  - seen words: shape, colour and texture the base model draws, in a combination a user names with
    a token instead of words (the easy case: the adapter has to bind the token, nothing more).

Styles (FineStyle-style): a background plus a rendering treatment the base model never saw. Each
style has a reference image whose objects (`content`) belong to the style image, not to the style:
an output for "a blue circle in <style>" that shows them has leaked content.

Both are split once, for good: `dev` is what defaults are tuned on, `test` is what tables report.
A default chosen by looking at a test concept is a result on seen data. The sets are data: changing
one changes every table, so tests/test_world.py pins each set's rendered pixels by a digest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .generator import DEFAULT_SIZE, Sample, Scene, WorldObject, place_objects, render, rng_for
from .vocab import BACKGROUNDS, COLOR_NAMES, HELDOUT_COMBOS, HELDOUT_SHAPES, SHAPES


DEV, TEST = "dev", "test"
# World images per concept that edits are measured on (HeldOutConcept.edit_sources).
EDIT_SOURCES = 8


@dataclass(frozen=True)
class HeldOutConcept:
    name: str
    shape: str
    color: str
    texture: str
    # The class word a user would give it: its own shape when the base model knows the shape, else
    # the seen shape it is closest to (a crescent is a circle with a bite; a hexagon a rounded square).
    class_word: str = ""
    split: str = DEV

    @property
    def kind(self) -> str:
        """"unseen shape", "unseen combination" or "seen words" (see the module doc)."""
        if self.shape in HELDOUT_SHAPES:
            return "unseen shape"
        if (self.color, self.texture) in HELDOUT_COMBOS:
            return "unseen combination"
        return "seen words"

    def obj(self, cx: float = 0.5, cy: float = 0.5, r: float = 0.3) -> WorldObject:
        return WorldObject(self.shape, self.color, self.texture, cx, cy, r)

    def edit_sources(self, n: int = EDIT_SOURCES) -> list[Scene]:
        """The world images an edit with this concept is measured on (the concept's split is
        theirs): `n` scenes whose first (largest) object is the one to turn into the concept. They
        vary layout, object size, background kind and colour; the first two objects have the
        concept's class-word shape (only the appearance must change), the rest another shape
        (the shape must change too); the last two hold a second, smaller object that must stay.
        No object or background shows the concept's colour, so concept colour in the edit is new."""
        rng = rng_for(hash_name(self.name) * 31 + 7, 0)
        class_shape = self.class_word if self.class_word in SHAPES else None
        other_shapes = [s for s in SHAPES if s not in (self.shape, class_shape)]
        out = []
        for i in range(n):
            two = i >= n - 2
            background = BACKGROUNDS[i % len(BACKGROUNDS)]
            bg_color = _other_color(rng, self.color)
            placed = place_objects(rng, 2 if two else 1)
            objects, used = [], {self.color, bg_color}
            for k, (cx, cy, r) in enumerate(placed):
                if k == 0:
                    shape = class_shape if (i < 2 and class_shape) else other_shapes[rng.integers(len(other_shapes))]
                    texture = "solid" if i % 3 else ("striped" if self.texture != "striped" else "dotted")
                else:
                    others = [s for s in SHAPES if s not in (objects[0].shape, self.shape)]
                    shape, texture = others[rng.integers(len(others))], "solid"
                color = _other_color(rng, self.color)
                while color in used:
                    color = _other_color(rng, self.color)
                used.add(color)
                if (color, texture) in HELDOUT_COMBOS:  # the base model never drew it: not a fair source
                    texture = "solid"
                objects.append(WorldObject(shape, color, texture, float(cx), float(cy), float(r)))
            out.append(Scene(background, bg_color, tuple(objects)))
        return out

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
    split: str = DEV

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


def _concepts(*concepts: HeldOutConcept) -> dict[str, HeldOutConcept]:
    return {c.name: c for c in concepts}


# 12 subject concepts, 6 dev / 6 test; each half has two unseen shapes, one unseen combination and
# three of seen words, so a default tuned on dev meets the same kinds of concept on test. The world
# has two unseen shapes and one unseen colour/texture pair (the base model was trained without
# them): the test half meets them in other colours, textures and combinations than dev does.
CONCEPTS: dict[str, HeldOutConcept] = _concepts(
    # dev: tune here
    HeldOutConcept("yellow-crescent", "crescent", "yellow", "solid", class_word="circle", split=DEV),
    HeldOutConcept("green-striped-hexagon", "hexagon", "green", "striped", class_word="square", split=DEV),
    HeldOutConcept("purple-dotted-heart", "heart", "purple", "dotted", class_word="heart", split=DEV),
    HeldOutConcept("orange-striped-ring", "ring", "orange", "striped", class_word="ring", split=DEV),
    HeldOutConcept("pink-dotted-square", "square", "pink", "dotted", class_word="square", split=DEV),
    HeldOutConcept("white-star", "star", "white", "solid", class_word="star", split=DEV),
    # test: report here
    HeldOutConcept("blue-striped-crescent", "crescent", "blue", "striped", class_word="circle", split=TEST),
    HeldOutConcept("red-dotted-hexagon", "hexagon", "red", "dotted", class_word="square", split=TEST),
    HeldOutConcept("purple-dotted-star", "star", "purple", "dotted", class_word="star", split=TEST),
    HeldOutConcept("yellow-striped-cross", "cross", "yellow", "striped", class_word="cross", split=TEST),
    HeldOutConcept("green-dotted-triangle", "triangle", "green", "dotted", class_word="triangle", split=TEST),
    HeldOutConcept("pink-circle", "circle", "pink", "solid", class_word="circle", split=TEST),
)


# 6 styles, 3 dev / 3 test: each treatment the base model never saw (outline, pixelated, pastel)
# once per half, on other backgrounds, with one or two content objects in the style image.
STYLES: dict[str, HeldOutStyle] = {
    s.name: s
    for s in (
        # dev
        HeldOutStyle(
            "neon-outline", background="solid", bg_color="black", treatment="outline",
            content=(WorldObject("star", "yellow", "solid", 0.34, 0.36, 0.22), WorldObject("circle", "pink", "solid", 0.7, 0.7, 0.17)),
            split=DEV,
        ),
        HeldOutStyle(
            "pixel-checker", background="checker", bg_color="green", treatment="pixelated",
            content=(WorldObject("heart", "red", "solid", 0.5, 0.5, 0.3),),
            split=DEV,
        ),
        HeldOutStyle(
            "pastel-gradient", background="gradient", bg_color="blue", treatment="pastel",
            content=(WorldObject("triangle", "orange", "striped", 0.35, 0.62, 0.2), WorldObject("cross", "white", "solid", 0.72, 0.3, 0.15)),
            split=DEV,
        ),
        # test
        HeldOutStyle(
            "ink-stripes", background="stripes", bg_color="white", treatment="outline",
            content=(WorldObject("square", "blue", "solid", 0.5, 0.48, 0.28),),
            split=TEST,
        ),
        HeldOutStyle(
            "pixel-dots", background="dots", bg_color="purple", treatment="pixelated",
            content=(WorldObject("star", "yellow", "solid", 0.32, 0.34, 0.21), WorldObject("ring", "white", "solid", 0.7, 0.68, 0.17)),
            split=TEST,
        ),
        HeldOutStyle(
            "pastel-checker", background="checker", bg_color="red", treatment="pastel",
            content=(WorldObject("circle", "green", "striped", 0.5, 0.5, 0.27),),
            split=TEST,
        ),
    )
}


def split(items: dict, which: str) -> list[str]:
    """The names of a set's dev or test half, in their fixed order."""
    if which not in (DEV, TEST):
        raise ValueError(f"split must be {DEV!r} or {TEST!r} (got {which!r})")
    return [name for name, item in items.items() if item.split == which]


# Shapes a style prompt can ask for without touching the style image's content (for leakage tests).
def shapes_outside(style: HeldOutStyle) -> tuple[str, ...]:
    used = {o.shape for o in style.content}
    return tuple(s for s in SHAPES if s not in used)
