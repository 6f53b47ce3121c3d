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

# BASE_IMAGE: any Debian bookworm image. The registry's python image by default; where no registry
# is reachable, scripts/build-images.sh builds FROM a bookworm root filesystem it makes with
# mmdebstrap, which has no Python: Debian's python3 (3.11) is installed then (the first RUN).
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; fi \
 && python3 -m venv /opt/steerserve/venv
ENV PATH=/opt/steerserve/venv/bin:$PATH
# torch FIRST, from the CPU index: the package's plain `torch==2.13.0` requirement would otherwise
# resolve to PyPI's multi-GB CUDA build (as scripts/setup.sh does on the development machines).
# TORCH_INDEX_URL empty: pip's own configuration decides (scripts/build-images.sh mounts the host's,
# whose local wheel folder holds the CPU build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
WORKDIR /src
# Dependencies change less often than the code: they get a layer of their own, keyed on pyproject's
# and the client's dependency lists and the lock only, so a code change rebuilds in seconds. The
# exact versions of requirements.lock (torch==2.13.0 there is satisfied by 2.13.0+cpu).
COPY pyproject.toml requirements.lock ./
COPY clients/python/pyproject.toml clients/python/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(d for f in ('pyproject.toml', 'clients/python/pyproject.toml') \
      for d in tomllib.load(open(f, 'rb'))['project']['dependencies'] if not d.startswith('steerserve')))" > /tmp/deps.txt \
 && pip install -c requirements.lock -r /tmp/deps.txt
COPY README.md ./
COPY service/ service/
# The client package: the `steerserve` CLI (the entrypoint) calls through it.
COPY clients/python/ clients/python/
RUN pip install --no-deps . ./clients/python \
 && pip check \
 && python -c "import service.cli, service.gateway.server, service.triton.launcher" \
 && steerserve --help >/dev/null

FROM ${BASE_IMAGE}
# The venv's interpreter is the base image's python3: a base without one gets Debian's (no pip, no
# venv module: nothing installs at run time), and libpython3.11, which Debian's python3 does not
# bring but Triton's python-backend stub links (without it every model's stub fails to start and
# the server never turns ready: found on the first real build).
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 libpython3.11 ca-certificates \
      && rm -rf /var/lib/apt/lists/*; fi
# A named user with a fixed uid (matching the manifests' runAsUser): some libraries look the user up.
RUN groupadd --gid 10001 steerserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin steerserve
COPY --from=build /opt/steerserve/venv /opt/steerserve/venv
ENV PATH=/opt/steerserve/venv/bin:$PATH
# Every shared library the Triton server and its python-backend stub need is in the image.
RUN python -m service.triton.launcher --check
COPY model_repo/ /opt/steerserve/model_repo/
ENV PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    STEERSERVE_HOST=0.0.0.0
WORKDIR /tmp
USER 10001:10001
# gRPC API and Prometheus metrics (the CPU Triton, when run from this image: 8000-8002).
EXPOSE 50051 9464
ENTRYPOINT ["steerserve", "serve", "--backend", "triton"]
CMD ["--host", "0.0.0.0"]
