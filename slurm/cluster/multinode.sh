#!/usr/bin/env bash
# The simulated multi-node cluster behind `slurm/cluster/up.sh --nodes N` and `down.sh --nodes N`
# (those two check root, install the packages and start munge first; call them, not this file). What it
# shares with the one-node cluster (messages, pid files, the common slurm.conf lines) is in common.sh.
#
#   multinode.sh up N CPUS TIMEOUT      N nodes mn1..mnN, each announcing CPUS CPUs
#   multinode.sh down [--purge]
#
# Node K is a network namespace slurm-mnK with the address 10.250.0.K/24 on a link to a bridge that
# lives in its own namespace (slurm-mnsw, port pK), so no traffic ever reaches the host's network.
# slurmctld runs on mn1, one slurmd per node; every daemon and client runs through node.sh (own host
# name, /etc/hosts listing the nodes). Config, ports, state, logs and job ids are the cluster's own
# (/etc/slurm-mn, 6917/6918, /var/lib/slurm-mn, /var/log/slurm-mn, ids from 500000), so it runs next
# to the one-node cluster. Idempotent: what is up stays up; a link that is down is set up again and a
# dead slurmd restarted (that is how a failed node returns).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
NODE="$HERE/node.sh"
NS_PREFIX=slurm-mn
SWITCH_NS=slurm-mnsw
SUBNET=10.250.0
CONF_DIR=/etc/slurm-mn
STATE_DIR=/var/lib/slurm-mn
LOG_DIR=/var/log/slurm-mn
RUN_DIR=/run/slurm-mn
PARTITION=mn
export SLURM_CONF=$CONF_DIR/slurm.conf

SLURM_SCRIPT=${1:-up}  # "up" or "down" in messages
# shellcheck source=slurm/cluster/common.sh
. "$HERE/common.sh"
existing_nodes() {  # numbers of the node namespaces that exist
  ip netns list 2>/dev/null | sed -n "s/^$NS_PREFIX\([0-9][0-9]*\)\( .*\)\{0,1\}$/\1/p" | sort -n
}

up() {
  local nodes=$1 cpus=$2 timeout=$3
  { [ "$nodes" -ge 2 ] && [ "$nodes" -le 200 ]; } 2>/dev/null || die "--nodes must be between 2 and 200, got '$nodes'"
  local real_memory proctrack k
  real_memory=$(( $(memory_mb) * 85 / 100 / nodes ))
  # Not proctrack/cgroup: every slurmd of this machine would put a job's step into the same cgroup
  # (slurm/uid_0/job_<id>/step_<n>), and one node ending or cleaning up its part of a multi-node step
  # would kill the other nodes' processes too. linuxproc follows each slurmstepd's own process tree.
  proctrack=proctrack/linuxproc

  # --- network: a bridge in its own namespace, one veth link per node ---------------------------------
  ip netns list | grep -qx "$SWITCH_NS\( .*\)\{0,1\}" || ip netns add "$SWITCH_NS"
  ip -n "$SWITCH_NS" link show br0 >/dev/null 2>&1 || ip -n "$SWITCH_NS" link add br0 type bridge
  ip -n "$SWITCH_NS" link set lo up
  ip -n "$SWITCH_NS" link set br0 up
  for k in $(seq "$nodes"); do
    local ns=$NS_PREFIX$k
    ip netns list | grep -qx "$ns\( .*\)\{0,1\}" || ip netns add "$ns"
    ip -n "$ns" link set lo up
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
      ip link add "mnlink$k" netns "$ns" type veth peer name "p$k" netns "$SWITCH_NS"
      ip -n "$ns" link set "mnlink$k" name eth0
      ip -n "$ns" addr add "$SUBNET.$k/24" dev eth0
      ip -n "$SWITCH_NS" link set "p$k" master br0
    fi
    ip -n "$ns" link set eth0 up
    ip -n "$SWITCH_NS" link set "p$k" up  # also brings back a link a test cut
  done

  # --- configuration --------------------------------------------------------------------------------
  install -d -m 0755 "$CONF_DIR" "$STATE_DIR/slurmctld" "$LOG_DIR" "$RUN_DIR"
  local tmp; tmp=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  { echo "127.0.0.1 localhost"; for k in $(seq "$nodes"); do echo "$SUBNET.$k mn$k"; done; } >"$tmp/hosts"
  {
    cat <<EOF
# Written by slurm/cluster/up.sh --nodes $nodes: a simulated multi-node cluster. Edits are overwritten.
ClusterName=multinode
SlurmctldHost=mn1($SUBNET.1)
SlurmctldPort=6917
SlurmdPort=6918
# A node that stops answering is declared down after 6 s (default 300 s): the job on it ends as
# NODE_FAIL and, submitted with --requeue, goes back to the queue.
SlurmdTimeout=6
KillWait=10
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.%n.pid
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd.%n
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.%n.log
$(common_slurm_conf "$proctrack")
# Far from the one-node cluster's ids, so run directories named after job ids never meet.
FirstJobId=500000
EOF
    for k in $(seq "$nodes"); do
      echo "NodeName=mn$k NodeAddr=$SUBNET.$k CPUs=$cpus RealMemory=$real_memory State=UNKNOWN"
    done
    echo "PartitionName=$PARTITION Nodes=mn[1-$nodes] Default=YES MaxTime=INFINITE State=UP"
  } >"$tmp/slurm.conf"
  cgroup_conf "slurm/cluster/up.sh --nodes $nodes" >"$tmp/cgroup.conf"

  local changed=0 f
  for f in slurm.conf cgroup.conf; do cmp -s "$tmp/$f" "$CONF_DIR/$f" || changed=1; done
  cmp -s "$tmp/hosts" "$RUN_DIR/hosts" || install -m 0644 "$tmp/hosts" "$RUN_DIR/hosts"
  if [ "$changed" -eq 1 ]; then
    # A different node count or size: start over (the old nodes' jobs would not fit the new config).
    if alive "$RUN_DIR/slurmctld.pid"; then say "configuration changed: restarting the multi-node cluster"; fi
    down_daemons
    for k in $(existing_nodes); do [ "$k" -le "$nodes" ] || remove_node "$k"; done
    for f in slurm.conf cgroup.conf; do install -m 0644 "$tmp/$f" "$CONF_DIR/$f"; done
  fi

  # --- daemons --------------------------------------------------------------------------------------
  if ! alive "$RUN_DIR/slurmctld.pid"; then
    say "starting slurmctld on mn1 ($nodes nodes x $cpus CPUs, ${real_memory} MB each, $proctrack)"
    "$NODE" 1 slurmctld
  fi
  for k in $(seq "$nodes"); do
    if ! alive "$RUN_DIR/slurmd.mn$k.pid"; then
      say "starting slurmd on mn$k ($SUBNET.$k)"
      install -d -m 0755 "$STATE_DIR/slurmd.mn$k"
      "$NODE" "$k" slurmd -N "mn$k"
    fi
  done

  # --- wait for the nodes ---------------------------------------------------------------------------
  local deadline=$(( SECONDS + timeout )) states="" idle
  while [ $SECONDS -lt $deadline ]; do
    states=$("$NODE" 1 sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null || true)
    idle=$(echo "$states" | grep -cE ' (idle|mixed|allocated|completing)$' || true)
    if [ "$idle" -eq "$nodes" ]; then
      say "nodes mn[1-$nodes] are up (partition $PARTITION; run commands with slurm/cluster/node.sh 1 ...)"
      return 0
    fi
    # A node that failed before stays down until resumed.
    echo "$states" | awk '$2 ~ /^(down|drain|fail)/ {print $1}' | while read -r name; do
      "$NODE" 1 scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
    done
    sleep 0.3
  done
  die "nodes not idle after ${timeout}s: $(echo "$states" | tr '\n' ' '); see $LOG_DIR/"
}

kill_node_processes() {  # everything still running in node $1's namespace (job steps, slurmd)
  local pids; pids=$(ip netns pids "$NS_PREFIX$1" 2>/dev/null || true)
  [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086
  kill -9 $pids 2>/dev/null || true
}

remove_node() {
  kill_node_processes "$1"
  ip netns del "$NS_PREFIX$1" 2>/dev/null || true  # its end of the link goes with it, and the peer too
}

down_daemons() {
  if alive "$RUN_DIR/slurmctld.pid"; then
    local jobs
    jobs=$("$NODE" 1 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      "$NODE" 1 scancel $jobs || true
      for _ in $(seq 40); do [ -z "$("$NODE" 1 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  local pidfile
  for pidfile in "$RUN_DIR"/slurmd.*.pid; do [ -e "$pidfile" ] && stop "$pidfile"; done
  stop "$RUN_DIR/slurmctld.pid"
}

down() {
  local purge=${1:-0} k
  if [ -e "$RUN_DIR/hosts" ]; then down_daemons; fi
  for k in $(existing_nodes); do remove_node "$k"; done
  ip netns del "$SWITCH_NS" 2>/dev/null || true
  rm -f "$RUN_DIR"/*.pid
  if [ "$purge" -eq 1 ]; then
    say "removing the multi-node controller state and logs"
    rm -rf "${STATE_DIR:?}"/* "${LOG_DIR:?}"/* "$RUN_DIR/hosts"
  fi
}

case "${1:-}" in
  up) up "$2" "$3" "$4" ;;
  down) if [ "${2:-}" = --purge ]; then down 1; else down 0; fi ;;
  *) echo "usage: multinode.sh up N CPUS TIMEOUT | down [--purge] (use up.sh --nodes N / down.sh --nodes N)" >&2; exit 2 ;;
esac
