"""Publishing a model folder written beside its final place, atomically.

Several processes may build the same folder at once (test workers, replicas converting one
checkpoint): each writes its own temporary folder and renames it into place; a loser of the race
finds the winner's folder complete and drops its own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish_folder(tmp: Path, final: Path) -> None:
    """Renames the written folder `tmp` to `final`, or keeps a complete `final` another process published."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (Path(final) / "model_index.json").is_file():
            raise
