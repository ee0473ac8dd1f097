#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's docker.io (and debootstrap, used to build the
# offline base image) when missing, start dockerd in the background when `docker info` fails, wait for it.
set -euo pipefail

timeout_s="${DOCKER_UP_TIMEOUT:-60}"
log="${DOCKERD_LOG:-/var/log/dockerd.log}"

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
    echo "docker-up: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

if docker info >/dev/null 2>&1; then
    echo "docker-up: engine already answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
    exit 0
fi

echo "docker-up: starting dockerd (log: $log)"
nohup dockerd >"$log" 2>&1 </dev/null &
echo $! >/var/run/docker-up.pid

for _ in $(seq 1 "$timeout_s"); do
    if docker info >/dev/null 2>&1; then
        echo "docker-up: engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
        exit 0
    fi
    sleep 1
done
echo "docker-up: dockerd did not answer within ${timeout_s}s; last lines of $log:" >&2
tail -n 20 "$log" >&2 || true
exit 1
