# syntax=docker/dockerfile:1
# The gateway image: `steerserve serve --backend triton` against an external Triton
# (STEERSERVE_TRITON_URL). The CPU overlay also runs its Triton from this image
# (`python -m service.triton.launcher`: the server binary nvidia-pytriton carries, KIND_CPU configs),
# which is why model_repo/ is in it. Build from the repository root:
#   docker build -f deploy/images/gateway.Dockerfile -t REGISTRY/steerserve-gateway:0.1.0 .
#
# Does the gateway need torch in triton mode? Yes: service/gateway/server.py imports
# service.engine.pipeline (torch, diffusers) at module level, and every adapter import is validated
# by adapter_checker (service/adapters/loading.py), which builds the served UNet and text encoder on
# torch's meta device to check the adapter against their exact layers. No weights are loaded and no
# GPU is used, so the CPU wheel is enough.
#
# Tags pinned; pin the digest too (python:3.11.13-slim-bookworm@sha256:...) where your registry
# policy asks for it: no registry was reachable where this was written to look it up.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/steerserve/venv
ENV PATH=/opt/steerserve/venv/bin:$PATH
# torch FIRST, from the CPU index: the package's plain `torch==2.13.0` requirement would otherwise
# resolve to PyPI's multi-GB CUDA build (as scripts/setup.sh does on the development machines).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
# Dependencies change less often than the code: pyproject + lock first, for the layer cache.
COPY pyproject.toml requirements.lock README.md ./
COPY service/ service/
# The exact versions of requirements.lock (torch==2.13.0 there is satisfied by 2.13.0+cpu).
RUN pip install -c requirements.lock . \
 && python -c "import service.gateway.server, service.triton.launcher"

FROM python:3.11.13-slim-bookworm
# A named user with a fixed uid (matching the manifests' runAsUser): some libraries look the user up.
RUN groupadd --gid 10001 steerserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin steerserve
COPY --from=build /opt/steerserve/venv /opt/steerserve/venv
COPY model_repo/ /opt/steerserve/model_repo/
ENV PATH=/opt/steerserve/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    STEERSERVE_HOST=0.0.0.0
WORKDIR /tmp
USER 10001:10001
# gRPC API and Prometheus metrics (the CPU Triton, when run from this image: 8000-8002).
EXPOSE 50051 9464
ENTRYPOINT ["steerserve", "serve", "--backend", "triton"]
CMD ["--host", "0.0.0.0"]
