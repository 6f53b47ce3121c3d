"""What the Triton models in model_repo/ compute, as plain library code (no pb_utils, no gRPC).

Each `model_repo/<name>/1/model.py` reads its request with service/triton/wire.py, calls one of
these, and answers with wire.py again, so tests and benchmarks exercise the same code without a server.

- the `generate` model runs the one sampling loop (service.engine.sampling.generation) AND the
  UNet in one instance: its own engine, through a StepBatcher (service/engine/batching.py), many
  requests in flight on one event loop, their steps in shared UNet calls, no BLS per step (only
  the `triton_engine` runtime sends each shared UNet call on, to `unet_engine`).
- `TextEncode`, `UNetStep`, `VaeDecode`: the engine's parts, one call each, served as the shared
  `text_encoder`, `unet` and `vae_decode` models for the `edit` model, whose loops make each
  model call a BLS call to them (service/triton/bls.py). One `UNetStep` call runs ONE denoising
  step for any number of rows from different edits, each with its own latents, timestep, prompt
  embeddings and adapters (rows of the adapter bank), in a single UNet forward.
- `Personalize`: one training job; `EditWorker`: one edit, each model call where it can run.

A model instance is configured by Settings read from its environment (the same STEERSERVE_* names
the gateway reads; docs/triton.md): `instance_engine` builds its engine with service/serving.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from service.adapters import serialize_adapter
from service.adapters.loading import blob_loader, request_adapter
from service.config import Settings
from service.engine.pipeline import COMPONENTS, AdapterUse, Engine, flush_denormals
from service.engine.priority import ComputeShare, default_units, open_serving_state, serving_state_folder
from service.personalize import FrozenBase, TrainingSpec, train
from service.serving import build_engine

from .wire import StepSample

if TYPE_CHECKING:
    from service.edit import EditSpec

Rows = Sequence[Sequence[AdapterUse]]


# -- a model instance ------------------------------------------------------------------------------


def instance_settings() -> Settings:
    """This instance's settings (its environment), with torch's intra-op threads set from them:
    every instance is its own process."""
    _interpreter_locale()
    settings = Settings()
    torch.set_num_threads(settings.torch_threads)
    return settings


def _interpreter_locale() -> None:
    """What a normal Python start does and the stub's embedded interpreter does not: LC_CTYPE from
    the environment, and C.UTF-8 where that is C/POSIX (PEP 538). Without it open() reads files as
    ASCII, and torch.compile's inductor, reading its own UTF-8 templates, fails (UnicodeDecodeError):
    `compile` then dropped out of the `auto` runtime choice on Triton."""
    import locale

    try:
        locale.setlocale(locale.LC_CTYPE, "")
    except locale.Error:
        pass
    if locale.getpreferredencoding(False).upper().replace("-", "") != "UTF8":
        for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
            try:
                locale.setlocale(locale.LC_CTYPE, name)
                return
            except locale.Error:
                continue


def instance_device(args: dict) -> str:
    """The torch device of a model instance, from the `args` Triton passes to initialize()."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


def model_dir(settings: Settings) -> Path:
    if settings.model_dir is None:
        raise RuntimeError("STEERSERVE_MODEL_DIR is not set; the launcher passes the diffusers model folder in it")
    return Path(settings.model_dir)


def instance_engine(settings: Settings, args: dict, max_rows: int, adapters: bool = True, unet_runtime: bool = False,
                    registry=None, components: Sequence[str] = COMPONENTS, image_prompts: bool = False) -> Engine:
    """The engine of one model instance (on its instance_group's device), with an adapter bank when
    `adapters` and an adapter folder is configured; the UNet runtime warmed up when `unet_runtime`
    (the models whose UNet runs every step: `generate` for its own loops, `unet` for the edits').
    `components`: the models whose weights it needs (`text_encoder` and `vae_decode` load one each:
    six full copies of an SD-size model would not fit a small machine's memory). `image_prompts`:
    install the model's IP-Adapter (settings.image_prompt_files()): `generate`, whose own loops take
    image prompts from the wire; the edit parts take none."""
    return build_engine(settings, max_rows, device=instance_device(args), model_dir=model_dir(settings),
                        adapters=adapters and settings.adapter_dir is not None, unet_runtime=unet_runtime,
                        registry=registry, components=components, image_prompts=image_prompts)


def instance_share(settings: Settings, args: dict) -> ComputeShare:
    """This instance's side of "serving first, training in the gaps" (service/engine/priority.py):
    the server's serving instances publish their busy units to the training instances through
    ServingState files (one folder per Triton server)."""
    state = open_serving_state(serving_state_folder(settings.serving_state_dir)) if settings.serving_first else None
    return ComputeShare(settings.compute_units or default_units(instance_device(args)),
                        serving_units=settings.torch_threads, training_units=settings.torch_threads,
                        enabled=settings.serving_first, state=state)


# -- the parts ---------------------------------------------------------------------------------------


class TextEncode:
    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, prompts: Sequence[str], rows: Rows, size: tuple[int, int] | None = None) -> np.ndarray:
        flush_denormals()
        return self.engine.encode_prompts(list(prompts), list(rows), size).float().cpu().numpy()


class UNetStep:
    """One denoising step for the rows of any edits (the `unet` model, over BLS): one UNet forward
    per latent shape.

    Engine.predict_noise runs each group, so a single-request call computes exactly what the
    in-process engine computes. Guidance is left to the caller (it is per request); returns per
    request its rows' noise [m, C, h, w].
    """

    def __init__(self, engine: Engine):
        self.engine = engine

    @torch.no_grad()
    def __call__(self, samples: Sequence[StepSample]) -> list[np.ndarray]:
        flush_denormals()
        out: list[np.ndarray | None] = [None] * len(samples)
        # The dynamic batcher only groups equal shapes, but a call must not fail if it ever mixes them.
        by_shape: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            by_shape.setdefault((s.latents.shape[1:], s.embeds.shape[1:]), []).append(i)
        for indices in by_shape.values():
            group = [samples[i] for i in indices]
            dev, dt = self.engine.device, self.engine.dtype
            latents = torch.from_numpy(np.concatenate([s.latents for s in group])).to(dev, dt)
            t = torch.from_numpy(np.concatenate([s.timesteps for s in group]).astype(np.float32)).to(dev)
            embeds = torch.from_numpy(np.concatenate([s.embeds for s in group])).to(dev, dt)
            rows = [row for s in group for row in s.adapters]
            noise = self.engine.predict_noise(latents, t, embeds, rows).float().cpu().numpy()
            start = 0
            for i, s in zip(indices, group):
                m = s.latents.shape[0]
                out[i] = noise[start : start + m]
                start += m
        return out  # type: ignore[return-value]


class VaeDecode:
    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        return self.engine.decode_array(torch.from_numpy(latents))  # [n, H, W, 3] uint8


class Personalize:
    """What the `personalize` model runs: one training job on this instance's private base model,
    reporting through callbacks that the model turns into streamed responses."""

    def __init__(self, model_dir: Path, device: str):
        self.base = FrozenBase.from_pretrained(model_dir, device=device)

    def __call__(self, spec: TrainingSpec, resume: bytes | None, progress) -> bytes:
        flush_denormals()
        return serialize_adapter(train(self.base, spec, progress, resume))


class EditWorker:
    """What the `edit` model runs: the edit loop (service.edit, the same one the in-process backend
    runs), each model call executed where it can be.

    - `Encode`, `Denoise`, `Decode` go to the shared models through `remote` (BLS), so every DDS
      iteration, DreamSteerer's included, batches with the other edits' rows in the `unet` model
      (Generate's steps do not go there: the `generate` model runs its UNet itself);
    - DreamSteerer's workbench calls run on this instance's private model copy (the only model this
      instance holds); the steered copy they produce is written for the request to the server's
      request-adapter folder (service.adapters.loading.request_adapter), where the shared models
      load it like a stored adapter, and removed when the edit ends;
    - `EncodeImage` runs here, on the private copy's VAE (one encoder pass).
    """

    def __init__(self, workbench, adapter_dir: Path | None, request_dir: Path | None,
                 prepare=lambda adapter: adapter):
        """`request_dir`: Settings.request_adapters_path() (where the steered copies go)."""
        self.workbench = workbench
        self.request_dir = request_dir
        self.load = blob_loader(adapter_dir, request_dir) if adapter_dir is not None else None
        self.prepare = prepare  # checks a stored adapter against the served model's layers

    @property
    def facts(self):
        return self.workbench.base.engine.facts

    async def __call__(self, spec: "EditSpec", remote, should_stop, progress):
        import asyncio
        import contextlib

        from service.edit import WORKBENCH_CALLS, EditRefused, Steer, editor
        from service.edit.spec import throttled
        from service.engine.sampling import EncodeImage, run_async

        progress = throttled(progress)
        loop = editor(spec)(spec, self.facts, should_stop, progress)
        stored: dict[str, object] = {}  # the request's adapter, read once for its workbench calls
        with contextlib.ExitStack() as request:
            async def execute(call):
                if isinstance(call, WORKBENCH_CALLS):
                    if self.load is None:
                        raise EditRefused("DreamSteerer needs the shared adapter folder (STEERSERVE_ADAPTER_DIR)")
                    key = call.adapter.key
                    if key not in stored:
                        stored[key] = await asyncio.to_thread(lambda: self.prepare(self.load(key)))
                    result = await asyncio.to_thread(self.workbench.execute, call, stored[key], should_stop, progress)
                    if isinstance(call, Steer):
                        steered, losses = result
                        return AdapterUse(request.enter_context(request_adapter(steered, self.request_dir))), losses
                    return result
                if isinstance(call, EncodeImage):
                    return await asyncio.to_thread(self._encode_image, call)
                return await remote(call)

            return await run_async(loop, execute)

    def _encode_image(self, call):
        """The source's latent on the private copy's VAE, as CPU float32 (the loop's tensors also
        travel to the shared models over BLS)."""
        from PIL import Image

        flush_denormals()
        with self.workbench.base.lock:
            return self.workbench.base.engine.encode_image(Image.fromarray(call.image)).float().cpu()
