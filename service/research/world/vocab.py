"""The attribute vocabulary of the synthetic world.

Everything the base model may be asked to draw, and everything the attribute classifier reads, is
listed here. Held-out values (`HELDOUT_SHAPES`, `HELDOUT_COMBOS`) exist in the world but are never
shown to the base model: they are the concepts personalization has to teach it.
"""

from __future__ import annotations

# Shapes the base model is trained on.
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "heart")
# Shapes only held-out concepts use (the classifier knows them, the base model does not).
HELDOUT_SHAPES = ("crescent", "hexagon")
ALL_SHAPES = SHAPES + HELDOUT_SHAPES

# Saturated, well separated colours so that "red" means one thing to the eye and to the classifier.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOR_NAMES = tuple(COLORS)

# Object textures, and the word a caption uses for each (solid objects are just "a red star").
TEXTURES = ("solid", "striped", "dotted")
TEXTURE_WORDS = {"solid": "", "striped": "striped", "dotted": "dotted"}

# Background kinds, and their caption words ("on a blue checkered background").
BACKGROUNDS = ("solid", "stripes", "checker", "gradient", "dots")
BACKGROUND_WORDS = {
    "solid": "",
    "stripes": "striped",
    "checker": "checkered",
    "gradient": "gradient",
    "dots": "dotted",
}

# (colour, texture) pairs the base model never sees on an object: an unseen combination of seen words.
HELDOUT_COMBOS = frozenset({("purple", "dotted")})

# Rendering treatments. Only "none" is in the base model's training data; the others define the
# held-out styles (see heldout.py). The classifier learns all of them so it can read styled outputs.
TREATMENTS = ("none", "outline", "pixelated", "pastel")
