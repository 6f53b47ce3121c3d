"""The evaluation harness every quality benchmark shares (personalization, FineStyle, editing).

A quality table is a set of CELLS: one (what is measured, its settings, one held-out item) each,
scored on many images. The harness gives each benchmark the same four things:

- a cache: a cell's per-image scores are stored as JSON under a key of everything that decides
  them (method, every setting, the item, the sampling, the model's weights by content digest, the
  judge's weights by content digest, CACHE_VERSION), so a
  rerun recomputes only the cells whose key changed (`--no-cache` recomputes everything);
- intervals: a table's figure is a mean over UNITS (one held-out item x one sampling seed, the
  images of that pair averaged), with a 95% percentile bootstrap interval that resamples what
  varies: the held-out ITEMS (concepts, styles) first, then the units within each drawn item
  (a two-stage cluster bootstrap). Units of one item are not independent (one adapter made them
  all), so resampling them as if they were overstated what 6 concepts can show; the interval now
  says how the figure would move with other concepts of the same kind. Two rows compared on the
  same units get a PAIRED bootstrap of their difference, resampled the same way;
- a progress bar over the cells (tqdm), and markdown + JSON + a PNG grid for every table.

    cache = ResultCache("quality_personalize")
    records = cache.cell(key, lambda: compute_records())   # [{"item":..., "seed":..., metric: value}]
    est = estimate(records, "agreement")                  # Estimate(mean, lo, hi, n)

Cells are cached, not tables: a table is always rebuilt from its cells, so a changed setting
touches the cells it changes and the table still shows every interval.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Bump when a change to the trainers, samplers or judge changes what a cached cell would hold.
CACHE_VERSION = "2026-12-06.1"
BOOTSTRAP_SAMPLES = 4000
CONFIDENCE = 0.95


def default_cache_dir() -> Path:
    return Path(os.environ.get("STEERSERVE_BENCH_CACHE", ROOT / "var" / "bench-cache"))


def digest(value) -> str:
    """A stable short hash of any JSON-able value (dict keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(model_dir) -> str:
    """A digest of the CONTENT of a model folder's weight and config files: a cell measured on
    other weights is another cell (sizes alone would not see a fine-tune of the same shapes)."""
    from service.profiles import PROFILE_FILE

    root = Path(model_dir)
    parts = [(str(path.relative_to(root)), _file_digest(path)) for path in sorted(root.rglob("*"))
             if path.is_file() and path.name != PROFILE_FILE]  # defaults are not weights
    return digest(parts)


@functools.cache
def judge_identity() -> str:
    """A digest of the judge (the attribute classifier's weights and its presence threshold): a
    cell scored by another judge is another cell."""
    from service.research.measures.classifier import DEFAULT_WEIGHTS
    from service.research.measures.metrics import Judge

    return digest([_file_digest(DEFAULT_WEIGHTS), Judge.presence_threshold])


class ResultCache:
    """Per-cell JSON files under <cache dir>/<bench>/<key digest>.json."""

    def __init__(self, bench: str, root: Path | None = None, enabled: bool = True):
        self.dir = (root or default_cache_dir()) / bench
        self.enabled = enabled
        self.hits = self.misses = 0

    def path(self, key: dict) -> Path:
        """A scored cell's file: its key, the cache version and the judge that scored it."""
        return self.dir / f"{digest({'v': CACHE_VERSION, 'judge': judge_identity(), **key})}.json"

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
        """Bytes (e.g. a trained adapter) cached like a cell, as `<digest>.bin` (not judged: a new
        judge rescores, it does not retrain)."""
        path = self.dir / f"{digest({'v': CACHE_VERSION, **key})}.bin"
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
    """A mean over n units with its 95% bootstrap interval [lo, hi] (items, then units, resampled)."""

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


def _clusters(values: dict[tuple, float]) -> list[np.ndarray]:
    """Unit values grouped by their unit's first field (the held-out item)."""
    groups: dict = {}
    for key, value in values.items():
        groups.setdefault(key[0], []).append(value)
    return [np.asarray(v, dtype=float) for _, v in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def _bootstrap(clusters: list[np.ndarray], seed: int) -> tuple[float, float]:
    """Two-stage percentile bootstrap of the mean over units: draw K items with replacement, then
    each drawn item's units with replacement; a replicate's mean is over all its drawn units (each
    item weighs by its unit count, as in the mean itself)."""
    clusters = [c for c in clusters if len(c)]
    if not clusters:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    k = len(clusters)
    picks = rng.integers(0, k, (BOOTSTRAP_SAMPLES, k))  # replicate b's j-th item
    sums = np.zeros(BOOTSTRAP_SAMPLES)
    counts = np.zeros(BOOTSTRAP_SAMPLES)
    for index, values in enumerate(clusters):
        rows, _ = np.nonzero(picks == index)  # one row per time replicate `row` drew this item
        if len(rows):
            drawn = values[rng.integers(0, len(values), (len(rows), len(values)))].sum(axis=1)
            np.add.at(sums, rows, drawn)
            np.add.at(counts, rows, len(values))
    means = sums / counts
    tail = (1 - CONFIDENCE) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def estimate(records: Sequence[dict], metric: str, unit: Sequence[str] = ("item", "seed"), seed: int = 0) -> Estimate:
    """Mean of a metric over units, with a two-stage bootstrap interval (items, then their units)."""
    values = unit_values(records, metric, unit)
    lo, hi = _bootstrap(_clusters(values), seed)
    mean = float(np.mean(list(values.values()))) if values else float("nan")
    return Estimate(mean, lo, hi, len(values))


def paired_difference(a: Sequence[dict], b: Sequence[dict], metric: str, unit: Sequence[str] = ("item", "seed"),
                      seed: int = 0) -> Estimate:
    """Mean of (a - b) over the units both measured, with a paired two-stage bootstrap interval:
    the same items and units are drawn for both, so what they share cancels."""
    va, vb = unit_values(a, metric, unit), unit_values(b, metric, unit)
    diff = {k: va[k] - vb[k] for k in sorted(set(va) & set(vb), key=str)}
    lo, hi = _bootstrap(_clusters(diff), seed)
    mean = float(np.mean(list(diff.values()))) if diff else float("nan")
    return Estimate(mean, lo, hi, len(diff))


def items(records: Sequence[dict], unit: Sequence[str] = ("item", "seed")) -> int:
    """How many held-out items (the interval's outer resampling) the records cover."""
    return len({r[unit[0]] for r in records})


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
