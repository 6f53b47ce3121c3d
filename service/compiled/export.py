"""Export the serving UNet's graph ahead of time (deploy's engine-build step).

    STEERSERVE_MODEL_DIR=/weights/sd15 STEERSERVE_COMPILED_DIR=/engines/onnx \\
        python -m service.compiled.export --max-rows 128 --device cuda      # prints the .onnx path

The engine and bank are built exactly as Triton's `unet` model builds them (service/serving.py, from
the same settings: STEERSERVE_ADAPTER_SLOTS, STEERSERVE_ADAPTER_MAX_RANK; --max-rows = its
max_batch_size), so the graph lands under the key that model computes at start and is found there
instead of exported again.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from service.adapters.loading import blob_loader
from service.config import Settings
from service.serving import build_engine

from .onnx_export import exported_unet, graph_shape


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Export the banked UNet to ONNX (bank as inputs) into the cache.")
    parser.add_argument("--max-rows", type=int, required=True, help="the unet model's max_batch_size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the device the unet model runs on)")
    args = parser.parse_args(argv)
    settings = Settings()
    if settings.compiled_dir is None:
        parser.error("set STEERSERVE_COMPILED_DIR to the folder the unet model reads graphs from")
    if settings.model_dir is None:
        parser.error("set STEERSERVE_MODEL_DIR to the diffusers folder the unet model serves")
    # The bank's layout matters to the graph, not its contents: any adapter folder will do. A private
    # metrics registry: nothing is served from here (and a test calling main() must not claim the
    # process's global metric names).
    engine = build_engine(settings, args.max_rows, device="cuda:0" if args.device == "cuda" else "cpu",
                          loader=blob_loader(Path(tempfile.mkdtemp())), unet_runtime=False,
                          registry=CollectorRegistry())
    print(exported_unet(engine.unet, engine.adapters.bank, graph_shape(engine, args.max_rows), settings.compiled_path()))


if __name__ == "__main__":
    main()
