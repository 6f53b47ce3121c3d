# syntax=docker/dockerfile:1
# The GPU model server: NVIDIA's Triton image (the server with its TensorRT and python backends,
# CUDA, trtexec) plus our package, model_repo/ and the engine build script. Weights are NOT in the
# image: they come from the models volume (STEERSERVE_MODEL_DIR). Build from the repository root:
#   docker build -f deploy/images/triton.Dockerfile -t REGISTRY/steerserve-triton:0.1.0 .
#
# Why 24.12: our package requires Python >=3.11,<3.13, and the python backend's stub embeds the
# image's system Python. NVIDIA's release notes for Triton 24.12 (Triton 2.53) list "Ubuntu 24.04
# including Python 3.12" among the container's contents (docs.nvidia.com, Triton Inference Server
# Release 24.12); releases before the move to Ubuntu 24.04 ship 22.04 with Python 3.10, which our
# package does not support. 24.12 is based on CUDA 12.6.3 (driver >= 560, or a data-center
# driver branch listed there). Moving to a later tag: check its release notes still say Python 3.12.
# Pin the digest too where policy asks (nvcr.io/nvidia/tritonserver:24.12-py3@sha256:...).
#
# Why not the launcher's server: service.triton.launcher runs the tritonserver binary inside the
# nvidia-pytriton wheel (2.51, python backend only). On GPUs we need the TensorRT backend for
# unet_engine, so the Deployment runs /opt/tritonserver/bin/tritonserver directly (overlays/gpu).

FROM nvcr.io/nvidia/tritonserver:24.12-py3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04's Python is externally managed (PEP 668): our packages go into a venv of the system
# Python 3.12, which the python backend stub finds through PYTHONPATH (set below).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/steerserve/venv
ENV PATH=/opt/steerserve/venv/bin:$PATH
# torch FIRST: PyPI's torch 2.13.0 for Linux x86_64 is the CUDA build (it brings its own CUDA
# runtime libraries as nvidia-* wheels; the node's driver must support that CUDA version). For a
# CPU-only build of this image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
RUN pip install -c requirements.lock . ./clients/python \
 && python -c "import service.cli, service.gateway.server, service.triton.launcher" \
 && steerserve --help >/dev/null# requirements.lock was resolved on Python 3.11; every pin in it also publishes 3.12 wheels as far
# as we know, but this build has not been run (no Docker daemon where it was written).
RUN pip install -c requirements.lock . ./clients/python && rm -rf /src
COPY model_repo/ /opt/steerserve/model_repo/
COPY deploy/tensorrt/build_unet_plan.sh /opt/steerserve/deploy/tensorrt/build_unet_plan.sh
# The python backend stub runs the system interpreter: give it the venv's packages (service,
# torch, diffusers, ...). HOME on the writable /tmp emptyDir (root filesystem is read-only).
ENV PYTHONPATH=/opt/steerserve/venv/lib/python3.12/site-packages \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --gid 10001 steerserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin steerserve \
 && chmod 0755 /opt/steerserve/deploy/tensorrt/build_unet_plan.sh
WORKDIR /tmp
USER 10001:10001
# Triton: HTTP (health), gRPC (the gateway), metrics.
EXPOSE 8000 8001 8002
ENTRYPOINT ["/opt/tritonserver/bin/tritonserver"]
CMD ["--model-repository=/opt/steerserve/model_repo", "--model-control-mode=explicit", "--load-model=*", "--strict-readiness=true"]
