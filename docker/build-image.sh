#!/usr/bin/env bash
# Build the agent node image peermesh-node:latest with no network inside
# `docker build` (this machine has no container registry):
#   1. build wheels for peermesh and all its dependencies on the host
#      (dist/wheels/ and dist/wheels/project/, needs PyPI);
#   2. build the base image peermesh-base:bookworm with debootstrap
#      (docker/build-base.sh, needs a Debian mirror and root);
#   3. docker build -f docker/Dockerfile, installing only those wheels.
#
# Reuse: the inputs (pyproject.toml, README.md, mesh/, agent_runtime/, docker/,
# .dockerignore, the base) are hashed; if peermesh-node:<hash12> exists, all of
# the above is skipped and peermesh-node:latest is pointed at it. Dependency
# versions are not pinned: they are resolved when pyproject.toml changes, and
# kept in dist/wheels/ until then; PEERMESH_FORCE=1 resolves them again.
#
# Usage: docker/build-image.sh         (from anywhere; run as root)
# Environment:
#   PEERMESH_FORCE=1       rebuild even if the image for this hash exists, with
#                          freshly resolved dependencies (the base image is
#                          kept: see PEERMESH_FORCE_BASE in build-base.sh)
#   PEERMESH_KEEP=3        how many peermesh-node:<hash12> tags to keep; older
#                          ones are removed after a build
#   PEERMESH_BASE=IMAGE    base image (default peermesh-base:bookworm, built
#                          here); e.g. python:3.11-slim where a registry exists
#   PYTHON=python3         host interpreter for building wheels (must be 3.11,
#                          the Python of the image; default: the project's
#                          .venv/bin/python if scripts/setup made one, else python3)
set -euo pipefail

IMAGE=peermesh-node
DEFAULT_BASE=peermesh-base:bookworm
BASE=${PEERMESH_BASE:-$DEFAULT_BASE}
PYTHON=${PYTHON:-}

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
start=$SECONDS
if [[ -z "$PYTHON" ]]; then
    # The venv has pip for sure; a bare system python3 may not.
    if [[ -x .venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi

# Hash of every input file (path and content, in a stable order) plus the base.
input_hash() {
    local inputs=() p
    for p in pyproject.toml README.md mesh agent_runtime docker .dockerignore; do
        [[ -e "$p" ]] && inputs+=("$p")
    done
    {
        echo "base=$BASE"
        find "${inputs[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.py[co]' \
            -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
    } | sha256sum | cut -c1-64
}

hash=$(input_hash)
tag=$IMAGE:${hash:0:12}

# One build at a time per work tree: concurrent runs would trample dist/wheels.
mkdir -p dist
exec 9>dist/.build-image.lock
if ! flock -n 9; then
    log "another build is running in $repo, waiting for it"
    flock 9
fi

if [[ "${PEERMESH_FORCE:-0}" != 1 ]] && docker image inspect "$tag" >/dev/null 2>&1; then
    docker tag "$tag" "$IMAGE:latest"
    log "up to date: $tag (tagged $IMAGE:latest), nothing to do ($((SECONDS - start))s)"
    exit 0
fi
log "building $tag"

# 1. Wheels. The image's Python is bookworm's 3.11, so the host must build for
# CPython 3.11 too (binary wheels are cp311-tagged).
py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$py_version" == 3.11 ]] \
    || die "$PYTHON is Python $py_version; the image has 3.11: set PYTHON=python3.11"
# The dependency wheels are resolved again only when pyproject.toml changes (or
# with PEERMESH_FORCE=1): that is slow (PyPI round trips), and keeping the same
# set lets docker reuse its cached dependency layers. The project wheel goes to
# a folder of its own so that the Dockerfile can install it separately.
deps_key=$( { cat pyproject.toml; echo "python=$py_version"; } | sha256sum | cut -c1-64)
step=$SECONDS
if [[ "${PEERMESH_FORCE:-0}" != 1 && -f dist/wheels/.deps-key \
        && "$(cat dist/wheels/.deps-key)" == "$deps_key" ]]; then
    log "dependencies unchanged: building only the peermesh wheel ($PYTHON $py_version)"
    rm -rf dist/wheels/project
    "$PYTHON" -m pip wheel --quiet --progress-bar off --no-deps \
        --wheel-dir dist/wheels/project .
else
    log "resolving and building all wheels into dist/wheels/ ($PYTHON $py_version)"
    rm -rf dist/wheels
    mkdir -p dist/wheels/project
    "$PYTHON" -m pip wheel --quiet --progress-bar off --wheel-dir dist/wheels .
    mv dist/wheels/peermesh-*.whl dist/wheels/project/
    echo "$deps_key" >dist/wheels/.deps-key
fi
log "$(find dist/wheels -name '*.whl' | wc -l) wheels, $(du -sh dist/wheels | cut -f1)," \
    "in $((SECONDS - step))s"

# 2. Base image (a no-op when it is already built).
if [[ "$BASE" == "$DEFAULT_BASE" ]]; then
    docker/build-base.sh
fi

# 3. The image. DOCKER_BUILDKIT=0: the engine is 20.10 and buildx is not
# installed; the classic builder is what runs here, say so explicitly. Its
# output (with a deprecation notice) is only shown if the build fails.
log "docker build (base $BASE)"
step=$SECONDS
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
if ! DOCKER_BUILDKIT=0 docker build --quiet \
        --build-arg BASE="$BASE" \
        --label peermesh.node.hash="$hash" \
        -t "$tag" -t "$IMAGE:latest" \
        -f docker/Dockerfile . >/dev/null 2>"$build_log"; then
    cat "$build_log" >&2
    die "docker build failed"
fi
size=$(docker image inspect "$tag" --format '{{.Size}}')
log "built $tag and $IMAGE:latest, $((size / 1000000)) MB," \
    "docker build $((SECONDS - step))s"

# Every build with new dependencies leaves a ~350 MB venv layer behind: keep
# only the newest few hash tags (`docker images` lists newest first). Layers
# that newer images still use stay.
keep=${PEERMESH_KEEP:-3}
docker images "$IMAGE" --format '{{.Tag}}' | { grep -E '^[0-9a-f]{12}$' || true; } \
    | tail -n +"$((keep + 1))" | while read -r old; do
        log "removing old image $IMAGE:$old"
        docker rmi "$IMAGE:$old" >/dev/null || true
    done
log "done in $((SECONDS - start))s"
