"""DreamSteerer's steps that need the model itself, on a private copy of the base model with the
request's adapter applied, one module per step:

- applied.py:  the adapter on the private model (LoRA layers, token vectors; trainable to steer)
- mask.py:     the subject mask (the concept words' cross-attention on the noised source)
- guided.py:   the spatial-feature-guided samples (source UNet features injected while sampling)
- inputs.py:   the guided samples and the preliminary DDS edit side by side (what steering reads)
- rows.py:     shared UNet calls for loops side by side (per-part adapter on/off and injection)
- steering.py: EDSD + mode shifting, gradients to a copy of the adapter's trainable set
- bench.py:    the Workbench, which runs a call's step with the adapter applied (re-exported here)
- protocol.py: what the steps use of the workbench (Bench), so they need not import bench.py

The serving UNet (the adapter bank, batched across requests) is never touched: a workbench belongs
to one worker thread (in-process) or one Triton `edit` instance.

    bench = Workbench(FrozenBase.from_pretrained(model_dir))
    result = bench.execute(call, adapter)      # SubjectMask / GuidedSamples / SteeringInputs / Steer
"""

from __future__ import annotations

from ..spec import GuidedSamples, Steer, SteeringInputs, SubjectMask
from . import guided, inputs, mask, rows, steering
from .applied import Applied, applied
from .bench import Workbench
from .mask import _layer_grid, word_positions
from .protocol import Bench
from .steering import DEFAULT_STEER_LR, STEER_LR

__all__ = ["Applied", "Bench", "DEFAULT_STEER_LR", "STEER_LR", "Workbench", "_layer_grid", "word_positions"]
