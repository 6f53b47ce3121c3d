"""The evaluation harness every quality benchmark shares (personalization, FineStyle, editing).

A quality table is a set of CELLS: one (what is measured, its settings, one held-out item) each,
scored on many images. The harness gives each benchmark the same four things:

- a cache: a cell's per-image scores are stored as JSON under a key of everything that decides
  them (method, every setting, the item, the sampling, the model's weights, CACHE_VERSION), so a
  rerun recomputes only the cells whose key changed (`--no-cache` recomputes everything);
- intervals: a table's figure is a mean over UNITS (one held-out item x one sampling seed, the
  images of that pair averaged), with a 95% percentile bootstrap interval over those units;
  two rows compared on the same units get a PAIRED bootstrap of their difference;
- a progress bar over the cells (tqdm), and markdown + JSON + a PNG grid for every table.

    cache = ResultCache("quality_personalize")
    records = cache.cell(key, lambda: compute_records())   # [{"item":..., "seed":..., metric: value}]
    est = estimate(records, "agreement")                  # Estimate(mean, lo, hi, n)

Cells are cached, not tables: a table is always rebuilt from its cells, so a changed setting
touches the cells it changes and the table still shows every interval.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Bump when a change to the trainers, samplers or judge changes what a cached cell would hold.
CACHE_VERSION = "2026-12-04.1"
BOOTSTRAP_SAMPLES = 4000
CONFIDENCE = 0.95


def default_cache_dir() -> Path:
    return Path(os.environ.get("STEERSERVE_BENCH_CACHE", ROOT / "var" / "bench-cache"))


def digest(value) -> str:
    """A stable short hash of any JSON-able value (dict keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def model_identity(model_dir) -> str:
    """A digest of a model folder's weight and config files (name, size, mtime-free content hash of
    the configs, size of the weights): a cell measured on other weights is another cell."""
    from service.profiles import PROFILE_FILE

    root = Path(model_dir)
    parts = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != PROFILE_FILE:  # defaults are not weights
            rel = str(path.relative_to(root))
            if path.suffix == ".json":
                parts.append((rel, hashlib.sha256(path.read_bytes()).hexdigest()))
            else:
                parts.append((rel, path.stat().st_size))
    return digest(parts)


class ResultCache:
    """Per-cell JSON files under <cache dir>/<bench>/<key digest>.json."""

    def __init__(self, bench: str, root: Path | None = None, enabled: bool = True):
        self.dir = (root or default_cache_dir()) / bench
        self.enabled = enabled
        self.hits = self.misses = 0

    def path(self, key: dict) -> Path:
        return self.dir / f"{digest({'v': CACHE_VERSION, **key})}.json"

    def has(self, key: dict) -> bool:
        return self.enabled and self.path(key).is_file()

    def get(self, key: dict):
        if not self.has(key):
            return None
        return json.loads(self.path(key).read_text())["value"]

    def put(self, key: dict, value) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "version": CACHE_VERSION, "value": value}))
        tmp.replace(path)  # a killed run leaves no half-written cell

    def blob(self, key: dict, compute: Callable[[], bytes]) -> bytes:
        """Bytes (e.g. a trained adapter) cached like a cell, as `<digest>.bin`."""
        path = self.path(key).with_suffix(".bin")
        if self.enabled and path.is_file():
            self.hits += 1
            return path.read_bytes()
        self.misses += 1
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".bin.tmp")
        tmp.write_bytes(value)
        tmp.replace(path)
        return value

    def cell(self, key: dict, compute: Callable[[], object]):
        """The cached value of `key`, or compute() stored under it."""
        value = self.get(key)
        if value is not None:
            self.hits += 1
            return value
        self.misses += 1
        value = compute()
        self.put(key, value)
        return value


# -- intervals ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A mean over n units with its 95% bootstrap interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def pct(self) -> str:
        """"52% [44, 60]" (percent, interval in points)."""
        return f"{self.mean:.0%} [{self.lo * 100:.0f}, {self.hi * 100:.0f}]"

    def num(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def as_dict(self) -> dict:
        return {"mean": round(self.mean, 4), "lo": round(self.lo, 4), "hi": round(self.hi, 4), "n": self.n}


def unit_values(records: Sequence[dict], metric: str, unit: Sequence[str] = ("item", "seed")) -> dict[tuple, float]:
    """The mean of `metric` over each unit's records (records without the metric are skipped)."""
    sums: dict[tuple, list[float]] = {}
    for r in records:
        if r.get(metric) is None:
            continue
        sums.setdefault(tuple(r[u] for u in unit), []).append(float(r[metric]))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def _bootstrap(values: np.ndarray, seed: int) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (BOOTSTRAP_SAMPLES, len(values)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def estimate(records: Sequence[dict], metric: str, unit: Sequence[str] = ("item", "seed"), seed: int = 0) -> Estimate:
    """Mean of a metric over units, with a percentile bootstrap interval (units resampled)."""
    values = np.array(list(unit_values(records, metric, unit).values()))
    lo, hi = _bootstrap(values, seed)
    return Estimate(float(values.mean()) if len(values) else float("nan"), lo, hi, len(values))


def paired_difference(a: Sequence[dict], b: Sequence[dict], metric: str, unit: Sequence[str] = ("item", "seed"),
                      seed: int = 0) -> Estimate:
    """Mean of (a - b) over the units both measured, with a paired bootstrap interval: the same
    units are drawn for both, so what the items and seeds share cancels."""
    va, vb = unit_values(a, metric, unit), unit_values(b, metric, unit)
    common = sorted(set(va) & set(vb))
    diff = np.array([va[k] - vb[k] for k in common])
    lo, hi = _bootstrap(diff, seed)
    return Estimate(float(diff.mean()) if len(diff) else float("nan"), lo, hi, len(diff))


# -- progress and outputs -------------------------------------------------------------------------


def progress(cells: Iterable, total: int | None = None, desc: str = "cells"):
    """A progress bar over cells (to stderr; quiet when not a terminal and TQDM_DISABLE is set)."""
    from tqdm import tqdm

    return tqdm(cells, total=total, desc=desc, unit="cell", dynamic_ncols=True,
                disable=os.environ.get("TQDM_DISABLE") == "1")


def write_outputs(out_dir, stem: str, report: dict, markdown: str) -> None:
    """`<out_dir>/<stem>.json` (every figure, with its interval and n) and `<stem>.md` (the table)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    print(markdown)


def grid(rows: list[tuple[str, list[np.ndarray]]], path: Path, scale: int = 2, label_width: int = 190) -> None:
    """A PNG: one labelled row of image tiles per (item, what)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    size = max(im.shape[0] for _, images in rows for im in images) if rows else 64
    tile = size * scale
    cols = max((len(images) for _, images in rows), default=1)
    canvas = Image.new("RGB", (label_width + cols * tile, max(1, len(rows)) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        for line, text in enumerate(label.split("\n")):
            draw.text((6, r * tile + 8 + 16 * line), text, fill="black", font=font)
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (label_width + c * tile, r * tile))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def images_to_json(images: Sequence[np.ndarray]) -> list[str]:
    """Small uint8 images as PNG base64 (for a cell's grid tiles, cached with its scores)."""
    import base64
    import io

    from PIL import Image

    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def images_from_json(items: Sequence[str]) -> list[np.ndarray]:
    import base64
    import io

    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB")) for s in items]
