#!/usr/bin/env bash
# Build the offline base image for the `cpu` flavour and fetch the wheels it installs, with no registry:
#   1. qa-runner-base:bookworm-2 from Debian's packages (debootstrap + docker import); skipped when it exists.
#      Python 3.11 and libnuma1 (vLLM's CPU kernels link it); the -2 says which package set it has.
#   2. cp311 wheels for images/cpu.yaml's packages into images/.wheels/ (pip download on the host).
#   3. with --build: the cpu image itself (python -m runner.images build cpu), skipped when its tag exists.
# Usage: images/local-base.sh [--build]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-$root/.venv/bin/python}"
base_image="${BASE_IMAGE:-qa-runner-base:bookworm-2}"
suite="${DEBIAN_SUITE:-bookworm}"

debian_mirror() {
    # The Debian mirror this machine's apt already uses (deb822 `URIs:` or one-line `deb URL SUITE`).
    local m
    m="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)"
    if [ -z "$m" ]; then
        m="$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -E '/debian/?$' | head -n1 || true)"
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

if docker image inspect "$base_image" >/dev/null 2>&1; then
    echo "local-base: $base_image exists"
else
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d /tmp/qa-runner-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    echo "local-base: debootstrap $suite from $mirror (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,libnuma1 "$suite" "$rootfs" "$mirror" >/tmp/qa-runner-debootstrap.log 2>&1 \
        || { tail -n 30 /tmp/qa-runner-debootstrap.log >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' - "$base_image" >/dev/null
    echo "local-base: imported $base_image"
fi

# Wheels the cpu image installs offline (the list comes from images/cpu.yaml).
"$python" -m runner.images wheels cpu

if [ "${1:-}" = "--build" ]; then
    "$python" -m runner.images build cpu
fi
