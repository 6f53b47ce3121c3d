"""steerserve-world-v1: the project's own Stable-Diffusion-architecture model, trained on the world.

`DEFAULT_MODEL_DIR` is the shipped diffusers folder the engine loads as its embedded default.
Architecture: config.py; training: `python -m service.research.basemodel.train` (docs/world.md).
"""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "weights" / "steerserve-world-v1"
