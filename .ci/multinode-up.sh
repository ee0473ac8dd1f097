#!/usr/bin/env bash
# Bring up a two-node Slurm partition `multi` (node1, node2) on this one machine, beside the single-node cluster
# of .ci/slurm-up.sh: each node is a slurmd in its own network, UTS and mount namespace (own IP on a bridge, own
# hostname, own spool directory, log and pid file), sharing the host's files (the project, its venv, the runs) and
# munged's socket, as a cluster shares its storage. One slurmctld (the host's) schedules both partitions.
# Idempotent: a second call finds everything in place and only checks that both nodes are idle.
# Needs root with CAP_NET_ADMIN (network namespaces, a bridge, an iptables rule) and CAP_SYS_ADMIN (mounts).
# Usage (as root, after .ci/slurm-up.sh): .ci/multinode-up.sh     env: MULTINODE_UP_TIMEOUT=90 (seconds)
#        .ci/multinode-up.sh --down   stops the two nodes and removes all of the above; `debug` stays as it was.
set -euo pipefail

timeout_s=${MULTINODE_UP_TIMEOUT:-90}
conf=/etc/slurm/slurm.conf
nodes=(node1 node2)
bridge=qa-slurm0
net=10.77.0             # the bridge is .1 (the controller as the nodes see it), node N is .(10+N)
state=/var/lib/qa-runner-multinode
begin='# >>> two-node partition (written by .ci/multinode-up.sh)'
end='# <<< two-node partition'
log() { echo "multinode-up: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (network namespaces, a bridge and slurmd are set up here)"
  exit 1
fi

# The block between the markers (exact lines, so no pattern syntax), and the file without it.
block_of() { awk -v b="$begin" -v e="$end" '$0 == b {on = 1} on {print} $0 == e {on = 0}' "$1"; }
without_block() { awk -v b="$begin" -v e="$end" '$0 == b {off = 1} !off {print} $0 == e {off = 0}' "$1"; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
slurmd_of() {  # the pid of node $1's slurmd, if it runs
  local f="$state/$1/slurmd.pid"
  running "$f" && [ "$(cat "/proc/$(cat "$f")/comm" 2>/dev/null)" = slurmd ] && cat "$f"
}
stop_pid() { kill "$1"; for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done; }
restart_slurmctld() {  # it learns of added or removed nodes only at start (running jobs survive: state is saved)
  if running /run/slurmctld.pid; then
    log "restarting slurmctld to load the node list"
    stop_pid "$(cat /run/slurmctld.pid)"
  fi
  /usr/sbin/slurmctld
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  scontrol reconfigure >/dev/null 2>&1 || true  # the host's slurmd rereads slurm.conf
}

if [ "${1:-}" = --down ]; then
  for n in "${nodes[@]}"; do
    if pid=$(slurmd_of "$n"); then log "stopping slurmd for $n"; stop_pid "$pid"; fi
    if ip netns list | grep -qw "^$n"; then log "deleting network namespace $n"; ip netns del "$n"; fi
    rm -rf "/etc/netns/$n" "${state:?}/$n"
  done
  if ip link show "$bridge" >/dev/null 2>&1; then log "deleting bridge $bridge"; ip link del "$bridge"; fi
  while iptables -D FORWARD -i "$bridge" -o "$bridge" -j ACCEPT 2>/dev/null; do :; done
  if [ -s "$conf" ] && grep -qxF "$begin" "$conf"; then
    log "removing the partition multi from $conf"
    tmp=$(mktemp "$conf.XXXXXX")
    without_block "$conf" >"$tmp"
    chmod 644 "$tmp"
    mv "$tmp" "$conf"
    restart_slurmctld
  fi
  log "two-node partition removed"
  exit 0
fi

# 1. packages, and the single-node cluster this extends
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v unshare >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! sinfo -h >/dev/null 2>&1 || [ ! -s "$conf" ]; then
  log "no Slurm controller answers: running .ci/slurm-up.sh first"
  bash "$(dirname "$0")/slurm-up.sh"
fi
controller=$(awk -F= '/^SlurmctldHost=/ {sub(/\(.*/, "", $2); print $2; exit}' "$conf")
[ -n "$controller" ] || { log "$conf names no SlurmctldHost"; exit 1; }

# 2. network: a bridge on the host, one namespace per node with a veth into it
if ip -4 route show | grep -q "^$net\.0/24" && ! ip link show "$bridge" >/dev/null 2>&1; then
  log "$net.0/24 is already routed on this machine (not by $bridge); edit net= in this script"
  exit 1
fi
if ! ip link show "$bridge" >/dev/null 2>&1; then
  log "creating bridge $bridge ($net.1/24)"
  ip link add "$bridge" type bridge
  ip addr add "$net.1/24" dev "$bridge"
fi
ip link set "$bridge" up
# Docker's FORWARD policy is DROP and bridged frames pass through iptables (br_netfilter): let node talk to node.
if ! iptables -C FORWARD -i "$bridge" -o "$bridge" -j ACCEPT 2>/dev/null; then
  log "iptables: accepting traffic between the nodes on $bridge"
  iptables -I FORWARD 1 -i "$bridge" -o "$bridge" -j ACCEPT
fi
restart=()
for i in "${!nodes[@]}"; do
  n=${nodes[$i]}
  addr="$net.$((11 + i))"
  if ! ip netns list | grep -qw "^$n"; then
    log "creating network namespace $n ($addr)"
    ip netns add "$n"
  fi
  if ! ip link show "qa-$n" >/dev/null 2>&1; then
    ip link add "qa-$n" type veth peer name eth0 netns "$n"
    ip link set "qa-$n" master "$bridge" up
  fi
  ip -n "$n" link set lo up
  ip -n "$n" link set eth0 up
  ip -n "$n" -4 addr show dev eth0 | grep -q "inet $addr/" || ip -n "$n" addr add "$addr/24" dev eth0
  ip -n "$n" route replace default via "$net.1"
  # Mounted over /etc/hosts in the node's own mount namespace: every node resolves the others and the controller.
  install -d "/etc/netns/$n"
  tmp=$(mktemp "/etc/netns/$n/hosts.XXXXXX")
  {
    echo "127.0.0.1 localhost"
    echo "::1 localhost"
    echo "$net.1 $controller"
    for j in "${!nodes[@]}"; do echo "$net.$((11 + j)) ${nodes[$j]}"; done
    # The IPv4-mapped spelling too: torch's TCPStore names its clients from a dual-stack socket, and glibc finds
    # no name for ::ffff:a.b.c.d in a hosts file that lists only a.b.c.d (a DNS server would answer both).
    for j in "${!nodes[@]}"; do echo "::ffff:$net.$((11 + j)) ${nodes[$j]}"; done
  } >"$tmp"
  if cmp -s "$tmp" "/etc/netns/$n/hosts"; then
    rm -f "$tmp"
  else
    chmod 644 "$tmp"
    mv "$tmp" "/etc/netns/$n/hosts"
    restart+=("$n")  # a running slurmd still sees the old file it was bind-mounted from
  fi
done

# 3. slurm.conf: the nodes and the partition as one marked block; the single-node part stays as slurm-up.sh wrote it.
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
node_mem=$(((mem_mb - 1024) / ${#nodes[@]}))
block="$begin
# Each node is a slurmd in its own network/UTS/mount namespace on this host (they share its CPUs and memory).
$(for i in "${!nodes[@]}"; do
    echo "NodeName=${nodes[$i]} NodeAddr=$net.$((11 + i)) CPUs=$cpus RealMemory=$node_mem State=UNKNOWN"
  done)
PartitionName=multi Nodes=$(IFS=,; echo "${nodes[*]}") Default=NO MaxTime=INFINITE State=UP
$end"
current=$(block_of "$conf")
changed=""
if [ "$current" != "$block" ]; then
  log "adding the partition multi (${nodes[*]}) to $conf"
  tmp=$(mktemp "$conf.XXXXXX")
  without_block "$conf" >"$tmp"
  printf '%s\n' "$block" >>"$tmp"
  chmod 644 "$tmp"
  mv "$tmp" "$conf"
  changed=1
fi

# 4. the controller learns of new nodes only on a restart
if [ -n "$changed" ] || ! scontrol show node "${nodes[0]}" >/dev/null 2>&1; then
  restart_slurmctld
fi

# 5. one slurmd per node, each in its namespaces: hostname = node name (so no `slurmd -N`), and its own
#    /var/spool/slurmd, /var/log/slurm and /run/slurmd.pid bind-mounted from $state/NAME (a node's local disk).
[ -e /run/slurmd.pid ] || : >/run/slurmd.pid  # the bind target; empty, so slurm-up.sh still sees no host slurmd
for n in "${nodes[@]}"; do
  d="$state/$n"
  install -d "$d/spool" "$d/log"
  [ -e "$d/slurmd.pid" ] || : >"$d/slurmd.pid"
  if pid=$(slurmd_of "$n"); then
    [[ " ${restart[*]} " == *" $n "* ]] || continue
    log "restarting slurmd for $n (its hosts file changed)"
    stop_pid "$pid"
  fi
  log "starting slurmd for $n (network namespace $n)"
  # nsenter rather than `ip netns exec`, which remounts /sys without the cgroup tree slurmd reads.
  if ! nsenter --net="/run/netns/$n" unshare --uts --mount --propagation private -- sh -c '
    set -e
    hostname "$1"
    mount --bind "/etc/netns/$1/hosts" /etc/hosts
    mount --bind "$2/spool" /var/spool/slurmd
    mount --bind "$2/log" /var/log/slurm
    mount --bind "$2/slurmd.pid" /run/slurmd.pid
    exec /usr/sbin/slurmd' sh "$n" "$d"; then
    log "slurmd for $n did not start; the end of $d/log/slurmd.log:"
    tail -n 5 "$d/log/slurmd.log" >&2 || true
    exit 1
  fi
done

# 6. wait for both nodes to accept work
deadline=$((SECONDS + timeout_s))
for n in "${nodes[@]}"; do
  while :; do
    st=$(sinfo -h -n "$n" -o '%t' 2>/dev/null | head -n1 || true)
    case "$st" in
      idle | mix | alloc) break ;;
      down* | drain* | drng*) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    if [ $SECONDS -ge $deadline ]; then
      log "node $n not ready after ${timeout_s}s (state: ${st:-no answer}); see $state/$n/log/slurmd.log"
      exit 1
    fi
    sleep 0.5
  done
  log "node $n ($(ip -n "$n" -4 -br addr show dev eth0 | awk '{print $3}')) is $st"
done
log "partition multi: ${nodes[*]} ready (sbatch --partition=multi --nodes=2)"
