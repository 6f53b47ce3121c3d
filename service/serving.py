"""The serving engine, built in one place from Settings: the model, its adapter bank, its UNet runtime.

Used by the in-process backend (service/gateway/server.py), every Triton model instance
(model_repo/*/1/model.py), the ahead-of-time graph export (service/compiled/export.py) and the
benchmarks (bench/common.py), so what is measured and exported is what serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from service.config import Settings
from service.engine.pipeline import COMPONENTS, Engine


def build_engine(
    settings: Settings,
    max_rows: int,
    *,
    device: str | None = None,
    model_dir: str | Path | None = None,
    adapters: bool = True,
    loader: Callable[[str], object] | None = None,
    unet_runtime: bool = True,
    registry=None,
    components: Sequence[str] = COMPONENTS,
    image_prompts: bool = False,
) -> Engine:
    """The engine of one serving process.

    `max_rows`: the most UNet rows one call routes (2 per image under CFG, 3 under style guidance;
    a Triton `unet` instance: its max_batch_size). `adapters`: attach the adapter bank, loading by
    key through `loader` (default: the content-addressed blobs in settings.adapters_path()).
    `unet_runtime`: run the UNet as settings.unet_runtime says, warmed up before this returns.
    `registry`: where the bank's metrics go (default: the process's global registry).
    `components`: the models whose weights to load (Engine.from_pretrained); the rest stay on meta.
    `image_prompts`: install settings.image_prompt_files()'s IP-Adapter (before the runtime, so a
    compiled UNet takes the packed conditioning): the in-process engine and Triton's `generate`
    model, whose loops take image prompts; the edit parts and trainers take none.
    """
    from service.adapters import BankedAdapters
    from service.adapters.bank import CONV_LAYERS

    model_dir = model_dir or settings.resolved_model_dir()
    engine = Engine.from_pretrained(model_dir, device=device or settings.device, components=components)
    if adapters:
        if loader is None:
            from service.adapters.loading import blob_loader

            loader = blob_loader(settings.adapters_path(), settings.request_adapters_path())
        BankedAdapters.attach(
            engine, loader, num_slots=settings.adapter_slots, max_rank=settings.adapter_max_rank, max_rows=max_rows,
            conv_target_modules=CONV_LAYERS[settings.adapter_conv_layers],
            host_cache_size=settings.adapter_host_cache, host_cache_bytes=settings.adapter_host_cache_bytes,
            registry=registry,
        )
    files = settings.image_prompt_files(model_dir) if image_prompts else None
    if files is not None:
        from service.image_prompt.served import ServedImagePrompts

        ServedImagePrompts.from_files(engine, *files)
    if unet_runtime:
        from service.compiled import configure_unet_runtime

        configure_unet_runtime(engine, settings.unet_runtime_options())
    return engine
