"""What DreamSteerer's steering reads, made side by side: the spatial-feature-guided samples
(guided.guided_loop) and the preliminary edit (plain DDS with the personalized adapter,
service.edit.dds.dds_loop, the very loop the serving engine runs), each UNet call holding both's
rows (rows.run_side_by_side). Neither depends on the other: both start from the source. The
guided samples take 2 x `guided_steps` calls (inversion, then sampling), the preliminary edit
`preliminary_iterations`; side by side they take as many calls as the longer of the two."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..dds import dds_loop
from ..spec import SteeringInputs
from .applied import Applied
from .guided import guided_loop
from .rows import run_side_by_side

if TYPE_CHECKING:
    from .protocol import Bench


@torch.no_grad()
def steering_inputs(bench: "Bench", call: SteeringInputs, applied: Applied, should_stop=lambda: False,
                    report=lambda phase, step, total: None):
    """(guided samples [n, C, h, w] or None, edited latent [1, C, h, w] or None). Progress: "guided"
    for the calls that hold the guided samples' rows, then "preliminary" for the rest (its last
    step reported when it ends)."""
    loops, names = [], []
    if call.guided is not None:
        loops.append(guided_loop(bench, call.guided, applied, should_stop))
        names.append(("guided", 2 * call.guided.steps))
    if call.preliminary is not None:
        p = call.preliminary
        # The conditioning the serving engine gives these rows: every row with the adapter.
        embeds = bench.embed(["", call.source_prompt, "", call.target_prompt], applied.tokens, bench.size_of(call.latent))
        uses = (call.adapter,)
        loops.append(dds_loop(bench.base.engine.facts, call.latent, embeds[:2], embeds[2:], uses, uses, p.iterations,
                              p.guidance_scale, p.learning_rate, p.t_min, p.t_max, p.seed, should_stop=should_stop))
        names.append(("preliminary", p.iterations))
    rounds, last = [0], [None]

    def on_round(alive: list[bool]) -> None:
        # Each loop makes `total` calls from the first round on: the first one still in this round
        # names the phase (the guided samples while their rows are in the calls).
        rounds[0] += 1
        phase, total = next(((name, total) for name, total in names if rounds[0] <= total), names[-1])
        last[0] = (phase, min(rounds[0], total), total)
        report(*last[0])

    results = run_side_by_side(bench, applied, loops, adapter_key=call.adapter.key, on_round=on_round)
    phase, total = names[-1]
    if last[0] != (phase, total, total):
        report(phase, total, total)  # both done: the last phase's end
    guided = results[0] if call.guided is not None else None
    edited = results[-1] if call.preliminary is not None else None
    return guided, edited
