#!/usr/bin/env bash
# Bring up a single-node Slurm cluster on this machine (munge + slurmctld + slurmd, as root).
# Idempotent: a second call finds everything running and only checks that the node is idle.
# Usage: .ci/slurm-up.sh            (env: SLURM_UP_TIMEOUT=60 seconds to wait for the node)
set -euo pipefail

timeout_s=${SLURM_UP_TIMEOUT:-60}
conf=/etc/slurm/slurm.conf
log() { echo "slurm-up: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (slurmctld/slurmd and munged are started here)"
  exit 1
fi

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
  || ! command -v sbatch >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# 2. munge: key, then the daemon as the munge user
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  install -d -o munge -g munge -m 700 /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  su -s /bin/sh munge -c "/usr/sbin/munged --force"
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n </dev/null | unmunge >/dev/null || { log "munged does not answer"; exit 1; }
fi

# 3. slurm.conf: written when missing, or when this script wrote it for another host name (a new CI machine);
#    a second call changes nothing, and a site's own slurm.conf is never touched.
host=$(hostname -s)
if [ ! -s "$conf" ] || { grep -q '^# Single-node cluster for tests' "$conf" && ! grep -q "^NodeName=$host " "$conf"; }; then
  log "writing $conf"
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  mem_mb=$((mem_mb - 1024))
  install -d /etc/slurm
  tmp=$(mktemp "$conf.XXXXXX")
  cat >"$tmp" <<EOF
# Single-node cluster for tests (written by .ci/slurm-up.sh).
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmUser=root
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MinJobAge=3600
KillWait=30
JobRequeue=1
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 644 "$tmp"
  mv "$tmp" "$conf"
fi
install -d /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

# 4. daemons
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running /run/slurmctld.pid; then
  log "starting slurmctld"
  /usr/sbin/slurmctld
fi
if ! running /run/slurmd.pid; then
  log "starting slurmd"
  /usr/sbin/slurmd
fi

# 5. wait for the node to accept work
deadline=$((SECONDS + timeout_s))
while :; do
  state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -n1 || true)
  case "$state" in
    idle | mix | alloc) break ;;
    down* | drain* | drng*)
      scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  if [ $SECONDS -ge $deadline ]; then
    log "node $host not ready after ${timeout_s}s (state: ${state:-no answer}); see /var/log/slurm/"
    exit 1
  fi
  sleep 0.5
done
log "node $host is $state"
