#!/usr/bin/env bash
# Start a Docker engine where no systemd does (a container, a CI runner, a bare VM): containerd,
# then dockerd on it. Idempotent: does nothing if an engine already answers. Needs root and
# Debian's docker.io (apt-get install -y docker.io). Logs: /var/log/regmix/.
set -euo pipefail
if docker info >/dev/null 2>&1; then echo "docker engine already running"; exit 0; fi
command -v dockerd >/dev/null || { echo "no dockerd: apt-get install -y docker.io" >&2; exit 1; }
mkdir -p /var/log/regmix
pgrep -x containerd >/dev/null || (setsid containerd > /var/log/regmix/containerd.log 2>&1 &)
for _ in $(seq 30); do [ -S /run/containerd/containerd.sock ] && break; sleep 1; done
(setsid dockerd --containerd=/run/containerd/containerd.sock --storage-driver=overlay2 \
   > /var/log/regmix/dockerd.log 2>&1 &)
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then echo "docker engine running"; exit 0; fi
  sleep 1
done
echo "the docker engine did not start: see /var/log/regmix/dockerd.log" >&2
exit 1
