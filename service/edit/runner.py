"""Runs an edit loop in this thread: sampling-loop calls on the serving engine (its adapter bank),
DreamSteerer's model-internal steps on a private workbench, the steered copy in a per-request bank
slot. The in-process backend, the benchmarks and the tests use it; the Triton `edit` model runs the
same loop with its UNet rows sent to the shared `unet` model (service.triton.parts.EditWorker)."""

from __future__ import annotations

import contextlib

from service.adapters import AdapterManager
from service.engine.pipeline import Engine, flush_denormals
from service.engine.sampling import AdapterUse, run, run_together

from . import editor
from .spec import WORKBENCH_CALLS, Edited, EditProgress, EditSpec, Steer
from .workbench import Workbench


def steered_result(call, result, manager: AdapterManager, request: contextlib.ExitStack):
    """A workbench call's answer to the loop. For `Steer`: the steered copy goes into the bank as a
    per-request adapter, dropped when `request` closes (however the edit ends)."""
    if not isinstance(call, Steer):
        return result
    steered, losses = result
    key = request.enter_context(manager.ephemeral(steered, prefix="steered"))
    return AdapterUse(key), losses


def run_edit(
    engine: Engine, workbench: Workbench | None, spec: EditSpec, should_stop=lambda: False,
    progress: EditProgress | None = None,
) -> Edited:
    """`engine` serves adapters through its bank (BankedAdapters); `workbench` is needed by
    DreamSteerer only."""
    return run_edits(engine, workbench, [spec], should_stop, progress)[0]


def run_edits(
    engine: Engine, workbench: Workbench | None, specs: list[EditSpec], should_stop=lambda: False,
    progress: EditProgress | None = None,
) -> list[Edited]:
    """Several edits side by side (service.engine.sampling.run_together): their DDS iterations share
    UNet calls, as concurrent edits do on Triton's `unet` model. The bank needs a slot per distinct
    adapter and one per DreamSteerer edit (its steered copy), and rows for 4 per edit."""
    flush_denormals()
    loops = [editor(spec)(spec, engine.facts, should_stop, progress) for spec in specs]
    manager = engine.adapters.manager
    with contextlib.ExitStack() as request:
        used = [(spec.adapter,) for spec in specs if spec.adapter is not None]
        if used:
            # Pinned for the whole edit, so no iteration reloads them.
            request.enter_context(engine.adapters.hold(used))

        def execute(call):
            if isinstance(call, WORKBENCH_CALLS):
                if workbench is None or manager is None:
                    raise RuntimeError("DreamSteerer needs a workbench and an adapter bank")
                result = workbench.execute(call, manager.get(call.adapter.key), should_stop, progress)
                use = steered_result(call, result, manager, request)
                if isinstance(call, Steer):
                    request.enter_context(engine.adapters.hold([(use[0],)]))
                return use
            return engine.execute(call)

        if len(loops) == 1:
            return [run(loops[0], execute)]
        return run_together(loops, execute)
