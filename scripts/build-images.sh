#!/usr/bin/env bash
# Builds SteerServe's CPU images with podman (docker where podman is absent):
#   localhost/steerserve-gateway:<version>   the gateway; the CPU overlay runs its Triton from it too
#                                            (python -m service.triton.launcher: nvidia-pytriton's
#                                            server binary, model_repo's KIND_CPU configs)
#
#   bash scripts/build-images.sh                      # base: a Debian bookworm rootfs (mmdebstrap)
#   BASE_IMAGE=python:3.11.13-slim-bookworm bash scripts/build-images.sh   # base: the registry's
#   bash scripts/build-images.sh --postgres-standin   # + tests/containers' PostgreSQL stand-in for
#                                                     #   the overlay's registry image (tests only)
#
# The Dockerfiles' own default base is the registry's python image (real deployments). Here no
# registry is reachable, so by default the base is a minbase bookworm root filesystem made with
# mmdebstrap (Debian's registry is reachable) and imported as localhost/steerserve-base:bookworm-<digest>:
# the tar is kept per machine (~/.cache/steerserve/images, STEERSERVE_IMAGE_CACHE) and reused, so the
# base, and with it every cached layer above it, changes only when the tar does (--refresh-base makes
# a new one): a fresh clone on the same machine rebuilds only the layers whose inputs changed (the
# dependency layer is keyed on the dependency lists and requirements.lock, the code layer on the code).
#
# pip inside the build uses this machine's pip configuration (`pip config list`: the files and the
# PIP_* environment): it is written to a pip.conf mounted into the build's RUN steps, with every
# local path it names (wheel folders, file:// indexes, constraints, the CA bundle) mounted read-only
# at the same path. TORCH_INDEX_URL is then left empty, so pip's configuration decides where torch
# comes from (here: the local wheel folder's CPU build).
#
# Prints one line per image: name, size, build seconds. Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

refresh_base=0 postgres_standin=0
for arg in "$@"; do
  case "$arg" in
    --refresh-base) refresh_base=1 ;;
    --postgres-standin) postgres_standin=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

engine=${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$engine" ] || { echo "neither podman nor docker found (scripts/setup.sh --test installs podman)" >&2; exit 1; }
python=${PYTHON:-python3}
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
work=var/images                                            # this checkout's pip.conf
cache=${STEERSERVE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/steerserve/images}  # the machine's base
mkdir -p "$work" "$cache"

# -- the base ----------------------------------------------------------------------------------
base=${BASE_IMAGE:-}
if [ -z "$base" ]; then
  rootfs=$cache/bookworm-rootfs.tar
  if [ "$refresh_base" = 1 ] || [ ! -s "$rootfs" ]; then
    command -v mmdebstrap >/dev/null || { echo "mmdebstrap not found (scripts/setup.sh --test installs it)" >&2; exit 1; }
    # The name ends in .tar: mmdebstrap picks its output format by the extension. A partial file
    # of its own per run: two checkouts building at once never read each other's half-written tar.
    partial=$cache/partial-$$.tar
    mmdebstrap --quiet --variant=minbase bookworm "$partial"
    mv "$partial" "$rootfs"
  fi
  digest=$(sha256sum "$rootfs" | cut -c1-12)
  base=localhost/steerserve-base:bookworm-$digest
  if ! "$engine" image exists "$base" 2>/dev/null; then
    # Without PATH in the image config nothing finds `sh` (a plain rootfs has no ENV).
    "$engine" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      "$rootfs" "$base" >/dev/null
  fi
fi

# -- pip's configuration, for the build's RUN steps -------------------------------------------
# Local paths are mounted under /run/host-pip (not at their own paths: the CA bundle's own path is
# where the image's ca-certificates package writes) and pip.conf names them there.
pipconf=$work/pip.conf
host=/run/host-pip
mounts=()
{
  echo "[global]"
  # `pip config list` prints global.KEY='VALUE' and :env:.KEY='VALUE' (PIP_* variables); the
  # environment wins, as it does for pip itself.
  "$python" -m pip config list 2>/dev/null | sed -n "s/^global\.\([a-z-]*\)='\(.*\)'$/\1 \2/p; s/^:env:\.\([a-z-]*\)='\(.*\)'$/\1 \2/p" \
    | awk '{key=$1; $1=""; sub(/^ /, ""); value[key]=$0; if (!(key in seen)) {order[++n]=key; seen[key]=1}}
           END {for (i=1; i<=n; i++) print order[i] " = " value[order[i]]}' \
    | sed -E "s#(^| |=)(file://)?/#\1\2$host/#g"
} > "$pipconf"
while read -r path; do
  [ -e "$path" ] && mounts+=(--volume "$path:$host$path:ro")
done < <(sed -n 's/^[a-z-]* = //p' "$pipconf" | tr ' ' '\n' | sed "s#^file://##; s#^$host##" | grep '^/' \
          | sed 's#/simple/*$##' | sort -u)  # an index's pages link to files beside simple/
mounts+=(--volume "$PWD/$pipconf:/etc/pip.conf:ro")

# -- the images ----------------------------------------------------------------------------------
build() {  # name dockerfile [context]
  local name=$1 file=$2 context=${3:-.} started=$SECONDS
  "$engine" build --file "$file" --tag "$name" \
    --build-arg BASE_IMAGE="$base" --build-arg TORCH_INDEX_URL= "${mounts[@]}" "$context" >&2
  local size
  size=$("$engine" image inspect --format '{{.Size}}' "$name")
  echo "$name $size $((SECONDS - started))"
}

build "localhost/steerserve-gateway:$version" deploy/images/gateway.Dockerfile
if [ "$postgres_standin" = 1 ]; then
  build localhost/steerserve-test-postgres:15 tests/containers/postgres-standin.Dockerfile tests/containers
fi
