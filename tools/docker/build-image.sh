#!/usr/bin/env bash
# Builds the kmsd node image (deploy/Dockerfile) from this checkout:
# starts dockerd and builds the base image first when needed (tools/docker/*.sh).
#
#   tools/docker/build-image.sh              # -> kmsd:latest (KMSD_IMAGE to change it)
#
# The build context is only what the image needs (pyproject.toml, README.md, kmsd/,
# clients/python/), sent as a tar stream, so .venv, .git, node_modules and caches never
# reach the daemon and do not invalidate the layer cache. Re-runs with unchanged
# sources take seconds. Network: the Debian mirror (apt) and PyPI (pip), through
# `--network host`.
set -euo pipefail

log() { printf 'build-image: %s\n' "$*" >&2; }

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
image="${KMSD_IMAGE:-kmsd:latest}"
# shellcheck disable=SC1091
release="${KMSD_RELEASE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}"

"$here/start-dockerd.sh"
"$here/build-base-image.sh"

log "docker build -> $image (base kmsd-base:$release)"
cd "$repo"
# The legacy builder: it needs no buildx plugin, and supports --network host.
tar -c --owner=0 --group=0 --mtime='2000-01-01 00:00:00Z' --sort=name \
    --exclude='__pycache__' --exclude='*.pyc' --exclude='*.egg-info' \
    pyproject.toml README.md kmsd clients/python deploy/Dockerfile \
  | DOCKER_BUILDKIT=0 docker build --network host \
      --build-arg "BASE_IMAGE=kmsd-base:$release" \
      -f deploy/Dockerfile -t "$image" - >&2
# Earlier builds of kmsd images that lost their tag to this one (only those: label io.kmsd.image).
docker image prune -f --filter label=io.kmsd.image=node >/dev/null
log "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
