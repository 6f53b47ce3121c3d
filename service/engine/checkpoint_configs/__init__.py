"""The component configs a single-file checkpoint is converted with (service/engine/checkpoints.py).

One JSON file per published model: `model_index`, `unet`, `vae`, `text_encoder` (and
`text_encoder_2`), `tokenizer` (and `tokenizer_2`: max length and pad token; the vocabulary itself
is the BPE file service/engine/tokenizer.py builds from), `scheduler`. They ship with the package
so that a conversion never fetches a config from the Hub (diffusers' `from_single_file` does,
unless given `config=`).

| file | the published repository it reproduces | used for |
| --- | --- | --- |
| sd1.json | stable-diffusion-v1-5/stable-diffusion-v1-5 | SD 1.x (CLIP ViT-L text encoder) |
| sd2-v.json | stabilityai/stable-diffusion-2-1 (768 px, v-prediction) | SD 2.x predicting v (the default) |
| sd2-base.json | stabilityai/stable-diffusion-2-1-base (512 px, epsilon) | SD 2.x predicting noise |
| sdxl-base.json | stabilityai/stable-diffusion-xl-base-1.0 | SDXL base and its fine-tunes |

Source: the values of those repositories' config files as published (the same values diffusers'
`from_single_file` downloads for these model types: `DIFFUSERS_DEFAULT_PIPELINE_PATHS` in
diffusers/loaders/single_file_utils.py maps v1 -> stable-diffusion-v1-5, v2 ->
stable-diffusion-2-1, xl_base -> stable-diffusion-xl-base-1.0), written out by hand: the Hub cannot
be reached from where this was written, so they are not byte copies. Keys left out take diffusers' /
transformers' defaults. The safety checker and feature extractor are left out (SteerServe serves
none). Every width and layer count in them is only a starting point: the converter replaces it
with what the checkpoint's tensors say (a fine-tune or a reduced model of the same structure); what
the tensors cannot say (attention heads, activation, image size, prediction type, VAE scaling) is
taken from here unless a sidecar file says otherwise (docs/models.md, "Single-file checkpoints").
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).parent
NAMES = ("sd1", "sd2-v", "sd2-base", "sdxl-base")


@functools.lru_cache(maxsize=None)
def _read(name: str) -> dict:
    if name not in NAMES:
        raise KeyError(f"no shipped checkpoint config {name!r}; one of {', '.join(NAMES)}")
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def load(name: str) -> dict:
    """A fresh copy of one shipped config set (callers edit it)."""
    return copy.deepcopy(_read(name))
