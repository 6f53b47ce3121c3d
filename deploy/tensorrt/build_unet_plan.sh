#!/usr/bin/env bash
# Builds the `unet_engine` TensorRT plan: run it in the model-server image (NVIDIA's Triton image,
# which carries trtexec, plus our package), on the GPU model the plan will serve on, as an init
# container or a Job before Triton starts. NOT runnable on the development machines (no TensorRT).
#
#   STEERSERVE_MODEL_DIR=/weights/sd15 STEERSERVE_COMPILED_DIR=/engines/onnx ENGINE_REPO=/engines/repo \
#       deploy/tensorrt/build_unet_plan.sh
#
# 1. export the banked UNet to ONNX with the adapter bank as graph inputs, with the bank layout the
#    `unet` model will build (STEERSERVE_ADAPTER_SLOTS / _MAX_RANK, max rows = its max_batch_size);
# 2. write $ENGINE_REPO/unet_engine/config.pbtxt (platform tensorrt_plan, the graph's interface);
# 3. trtexec: a dynamic-batch profile over the per-row inputs, fp16, into .../unet_engine/1/model.plan.
# Triton then serves $ENGINE_REPO next to model_repo/ (two --model-repository flags) and the `unet`
# model runs with STEERSERVE_UNET_RUNTIME=triton_engine. One plan serves every adapter: adapters
# change the bank's input tensors, never the plan. Rebuild only for new base weights, a new bank
# layout, another GPU model or TensorRT version.
set -euo pipefail
: "${STEERSERVE_MODEL_DIR:?the diffusers model folder}"
: "${STEERSERVE_COMPILED_DIR:?where the ONNX export is cached (shared with the unet model)}"
: "${ENGINE_REPO:?the model repository folder to write unet_engine/ into}"
MAX_ROWS="${MAX_ROWS:-128}"         # model_repo/unet/configs/gpu.pbtxt max_batch_size
OPT_ROWS="${OPT_ROWS:-16}"          # the batch most steps run at (8 images with CFG)
PRECISION="${PRECISION:-fp16}"
TRTEXEC="${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}"

onnx="$(python -m service.compiled.export --max-rows "$MAX_ROWS" --device cuda | tail -n 1)"
echo "graph: $onnx"
cmd="$(python -m service.compiled.tensorrt --onnx "$onnx" --repo "$ENGINE_REPO" --opt-rows "$OPT_ROWS" \
        --precision "$PRECISION" --trtexec "$TRTEXEC")"
echo "$cmd"
eval "$cmd"
echo "built $ENGINE_REPO/unet_engine/1/model.plan"
