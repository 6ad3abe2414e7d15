#!/usr/bin/env bash
# The hospital containers for real, in one command: build the images with podman, run the
# compose federation (SuperLink, gateway, two hospitals) for 2 rounds, check it, tear it down.
#
#   . .venv/bin/activate && pip install -e '.[dev]'   # the project (make_certs, make_data) and podman-compose
#   sudo docker/e2e.sh [--keep-work] [--work DIR] [--rebuild] [--remove-images]
#
# As root, installs what is missing with apt: podman (runc runtime), mmdebstrap. podman-compose
# comes from the dev extras (pyproject.toml): Debian 12's 1.0.3 cannot start a service in
# another's network namespace (network_mode: service:...), which docker-compose.yml uses.
# What it checks and prints: docker/e2e/run.py. Same with Docker: docker/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "e2e.sh: installing ${missing[*]} (and podman's helpers) with apt"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap fuse-overlayfs \
            slirp4netns uidmap catatonit >/dev/null
    else
        echo "e2e.sh: missing ${missing[*]}: run as root (they are installed with apt) or install them" >&2
        exit 2
    fi
fi
pin=$(python -c 'import re, tomllib; d = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]; print(next(x for x in d if re.match(r"podman-compose==", x)))')
have=$(podman-compose version 2>/dev/null | sed -n 's/^podman-compose version //p' | head -1 || true)
if [ "podman-compose==${have}" != "${pin}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        python -m pip install -q "${pin}"
    else
        echo "e2e.sh: need ${pin} (found '${have:-none}'): activate the project's venv and pip install -e '.[dev]'" >&2
        exit 2
    fi
fi
exec python docker/e2e/run.py "$@"
