"""The attribute classifier: a small CNN that reads a world image's contents.

It stands in for CLIP/DINO as the judge of generated images. Heads (all softmax unless noted):
  shape, color, texture        the first (largest) object, over the full vocabulary incl. held-out shapes
  shape2, color2, texture2     the second object, when there is one
  count                        1 or 2 objects
  present                      which shapes are in the image (multi-label, sigmoid)
  background, bg_color         background kind and colour
  treatment                    rendering treatment (none / outline / pixelated / pastel)
and a 128-d L2-normalised embedding (the penultimate layer) for feature similarity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from service.research.world.vocab import ALL_SHAPES, BACKGROUNDS, COLOR_NAMES, TEXTURES, TREATMENTS

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "attribute_classifier.safetensors"
INPUT_SIZE = 64

# Name of each softmax head -> its class names.
HEADS: dict[str, tuple[str, ...]] = {
    "shape": ALL_SHAPES,
    "color": COLOR_NAMES,
    "texture": TEXTURES,
    "shape2": ALL_SHAPES,
    "color2": COLOR_NAMES,
    "texture2": TEXTURES,
    "count": ("1", "2"),
    "background": BACKGROUNDS,
    "bg_color": COLOR_NAMES,
    "treatment": TREATMENTS,
}
EMBED_DIM = 128


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        # 64 -> 32 -> 16 -> 8 -> 4; the first layer runs at full resolution so 1-2 px dots survive.
        self.features = nn.Sequential(
            _block(3, w), nn.MaxPool2d(2),
            _block(w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), nn.MaxPool2d(2),
            _block(4 * w, 128), nn.MaxPool2d(2),
            _block(128, 128),
        )  # fmt: skip
        # Average and max pooling: colours are global, a small object may only show up in the max.
        self.embed = nn.Sequential(nn.Linear(256, EMBED_DIM), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(EMBED_DIM, len(classes)) for name, classes in HEADS.items()})
        self.present = nn.Linear(EMBED_DIM, len(ALL_SHAPES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, 3, 64, 64) in [-1, 1]. Returns logits per head, "present" logits, "embedding"."""
        f = self.features(x)
        h = self.embed(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))
        out = {name: head(h) for name, head in self.heads.items()}
        out["present"] = self.present(h)
        out["embedding"] = F.normalize(h, dim=1)
        return out

    @classmethod
    def load(cls, path: str | Path = DEFAULT_WEIGHTS) -> "AttributeClassifier":
        model = cls()
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        model.load_state_dict(state)
        return model.eval()

    def save(self, path: str | Path) -> None:
        # fp16 on disk keeps the shipped file small; BatchNorm's step counter stays an integer.
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in self.state_dict().items()}
        save_file(state, str(path))


def to_input(images) -> torch.Tensor:
    """uint8 images (N, H, W, 3) or a list of them / PIL images -> (N, 3, 64, 64) in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8)[..., :3] for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area" if x.shape[-1] > INPUT_SIZE else "nearest")
    return x


@torch.no_grad()
def read(model: AttributeClassifier, images, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Class probabilities per head, "present" probabilities and embeddings, as numpy arrays."""
    x = to_input(images)
    chunks = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    out = {}
    for name in chunks[0]:
        t = torch.cat([c[name] for c in chunks])
        if name in HEADS:
            t = t.softmax(dim=1)
        elif name == "present":
            t = t.sigmoid()
        out[name] = t.numpy()
    return out


def labels(out: dict[str, np.ndarray]) -> list[dict[str, str]]:
    """The most likely class name of every head, per image."""
    n = len(out["shape"])
    return [{name: HEADS[name][int(out[name][i].argmax())] for name in HEADS} for i in range(n)]
