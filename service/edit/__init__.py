"""Editing: change a source image to show the user's concept, keeping its layout and background.

One module per method, each a loop that yields its model calls (as the sampling loop does):

- dds:           Delta Denoising Score (Hertz et al. 2023), with or without a personalized adapter
- dreamsteerer:  DreamSteerer (Yu et al. 2024) over DDS: subject mask, spatial-feature-guided
                 samples, EDSD steering of a per-request adapter copy, bias-corrected masked DDS
- workbench:     DreamSteerer's steps that need the model itself, on a private model copy

    loop = editor(spec, facts, should_stop, progress)     # EDITORS[spec.method]
    edited = run(loop, execute)                           # service.engine.sampling.run

The editors know nothing of gRPC or Triton; `service.edit.runner.run_edit` executes a loop on an
engine (adapter bank) and a workbench, and the Triton `edit` model runs the same loop with its
UNet rows sent to the shared `unet` model. docs/edit/ explains each method and our reading of it.
"""

from __future__ import annotations

from service.engine.sampling import EncodeImage

from .dds import dds, dds_loop
from .dreamsteerer import dreamsteerer
from .spec import (
    DDS, DREAMSTEERER, EDIT_METHODS, WORKBENCH_CALLS, Edited, EditOptions, EditRefused, EditProgress, EditSpec,
    GuidedSamples, PreliminaryEdit, Steer, SteeringInputs, SubjectMask,
)

EDITORS = {DDS: dds, DREAMSTEERER: dreamsteerer}


def editor(spec: EditSpec):
    if spec.method not in EDITORS:
        raise ValueError(f"unknown edit method {spec.method!r}; one of {', '.join(EDITORS)}")
    return EDITORS[spec.method]


__all__ = [
    "DDS", "DREAMSTEERER", "EDITORS", "EDIT_METHODS", "WORKBENCH_CALLS", "Edited", "EditOptions", "EditProgress", "EditRefused",
    "EditSpec", "EncodeImage", "GuidedSamples", "PreliminaryEdit", "Steer", "SteeringInputs", "SubjectMask", "dds",
    "dds_loop", "dreamsteerer", "editor",
]
