"""Quality measures built on the attribute classifier: stand-ins for CLIP-I, CLIP-T, SSIM/LPIPS.

    from service.research.measures import Judge
    judge = Judge()                                    # loads the shipped classifier
    judge.prompt_alignment(images, prompts)            # CLIP-T stand-in
    judge.concept_fidelity(images, concept)            # CLIP-I stand-in
    structure_preservation(source, edited, mask)       # SSIM + error outside the edited object
    judge.feature_distance(sources, edits)             # LPIPS stand-in (the classifier's features)
    colour_share(image, region, "pink")                # a colour's share of an object's pixels
    judge.content_leakage(images, prompts, forbidden_shapes)

Images are uint8 arrays (H, W, 3) (or PIL images); prompts are world captions, parsed with
`parse_caption`, and attributes a prompt leaves unknown are not scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.metrics import structural_similarity

from service.research.world.captions import parse_caption
from service.research.world.heldout import HeldOutConcept
from service.research.world.vocab import COLORS

from .classifier import ALL_SHAPES, DEFAULT_WEIGHTS, AttributeClassifier, labels, read, to_input

OBJECT_ATTRIBUTES = ("shape", "color", "texture")
SCENE_ATTRIBUTES = ("background", "bg_color")


def colour_share(image, region: np.ndarray, colour: str) -> float:
    """Share of the pixels in `region` whose nearest world colour is `colour` (how much of an
    object's area an edit painted in the concept's colour)."""
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], np.float32)
    pixels = np.asarray(image, np.float32)[..., :3][np.asarray(region, bool)]
    if not len(pixels):
        return 0.0
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(nearest == names.index(colour)))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def structure_preservation(source, edited, mask: np.ndarray | None = None) -> dict[str, float]:
    """How much of the source survives an edit.

    ssim: structural similarity over the whole image (scikit-image, colour, data range 255).
    outside_mae: mean absolute error (0-255 scale) over pixels outside `mask` (the region the edit
    was allowed to change, e.g. the union of old and new object masks); the whole image if None.
    """
    a = np.asarray(source, dtype=np.uint8)[..., :3]
    b = np.asarray(edited, dtype=np.uint8)[..., :3]
    ssim = structural_similarity(a, b, channel_axis=2, data_range=255)
    keep = np.ones(a.shape[:2], bool) if mask is None else ~np.asarray(mask, bool)
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32))[keep]
    return {"ssim": float(ssim), "outside_mae": float(diff.mean()) if diff.size else 0.0}


@dataclass
class Judge:
    """Reads images with the attribute classifier and scores them against what was asked."""

    model: AttributeClassifier | None = None
    presence_threshold: float = 0.5

    def __post_init__(self):
        if self.model is None:
            self.model = AttributeClassifier.load(DEFAULT_WEIGHTS)

    def read(self, images) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
        out = read(self.model, images)
        return out, labels(out)

    @torch.no_grad()
    def feature_distance(self, a, b) -> np.ndarray:
        """An LPIPS-style perceptual distance per image pair, from the classifier's own features
        (no LPIPS weights exist here): at each conv block's output, features unit-normalised over
        channels at every position, squared difference summed over channels, averaged over
        positions, then over blocks (uncalibrated: LPIPS's learned per-channel weights are all 1)."""
        x, y = to_input(a), to_input(b)
        total = torch.zeros(len(x))
        blocks = 0
        for layer in self.model.features:
            x, y = layer(x), layer(y)
            if isinstance(layer, torch.nn.Sequential):  # a conv block (ReLU output)
                nx = x / x.norm(dim=1, keepdim=True).clamp(min=1e-8)
                ny = y / y.norm(dim=1, keepdim=True).clamp(min=1e-8)
                total += (nx - ny).pow(2).sum(1).mean(dim=(1, 2))
                blocks += 1
        return (total / blocks).numpy()

    def prompt_alignment(self, images, prompts: list[str]) -> dict:
        """Share of images whose classifier reading agrees with each attribute the prompt states.

        Object attributes are checked for the first object (the classifier's main head) and, for
        two-object prompts, the second; "all" is the share of images right on every stated attribute.
        """
        _, read_labels = self.read(images)
        scores: dict[str, list[float]] = {a: [] for a in OBJECT_ATTRIBUTES + SCENE_ATTRIBUTES}
        all_ok = []
        for lab, prompt in zip(read_labels, prompts):
            want = parse_caption(prompt)
            checks = []
            for k, obj in enumerate(want["objects"][:2]):
                suffix = "" if k == 0 else "2"
                for a in OBJECT_ATTRIBUTES:
                    if obj[a] is not None:
                        checks.append((a, lab[a + suffix] == obj[a]))
            for a in SCENE_ATTRIBUTES:
                if want[a] is not None:
                    checks.append((a, lab[a] == want[a]))
            for a, ok in checks:
                scores[a].append(float(ok))
            all_ok.append(float(all(ok for _, ok in checks)))
        result = {a: _mean(v) for a, v in scores.items()}
        result["all"] = _mean(all_ok)
        return result

    def concept_fidelity(self, images, concept: HeldOutConcept, references=None) -> dict:
        """How much generated images show the reference concept (the CLIP-I stand-in).

        agreement: share of images whose main object has the concept's shape, colour and texture;
        per-attribute agreement alongside. similarity: mean cosine similarity between each image's
        classifier embedding and the mean embedding of the reference images.
        """
        references = references if references is not None else concept.references()
        out, read_labels = self.read(images)
        ref_out, _ = self.read([r.image if hasattr(r, "image") else r for r in references])
        centre = ref_out["embedding"].mean(0)
        centre /= np.linalg.norm(centre)
        want = {"shape": concept.shape, "color": concept.color, "texture": concept.texture}
        per = {a: float(np.mean([lab[a] == want[a] for lab in read_labels])) for a in want}
        agreement = float(np.mean([all(lab[a] == want[a] for a in want) for lab in read_labels]))
        return {"agreement": agreement, **per, "similarity": float((out["embedding"] @ centre).mean())}

    def content_leakage(self, images, prompts: list[str], forbidden_shapes=None) -> dict:
        """Objects present that the prompt did not ask for.

        leakage: share of images showing a shape the prompt did not name, or more objects than it
        asked for. forbidden: share showing any of `forbidden_shapes` (e.g. the style image's
        content) that the prompt did not name.
        """
        out, read_labels = self.read(images)
        leaked, forbidden_hits = [], []
        for i, prompt in enumerate(prompts):
            want = parse_caption(prompt)["objects"]
            asked = {o["shape"] for o in want if o["shape"]}
            # Shapes seen: the multi-label head, plus what the per-object heads name (they are the
            # more accurate readers when the count head sees a second object).
            present = {s for s, p in zip(ALL_SHAPES, out["present"][i]) if p > self.presence_threshold}
            present.add(read_labels[i]["shape"])
            if read_labels[i]["count"] == "2":
                present.add(read_labels[i]["shape2"])
            # An unknown shape (a personalization token) is allowed to be anything once.
            n_unknown = sum(o["shape"] is None for o in want)
            extra = present - asked
            too_many = int(read_labels[i]["count"]) > len(want)
            leaked.append(float(len(extra) > n_unknown or too_many))
            if forbidden_shapes is not None:
                forbidden_hits.append(float(bool((set(forbidden_shapes) - asked) & present)))
        return {"leakage": _mean(leaked), "forbidden": _mean(forbidden_hits)}
