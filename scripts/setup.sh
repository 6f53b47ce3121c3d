#!/usr/bin/env bash
# Creates .venv with everything the service and its tests need, on a fresh machine.
#   scripts/setup.sh          # service
#   scripts/setup.sh --test   # + test tools (pytest; prometheus, kubectl, postgresql, openssl from apt; buf and the
#                             #   Node example's packages from npm)
# torch is installed FIRST and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check torch==2.13.0
# The service and, beside it, its Python client package (clients/python: the CLI calls through it).
$PIP install -q --disable-pip-version-check -c requirements.lock -e ".[test]" -e clients/python

if [ "${1:-}" = "--test" ]; then
  # Real servers the tests start on loopback (Debian packages): promtool + prometheus lint and
  # evaluate our metrics and rules, kubectl builds the kustomize overlays, PostgreSQL backs the
  # multi-replica store tests, openssl makes tests/test_tls.py's certificates.
  missing=()
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # Real containers (tests/test_containers.py, scripts/build-images.sh): podman builds and runs the
  # images and `podman kube play`s the CPU overlay; runc, because crun fails on these machines
  # (cgroups in hybrid mode); mmdebstrap makes the Debian base where no registry can be pulled.
  # podman with its Recommends, as checked (netavark + aardvark-dns: pod networks and their DNS;
  # catatonit: the pods' infra image), so it is installed apart from the rest below.
  containers=()
  for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null 2>&1 || containers+=("$tool"); done
  if [ $((${#missing[@]} + ${#containers[@]})) -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq >/dev/null
      if [ ${#missing[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
      fi
      if [ ${#containers[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${containers[@]}" >/dev/null
      fi
    else
      echo "warning: ${missing[*]} ${containers[*]} not found and cannot be installed (need root + apt); their tests will fail" >&2
    fi
  fi
  # podman's settings for this machine (../shared/notes/environment.md): runc, and container ulimits
  # no higher than the machine's own (raising them is refused here). A drop-in of our own, so an
  # administrator's containers.conf stays as it is.
  if [ "$(id -u)" = 0 ] && command -v podman >/dev/null 2>&1 && [ ! -e /etc/containers/containers.conf.d/50-steerserve.conf ]; then
    mkdir -p /etc/containers/containers.conf.d
    cat > /etc/containers/containers.conf.d/50-steerserve.conf <<'CONF'
# Written by SteerServe's scripts/setup.sh --test: crun fails on these machines; runc works.
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
runtime = "runc"
CONF
  fi
  # buf lints the proto and refuses breaking changes against the last released API
  # (tests/test_proto_buf.py). From npm (the binary comes in a platform package such as
  # @bufbuild/buf-linux-x64) into var/tools/ (gitignored); pinned, so that a new buf release
  # adding lint or breaking rules cannot fail CI on its own. Skipped when that version is there.
  BUF_VERSION=1.75.0
  if [ "$(var/tools/node_modules/.bin/buf --version 2>/dev/null)" != "$BUF_VERSION" ]; then
    if command -v npm >/dev/null 2>&1; then
      npm install --prefix var/tools --no-audit --no-fund --silent --save-exact "@bufbuild/buf@$BUF_VERSION"
    else
      echo "warning: npm not found, cannot install buf; tests/test_proto_buf.py will fail" >&2
    fi
  fi
  # The Node example's packages (examples/node, locked by its package-lock.json), which
  # tests/test_examples.py runs against a live gateway.
  if [ ! -d examples/node/node_modules/@grpc/grpc-js ] && command -v npm >/dev/null 2>&1; then
    npm ci --prefix examples/node --no-audit --no-fund --silent
  fi
fi
