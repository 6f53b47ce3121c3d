"""Measures of image quality in the synthetic world, for the benchmarks (docs/world.md).

The attribute classifier (classifier.py, trained by train_classifier.py) reads what an image shows;
metrics.py scores that against prompts, reference concepts and source images.
"""

from .classifier import DEFAULT_WEIGHTS, AttributeClassifier, labels, read
from .metrics import Judge, structure_preservation

__all__ = ["AttributeClassifier", "DEFAULT_WEIGHTS", "Judge", "labels", "read", "structure_preservation"]
