"""The synthetic world: a generator of images whose contents are known exactly.

See docs/world.md. `generate(seed, index)` gives one reproducible sample (image, masks, caption,
attributes); `heldout` lists the concepts and styles the base model never sees.
"""

from .generator import Sample, Scene, WorldObject, generate, generate_batch, render, sample_scene
from .vocab import ALL_SHAPES, BACKGROUNDS, COLOR_NAMES, HELDOUT_SHAPES, SHAPES, TEXTURES, TREATMENTS

__all__ = [
    "ALL_SHAPES",
    "BACKGROUNDS",
    "COLOR_NAMES",
    "HELDOUT_SHAPES",
    "SHAPES",
    "Sample",
    "Scene",
    "TEXTURES",
    "TREATMENTS",
    "WorldObject",
    "generate",
    "generate_batch",
    "render",
    "sample_scene",
]
