"""Deterministic generator of the synthetic world: images, captions, object masks, attributes.

A scene is a background (kind + colour) and one or two objects (shape, colour, texture, position,
size). `render` turns a scene into pixels with hard edges, so the returned masks say exactly which
pixels belong to which object. `sample_scene` draws a random scene from a numpy Generator;
`generate(seed, index)` makes any sample reproducible on its own, without generating the ones
before it.

Geometry is stored in fractions of the image side, so the same scene renders at any size; texture
periods scale with the size (they are designed at 64x64).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .vocab import (
    BACKGROUND_WORDS,
    COLORS,
    HELDOUT_COMBOS,
    SHAPES,
    TEXTURE_WORDS,
    TEXTURES,
    BACKGROUNDS,
    COLOR_NAMES,
)

DEFAULT_SIZE = 64


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    texture: str
    cx: float  # centre, fraction of the image width
    cy: float  # centre, fraction of the image height
    r: float  # half extent, fraction of the image side

    @property
    def phrase(self) -> str:
        words = [self.color, TEXTURE_WORDS[self.texture], self.shape]
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Scene:
    background: str
    bg_color: str
    objects: tuple[WorldObject, ...]
    treatment: str = "none"

    @property
    def caption(self) -> str:
        """Plain words, e.g. "a red dotted star on a blue striped background"."""
        things = " and ".join(_with_article(o.phrase) for o in self.objects)
        bg = " ".join(w for w in (self.bg_color, BACKGROUND_WORDS[self.background]) if w)
        return f"{things} on {_with_article(bg)} background"

    def attributes(self) -> dict:
        return {
            "background": self.background,
            "bg_color": self.bg_color,
            "treatment": self.treatment,
            "objects": [
                {"shape": o.shape, "color": o.color, "texture": o.texture, "cx": o.cx, "cy": o.cy, "r": o.r}
                for o in self.objects
            ],
        }


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (n_objects, H, W) bool, object silhouettes
    scene: Scene
    caption: str = field(init=False)

    def __post_init__(self):
        self.caption = self.scene.caption


# ---------------------------------------------------------------------------------------------
# Shapes: boolean masks over normalised coordinates (u, v) in [-1, 1] around the object centre.


def _polygon(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over pixels."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % n]
        crosses = (y0 > v) != (y1 > v)
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (u < x_at)
    return inside


def _star_points(n: int = 5, outer: float = 1.0, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, outer, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    d2 = u * u + v * v
    if shape == "circle":
        return d2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if shape == "triangle":
        return _polygon(u, v, [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)])
    if shape == "star":
        return _polygon(u, v, _star_points())
    if shape == "ring":
        return (d2 <= 1.0) & (d2 >= 0.5**2)
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95))
    if shape == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if shape == "crescent":
        return (d2 <= 1.0) & ((u - 0.45) ** 2 + (v + 0.15) ** 2 > 0.78**2)
    if shape == "hexagon":
        a = np.arange(6) * np.pi / 3
        return _polygon(u, v, list(zip(np.cos(a), np.sin(a))))
    raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------------------------------------
# Colours and patterns


def _rgb(name: str) -> np.ndarray:
    return np.array(COLORS[name], dtype=np.float32)


def _tint(c: np.ndarray) -> np.ndarray:
    """The lighter partner colour of a background pattern; grey for white, whose tint is itself."""
    if c.min() > 200:
        return np.full(3, 185.0, dtype=np.float32)
    return c + 0.5 * (255.0 - c)


def _ink(c: np.ndarray) -> np.ndarray:
    """The secondary colour of an object texture: near-black, or near-white on dark objects."""
    return np.full(3, 235.0 if c.max() < 60 else 20.0, dtype=np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel coordinates in "64-pixel units" so texture periods are the same at every size.
    coords = (np.arange(size, dtype=np.float32) + 0.5) * (DEFAULT_SIZE / size)
    return np.meshgrid(coords, coords)  # x (columns), y (rows)


def render_background(kind: str, color: str, size: int) -> np.ndarray:
    x, y = _grid(size)
    c, t = _rgb(color), _tint(_rgb(color))
    if kind == "solid":
        alt = np.zeros_like(x, dtype=bool)
    elif kind == "stripes":  # vertical bands, 6 px colour + 4 px tint
        alt = (x % 10) >= 6
    elif kind == "checker":  # 8 px squares
        alt = ((x // 8) + (y // 8)) % 2 == 1
    elif kind == "dots":  # 2.2 px radius dots on a 10 px grid
        alt = ((x % 10) - 5) ** 2 + ((y % 10) - 5) ** 2 <= 2.2**2
    elif kind == "gradient":  # colour at the top fading to the tint at the bottom
        w = (y / DEFAULT_SIZE)[..., None]
        return (1 - w) * c + w * t
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.where(alt[..., None], t, c)


def texture_pattern(texture: str, size: int) -> np.ndarray:
    """Where an object's secondary (ink) colour goes: a bool map over the whole image."""
    x, y = _grid(size)
    if texture == "solid":
        return np.zeros_like(x, dtype=bool)
    if texture == "striped":  # diagonal, 5 px colour + 3 px ink, so the object colour dominates
        return ((x + y) % 8) >= 5
    if texture == "dotted":  # 1.6 px radius dots on a 6 px grid
        return ((x % 6) - 3) ** 2 + ((y % 6) - 3) ** 2 <= 1.6**2
    raise ValueError(f"unknown texture {texture!r}")


def object_mask(obj: WorldObject, size: int) -> np.ndarray:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    return shape_mask(obj.shape, (x - obj.cx) / obj.r, (y - obj.cy) / obj.r)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        p = np.pad(out, 1, constant_values=False)
        out = out & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


def render(scene: Scene, size: int = DEFAULT_SIZE) -> Sample:
    img = render_background(scene.background, scene.bg_color, size)
    masks = []
    for obj in scene.objects:
        mask = object_mask(obj, size)
        masks.append(mask)
        c = _rgb(obj.color)
        fill = np.where(texture_pattern(obj.texture, size)[..., None], _ink(c), c)
        drawn = mask
        if scene.treatment == "outline":  # only a 2 px (at 64x64) contour is painted, in flat colour
            drawn = mask & ~_erode(mask, max(1, round(2 * size / DEFAULT_SIZE)))
            fill = np.broadcast_to(c, img.shape)
        img = np.where(drawn[..., None], fill, img)
    if scene.treatment == "pastel":  # everything washed halfway to white
        img = img + 0.45 * (255.0 - img)
    elif scene.treatment == "pixelated":  # 4x4 blocks at 64x64: average, then repeat
        b = max(1, size // 16)
        h = size // b
        img = img[: h * b, : h * b].reshape(h, b, h, b, 3).mean(axis=(1, 3))
        img = img.repeat(b, axis=0).repeat(b, axis=1)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Sample(image=image, masks=np.stack(masks) if masks else np.zeros((0, size, size), bool), scene=scene)


# ---------------------------------------------------------------------------------------------
# Random scenes


def sample_object(
    rng: np.random.Generator,
    *,
    shapes=SHAPES,
    colors=COLOR_NAMES,
    textures=TEXTURES,
    exclude_combos=HELDOUT_COMBOS,
    avoid_color: str | None = None,
) -> tuple[str, str, str]:
    while True:
        shape = shapes[rng.integers(len(shapes))]
        color = colors[rng.integers(len(colors))]
        texture = textures[rng.integers(len(textures))]
        if color != avoid_color and (color, texture) not in exclude_combos:
            return shape, color, texture


def place_objects(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """Positions and sizes (cx, cy, r) of n objects that do not overlap; the first is the largest."""
    if n == 1:
        r = rng.uniform(0.17, 0.32)
        return [(rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03), r)]
    while True:
        r0 = rng.uniform(0.15, 0.22)
        r1 = rng.uniform(0.12, r0)
        placed = [(rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03), r) for r in (r0, r1)]
        (x0, y0, _), (x1, y1, _) = placed
        # Bounding circles apart, so masks never overlap and each object is fully visible.
        if np.hypot(x0 - x1, y0 - y1) > (r0 + r1) * 1.05 + 0.02:
            return placed


def sample_scene(
    rng: np.random.Generator,
    *,
    shapes=SHAPES,
    exclude_combos=HELDOUT_COMBOS,
    treatments=("none",),
    p_two_objects: float = 0.25,
) -> Scene:
    """A random scene. Defaults give the base model's training distribution (no held-out values)."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    bg_color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    n = 2 if rng.random() < p_two_objects else 1
    objects = []
    for cx, cy, r in place_objects(rng, n):
        shape, color, texture = sample_object(rng, shapes=shapes, exclude_combos=exclude_combos, avoid_color=bg_color)
        objects.append(WorldObject(shape, color, texture, float(cx), float(cy), float(r)))
    treatment = treatments[rng.integers(len(treatments))]
    return Scene(background, bg_color, tuple(objects), treatment)


def rng_for(seed: int, index: int = 0) -> np.random.Generator:
    """The generator of sample `index` in stream `seed`: independent of every other index."""
    return np.random.default_rng([seed, index])


def generate(seed: int, index: int = 0, size: int = DEFAULT_SIZE, **scene_kwargs) -> Sample:
    return render(sample_scene(rng_for(seed, index), **scene_kwargs), size)


def generate_batch(seed: int, start: int, count: int, size: int = DEFAULT_SIZE, **scene_kwargs) -> list[Sample]:
    return [generate(seed, i, size, **scene_kwargs) for i in range(start, start + count)]


def with_objects(scene: Scene, *objects: WorldObject) -> Scene:
    """The same scene with other objects (e.g. swap one object for another, keep the background)."""
    return replace(scene, objects=tuple(objects))
