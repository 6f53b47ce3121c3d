"""Export the serving UNet's graph ahead of time (deploy's engine-build step).

    STEERSERVE_MODEL_DIR=/weights/sd15 STEERSERVE_COMPILED_DIR=/engines/onnx \\
        python -m service.compiled.export --max-rows 128 --device cuda      # prints the .onnx path

The engine and bank are built exactly as Triton's `unet` model builds them (same environment:
STEERSERVE_ADAPTER_SLOTS, STEERSERVE_ADAPTER_MAX_RANK; --max-rows = its max_batch_size), so the
graph lands under the key that model computes at start and is found there instead of exported again.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from prometheus_client import CollectorRegistry

from service.triton.library import ENV_ADAPTER_DIR, ENV_COMPILED_DIR, load_engine_from_env, runtime_options_from_env

from .onnx_export import exported_unet, graph_shape


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Export the banked UNet to ONNX (bank as inputs) into the cache.")
    parser.add_argument("--max-rows", type=int, required=True, help="the unet model's max_batch_size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the device the unet model runs on)")
    args = parser.parse_args(argv)
    # The bank is built only when an adapter folder is configured; its contents do not matter here.
    os.environ.setdefault(ENV_ADAPTER_DIR, tempfile.mkdtemp())
    instance = {"model_instance_kind": "GPU", "model_instance_device_id": "0"} if args.device == "cuda" else {}
    # A private metrics registry: nothing is served from here (and a test calling main() must not
    # claim the process's global metric names).
    engine = load_engine_from_env(instance, max_rows=args.max_rows, registry=CollectorRegistry())
    if not os.environ.get(ENV_COMPILED_DIR):
        parser.error(f"set {ENV_COMPILED_DIR} to the folder the unet model reads graphs from")
    cache_dir = runtime_options_from_env().cache_dir
    print(exported_unet(engine.unet, engine.adapters.bank, graph_shape(engine, args.max_rows), cache_dir))


if __name__ == "__main__":
    main()
