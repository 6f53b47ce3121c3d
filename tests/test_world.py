import numpy as np
import pytest

from service.research.world import HELDOUT_SHAPES, Scene, WorldObject, generate, render
from service.research.world.captions import parse_caption
from service.research.world.generator import COLORS, _ink, render_background, texture_pattern
from service.research.world.heldout import CONCEPTS, STYLES, shapes_outside
from service.research.world.vocab import BACKGROUNDS, HELDOUT_COMBOS, SHAPES


def test_generator_is_deterministic_per_seed_and_index():
    a, b = generate(7, 3), generate(7, 3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.caption == b.caption and a.scene == b.scene
    others = [generate(7, 4), generate(8, 3)]
    assert all(o.caption != a.caption or not np.array_equal(o.image, a.image) for o in others)


@pytest.mark.parametrize("index", range(24))
def test_masks_and_captions_agree_with_pixels(index):
    s = generate(1, index)
    size = s.image.shape[0]
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert len(s.masks) == len(s.scene.objects) > 0
    # Objects never overlap, and each is clearly visible.
    assert not (s.masks.sum(0) > 1).any()
    assert all(m.sum() > 60 for m in s.masks)
    # Outside every mask the pixels are exactly the background the caption names.
    background = np.rint(render_background(s.scene.background, s.scene.bg_color, size)).astype(np.uint8)
    outside = ~s.masks.any(0)
    assert np.array_equal(s.image[outside], background[outside])
    # Inside an object's mask: its colour where its texture has no ink, the ink colour elsewhere.
    for obj, mask in zip(s.scene.objects, s.masks):
        colour = np.array(COLORS[obj.color], np.uint8)
        ink = texture_pattern(obj.texture, size)
        assert (s.image[mask & ~ink] == colour).all()
        assert (s.image[mask & ink] == _ink(colour.astype(np.float32)).astype(np.uint8)).all()
        if obj.texture != "solid":
            assert (mask & ink).sum() > 0.15 * mask.sum()  # the texture is really there
    # The caption says exactly what was drawn.
    want = parse_caption(s.caption)
    assert want["background"] == s.scene.background and want["bg_color"] == s.scene.bg_color
    assert [(o["shape"], o["color"], o["texture"]) for o in want["objects"]] == [
        (o.shape, o.color, o.texture) for o in s.scene.objects
    ]


def test_caption_wording():
    scene = Scene("stripes", "blue", (WorldObject("star", "red", "dotted", 0.5, 0.5, 0.3),))
    assert scene.caption == "a red dotted star on a blue striped background"
    two = Scene("solid", "white", (WorldObject("circle", "red", "solid", 0.3, 0.3, 0.2), WorldObject("ring", "black", "striped", 0.7, 0.7, 0.15)))
    assert two.caption == "a red circle and a black striped ring on a white background"
    vowel = Scene("gradient", "orange", (WorldObject("ring", "orange", "striped", 0.5, 0.5, 0.3),))
    assert vowel.caption == "an orange striped ring on an orange gradient background"
    assert parse_caption(vowel.caption)["bg_color"] == "orange"


def test_base_distribution_never_shows_held_out_values():
    for i in range(600):
        scene = generate(2, i).scene
        for o in scene.objects:
            assert o.shape not in HELDOUT_SHAPES
            assert (o.color, o.texture) not in HELDOUT_COMBOS
            assert o.color != scene.bg_color


def test_renders_at_other_sizes():
    scene = generate(3, 0).scene
    big = render(scene, 128)
    small = render(scene, 64)
    assert big.image.shape == (128, 128, 3)
    # Same silhouettes, up to the edge pixels of the finer grid.
    down = big.masks[:, ::2, ::2] | big.masks[:, 1::2, 1::2]
    assert (down == small.masks).mean() > 0.97


def test_held_out_concepts_have_consistent_references():
    for concept in CONCEPTS.values():
        refs = concept.references(n=4, seed=0)
        assert [r.caption for r in refs] == [r.caption for r in concept.references(n=4, seed=0)]
        assert len({r.image.tobytes() for r in refs}) == 4  # varied position, size, background
        for r in refs:
            (obj,) = r.scene.objects
            assert (obj.shape, obj.color, obj.texture) == (concept.shape, concept.color, concept.texture)
            assert r.scene.bg_color != concept.color


def test_styles_render_their_treatment_and_list_their_content():
    outline = STYLES["neon-outline"].reference()
    mask = outline.masks[0]
    colour = np.array(COLORS[STYLES["neon-outline"].content[0].color], np.uint8)
    painted = (outline.image == colour).all(-1) & mask
    assert 0 < painted.sum() < 0.6 * mask.sum()  # a contour, not a filled shape
    pixel = STYLES["pixel-checker"].reference().image
    assert (pixel[::4, ::4] == pixel[3::4, 3::4]).all()  # constant 4x4 blocks
    pastel = STYLES["pastel-gradient"].reference().image
    assert pastel.min() > 100  # washed out towards white
    for style in STYLES.values():
        assert style.content and not set(shapes_outside(style)) & {o.shape for o in style.content}


def _digest(images) -> str:
    import hashlib

    h = hashlib.sha256()
    for image in images:
        h.update(image.tobytes())
    return h.hexdigest()[:16]


# The held-out sets are data every quality table rests on: these digests pin their pixels, so a
# change to the generator or the sets that would silently change the tables fails here first.
CONCEPT_DIGESTS = {
    "yellow-crescent": "3d68f58eb6542b36", "green-striped-hexagon": "06b933a3896804a4",
    "purple-dotted-heart": "2ace8768d5103359", "orange-striped-ring": "dfed2da97299fa4b",
    "pink-dotted-square": "228000de7ea57e26", "white-star": "2fe659a83141731b",
    "blue-striped-crescent": "121b394b00753b7b", "red-dotted-hexagon": "5c2bd65d1631ecdb",
    "purple-dotted-star": "a5b78375a01ae608", "yellow-striped-cross": "2e48c8d4383f91e0",
    "green-dotted-triangle": "01e9b8751aaa821a", "pink-circle": "2ced845947861dcb",
}
STYLE_DIGESTS = {
    "neon-outline": "9c0393a5841b21d6", "pixel-checker": "cc70cef7ba5a19b1", "pastel-gradient": "41a0d7c617463787",
    "ink-stripes": "22a1b0b9d7282642", "pixel-dots": "07205999321e1178", "pastel-checker": "e3ceb263394a0f78",
}


def test_held_out_sets_are_split_and_reproduced_by_the_generator():
    from service.research.world.heldout import DEV, TEST, split

    dev, test = split(CONCEPTS, DEV), split(CONCEPTS, TEST)
    assert len(dev) == len(test) == 6 and not set(dev) & set(test)
    for half in (dev, test):
        kinds = [CONCEPTS[c].kind for c in half]
        assert kinds.count("unseen shape") >= 2 and kinds.count("unseen combination") >= 1
    assert sum(CONCEPTS[c].kind == "unseen shape" for c in CONCEPTS) >= 4
    assert sum(CONCEPTS[c].kind == "unseen combination" for c in CONCEPTS) >= 2
    for concept in CONCEPTS.values():
        assert concept.class_word in SHAPES  # a word the base model knows
    assert len(split(STYLES, DEV)) == len(split(STYLES, TEST)) == 3
    for half in (split(STYLES, DEV), split(STYLES, TEST)):
        assert {STYLES[s].treatment for s in half} == {"outline", "pixelated", "pastel"}
        assert all(1 <= len(STYLES[s].content) <= 2 for s in half)
    got_concepts = {name: _digest(r.image for r in c.references(4, seed=0)) for name, c in CONCEPTS.items()}
    got_styles = {name: _digest([s.reference().image]) for name, s in STYLES.items()}
    assert got_concepts == CONCEPT_DIGESTS
    assert got_styles == STYLE_DIGESTS


# The editing table's sources (HeldOutConcept.edit_sources), pinned like the concepts.
EDIT_SOURCE_DIGESTS = {
    "yellow-crescent": "1705a4abf581c89c", "green-striped-hexagon": "137f79f3047a4903",
    "purple-dotted-heart": "ff23fb0fd0a793cd", "orange-striped-ring": "29b71fa3af2858d3",
    "pink-dotted-square": "aea06ddb8b7cfb83", "white-star": "c13afff02363f6e5",
    "blue-striped-crescent": "08670ebc6160eac6", "red-dotted-hexagon": "21dfa9e1858c8c35",
    "purple-dotted-star": "d5b4ff00517e7ef8", "yellow-striped-cross": "2fd936062900efb5",
    "green-dotted-triangle": "4b7c11ae65e15fac", "pink-circle": "c22871b7875c6fb9",
}


def test_edit_sources_vary_as_the_editing_table_needs_and_are_pinned():
    from service.research.world.heldout import EDIT_SOURCES

    for name, concept in CONCEPTS.items():
        scenes = concept.edit_sources()
        assert len(scenes) == EDIT_SOURCES >= 8
        # The edited object is the first and the largest (what the classifier's main head reads,
        # as the world's scenes order their objects: by size, place_objects).
        assert all(s.objects[0].r >= max(o.r for o in s.objects) for s in scenes)
        # Nothing shows the concept's colour, and no object is a combination the base model never drew.
        for s in scenes:
            assert concept.color not in {s.bg_color, *(o.color for o in s.objects)}
            assert all((o.color, o.texture) not in HELDOUT_COMBOS for o in s.objects)
            assert all(o.shape in SHAPES for o in s.objects)
        # The class word's shape (appearance edits) and other shapes (the shape must change too).
        assert [s.objects[0].shape for s in scenes[:2]] == [concept.class_word] * 2
        assert all(s.objects[0].shape not in (concept.shape, concept.class_word) for s in scenes[2:])
        # One and two objects; every background kind.
        assert [len(s.objects) for s in scenes] == [1] * (EDIT_SOURCES - 2) + [2, 2]
        assert {s.background for s in scenes} == set(BACKGROUNDS)
    got = {}
    for name, concept in CONCEPTS.items():
        got[name] = _digest(render(s).image for s in concept.edit_sources())
    assert got == EDIT_SOURCE_DIGESTS
