"""DreamSteerer (Yu, Yang, Zhang, NeurIPS 2024): personalized editing as a plug-in over Textual
Inversion, DreamBooth-LoRA and Custom Diffusion adapters, as a loop that yields its model calls.

Plain DDS with a personalized model edits poorly: the model's score for the SOURCE is biased toward
its own concept, and the edit lands as a hybrid of source and concept. DreamSteerer, per request:

    1. subject mask     the concept words' cross-attention on the source (Prompt-to-Prompt's local
                        blend): where the edit may land                              [SubjectMask]
    2. guided samples   the concept's appearance in the source's spatial structure: the source is
                        DDIM-inverted, then sampled with the personalized model while the source's
                        UNet features are injected (plug-and-play)
    3. preliminary edit a few plain DDS iterations give the "slightly edited image"; 2 and 3 run
                        side by side, each UNet call holding both's rows       [SteeringInputs]
    4. steering         a copy of the adapter's own trainable set (LoRA, token, K/V) is tuned by
                        Editability Driven Score Distillation, the personalized prediction on the
                        noised slightly-edited image (target prompt) pulled toward the frozen base
                        model's on the noised source (source prompt), the UNet Jacobian taken as -I
                        (layout-preserving); plus the ordinary denoising loss on the guided samples
                        (mode shifting), so the pull toward the source does not trap the concept in
                        a hybrid                                                            [Steer]
    5. DDS              with the steered copy in the target branch, the pre-trained model in the
                        source branch (source-score bias correction), the update inside the mask
                                                                                           [Denoise]

Every part is switchable (EditOptions) for ablations; docs/edit/dreamsteerer.md gives our reading
of each and its reasons. The steered copy exists only for this request: the executor puts it in a
per-request bank slot and drops it when the loop ends.
"""

from __future__ import annotations

import time

import torch.nn.functional as F

from service.engine.sampling import Decode, Encode, EncodeImage, ModelFacts

from .dds import dds_loop
from .spec import Edited, EditProgress, EditSpec, GuidedSamples, PreliminaryEdit, Steer, SteeringInputs, SubjectMask


def concept_words(spec: EditSpec) -> tuple[str, ...]:
    """The words of the target prompt that name the concept: its token and class word."""
    return tuple(w for w in (spec.token, spec.class_word) if w)


def dreamsteerer(spec: EditSpec, facts: ModelFacts, should_stop=lambda: False, progress: EditProgress | None = None,
                 *, side_by_side: bool = True):
    """The edit's loop. `side_by_side` (the default): the guided samples and the preliminary edit in
    shared UNet calls on the workbench (`SteeringInputs`); False: one after the other, the
    preliminary edit's DDS iterations on the serving engine. The same computation either way (to
    float rounding: tests/test_edit.py compares them); side by side costs about half as many UNet
    calls for the two."""
    if spec.adapter is None:
        raise ValueError("DreamSteerer steers a personalized adapter: the request names none")
    o = spec.options
    report = progress or (lambda phase, step, total: None)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    z_source = yield EncodeImage(spec.source)
    personalized = (spec.adapter,)

    # 1. Subject mask: the concept words' attention on the source, on the latent grid.
    mask = None
    if o.use_subject_mask:
        t0 = time.perf_counter()
        mask = yield SubjectMask(spec.adapter, z_source, spec.target_prompt, concept_words(spec), o.mask_threshold)
        mask = mask.to(z_source)[None, None]
        timings["mask_seconds"] = time.perf_counter() - t0
        report("mask", 1, 1)

    # 2 + 3. Guided samples for mode shifting, and the preliminary edit EDSD reads (plain DDS with
    # the adapter): side by side on the workbench, each UNet call holding both's rows.
    want_guided = o.mode_shifting and o.guided_samples > 0
    want_edit = o.edsd and o.preliminary_iterations > 0
    guided_call = GuidedSamples(spec.adapter, z_source, spec.source_prompt, spec.target_prompt, o.guided_samples,
                                o.guided_steps, o.guidance_scale, spec.seed, inject=o.feature_injection,
                                feature_fraction=o.guided_feature_fraction,
                                attention_fraction=o.guided_attention_fraction) if want_guided else None
    guided = edited = None
    t_inputs = 0.0
    if side_by_side and (want_guided or want_edit):
        t0 = time.perf_counter()
        preliminary = PreliminaryEdit(o.preliminary_iterations, o.guidance_scale, o.learning_rate, o.t_min, o.t_max,
                                      spec.seed + 1) if want_edit else None
        guided, edited = yield SteeringInputs(spec.adapter, z_source, spec.source_prompt, spec.target_prompt,
                                              guided_call, preliminary)
        t_inputs = time.perf_counter() - t0
        if want_guided:  # the preliminary edit ran alongside: its time is the guided samples'
            timings["guided_seconds"], t_inputs = t_inputs, 0.0
    elif want_guided:  # one after the other, the preliminary edit on the serving engine (as before)
        t0 = time.perf_counter()
        guided = yield guided_call
        timings["guided_seconds"] = time.perf_counter() - t0
        report("guided", 1, 1)

    # 4. Steering: EDSD reads the slightly edited image.
    target_rows = personalized
    losses: list[dict[str, float]] = []
    if o.edsd or guided is not None:
        t0 = time.perf_counter()
        if want_edit and not side_by_side:
            embeds = yield Encode(["", spec.source_prompt, "", spec.target_prompt], [personalized] * 4,
                                  (spec.height, spec.width))
            edited = yield from dds_loop(
                facts, z_source, embeds[:2], embeds[2:], personalized, personalized, o.preliminary_iterations,
                o.guidance_scale, o.learning_rate, o.t_min, o.t_max, spec.seed + 1, should_stop=should_stop,
                on_iteration=lambda i, n: report("preliminary", i, n))
        elif o.edsd and not want_edit:
            edited = z_source
        steered, losses = yield Steer(spec.adapter, spec.adapter_method, z_source, edited, guided,
                                      spec.source_prompt, spec.target_prompt, o, spec.seed)
        target_rows = (steered,)
        timings["steer_seconds"] = t_inputs + time.perf_counter() - t0

    # 5. DDS: steered adapter in the target branch; the source branch from the pre-trained model
    # (bias correction) or from the personalized model as plain DDS has it.
    source_rows = () if o.bias_correction else personalized
    t0 = time.perf_counter()
    embeds = yield Encode(["", spec.source_prompt, "", spec.target_prompt],
                          [source_rows, source_rows, target_rows, target_rows], (spec.height, spec.width))
    z = yield from dds_loop(
        facts, z_source, embeds[:2], embeds[2:], source_rows, target_rows, o.iterations, o.guidance_scale,
        o.learning_rate, o.t_min, o.t_max, spec.seed, mask=mask, should_stop=should_stop,
        on_iteration=lambda i, n: report("dds", i, n))
    timings["dds_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    image = (yield Decode(z))[0]
    timings["decode_seconds"] = time.perf_counter() - t0
    timings["total_seconds"] = time.perf_counter() - started
    pixel_mask = None
    if mask is not None:
        pixel_mask = F.interpolate(mask.float().cpu(), size=(spec.height, spec.width), mode="nearest")[0, 0].numpy()
    return Edited(image=image, mask=pixel_mask, seed=spec.seed, timings=timings, steer_losses=losses,
                  guided=guided.cpu().numpy() if guided is not None else None, latent=z[0].float().cpu().numpy())
