#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on this Debian/Ubuntu machine, without systemd.
#
#   slurm/cluster/up.sh [--fake-gpus N] [--cpus N] [--timeout SECONDS] [--force]
#   slurm/cluster/up.sh --nodes N [--cpus N] [--timeout SECONDS]     (a simulated N-node cluster)
#
# Installs slurmctld/slurmd/slurm-client/munge when missing, starts munged, writes slurm.conf and
# cgroup.conf from `hostname`, `nproc` and the memory of this machine, starts slurmctld and slurmd
# and waits until `sinfo` shows the node idle. Idempotent: a second run with the same options finds
# everything up and returns in about a second; changed options rewrite the config and restart the
# daemons, which kills (and requeues) the jobs running on the node: it refuses while jobs run unless
# --force. Needs root. Stop it with slurm/cluster/down.sh.
#
# Options (or the environment variables in brackets):
#   --fake-gpus N   declare N GPUs on the node (gres gpu:N) backed by placeholder device files, so
#                   `--gpus-per-node` requests schedule on a CPU-only machine [SLURM_FAKE_GPUS, 0]
#   --cpus N        CPUs the node announces (config_overrides lets it exceed the real cores, so
#                   8-rank-per-node scripts run on a small machine) [SLURM_NODE_CPUS, max(nproc, 8)]
#   --timeout S     how long to wait for the node to turn idle [SLURM_UP_TIMEOUT, 60]
#   --force         restart on a configuration change even while jobs are running
#   --nodes N       (N >= 2) instead: N simulated nodes mn1..mnN on this machine, each in its own network
#                   namespace (10.250.0.K) with its own host name and slurmd, the controller on mn1;
#                   its own config, ports, state and job ids, so it runs next to the one-node cluster.
#                   Run its clients with slurm/cluster/node.sh 1 sbatch|squeue|... (multinode.sh)
set -euo pipefail

FAKE_GPUS=${SLURM_FAKE_GPUS:-0}
CPUS=${SLURM_NODE_CPUS:-}
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
FORCE=0
NODES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --fake-gpus) FAKE_GPUS=$2; shift 2 ;;
    --fake-gpus=*) FAKE_GPUS=${1#*=}; shift ;;
    --cpus) CPUS=$2; shift 2 ;;
    --cpus=*) CPUS=${1#*=}; shift ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; shift ;;
    --force) FORCE=1; shift ;;
    --nodes) NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "up.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

SLURM_SCRIPT=up
# shellcheck source=slurm/cluster/common.sh
. "$(dirname "$0")/common.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (it installs packages and starts the Slurm daemons)"

HOST=$(hostname -s)
CONF_DIR=/etc/slurm
STATE_DIR=/var/lib/slurm
LOG_DIR=/var/log/slurm
PARTITION=debug
real_cpus=$(nproc)
[ -n "$CPUS" ] || CPUS=$(( real_cpus > 8 ? real_cpus : 8 ))
REAL_MEMORY=$(( $(memory_mb) * 85 / 100 ))

install_packages
start_munge

if [ "$NODES" != 1 ]; then
  [ "$FAKE_GPUS" -eq 0 ] || die "--fake-gpus is for the one-node cluster, not with --nodes"
  exec "$(dirname "$0")/multinode.sh" up "$NODES" "$CPUS" "$TIMEOUT"
fi

# --- configuration ------------------------------------------------------------------------------------
# cgroup v1 (a freezer hierarchy) lets proctrack/cgroup kill a job's orphans at job end; Slurm 22.05's
# cgroup/v2 wants systemd, so elsewhere fall back to proctrack/linuxproc.
if [ -d /sys/fs/cgroup/freezer ]; then PROCTRACK=proctrack/cgroup; else PROCTRACK=proctrack/linuxproc; fi
gres_line="" ; gres_types=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  gres_types="GresTypes=gpu"
  gres_line=" Gres=gpu:$FAKE_GPUS"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/slurm.conf" <<EOF
# Written by slurm/cluster/up.sh: a one-node cluster for development and CI. Edits are overwritten.
ClusterName=local
SlurmctldHost=$HOST
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
KillWait=30
$(common_slurm_conf "$PROCTRACK")
$gres_types
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEMORY$gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
cgroup_conf slurm/cluster/up.sh >"$tmp/cgroup.conf"
: >"$tmp/gres.conf"
if [ "$FAKE_GPUS" -gt 0 ]; then
  # Placeholder character devices (NVIDIA's major number): Slurm only needs files to hand out.
  for i in $(seq 0 $(( FAKE_GPUS - 1 ))); do
    [ -e "/dev/fakegpu$i" ] || mknod "/dev/fakegpu$i" c 195 "$i"
  done
  echo "NodeName=$HOST Name=gpu File=/dev/fakegpu[0-$(( FAKE_GPUS - 1 ))]" >"$tmp/gres.conf"
fi

# --- daemons --------------------------------------------------------------------------------------------
changed=0
mkdir -p "$CONF_DIR"
for f in slurm.conf cgroup.conf gres.conf; do cmp -s "$tmp/$f" "$CONF_DIR/$f" || changed=1; done
if [ "$changed" -eq 1 ] && [ "$FORCE" -eq 0 ] && alive /run/slurmctld.pid; then
  running=$(squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
  if [ -n "${running// /}" ]; then
    die "the configuration changes ($(diff "$CONF_DIR/slurm.conf" "$tmp/slurm.conf" 2>/dev/null | grep '^>' | cut -c3- | tr '\n' ';' || true)) and a restart would kill the running jobs $running: wait for them, or re-run with --force"
  fi
fi
for f in slurm.conf cgroup.conf gres.conf; do
  cmp -s "$tmp/$f" "$CONF_DIR/$f" || install -m 0644 "$tmp/$f" "$CONF_DIR/$f"
done
install -d -m 0755 "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR"

if [ "$changed" -eq 1 ] && { alive /run/slurmctld.pid || alive /run/slurmd.pid; }; then
  say "configuration changed: restarting slurmctld and slurmd"
  stop /run/slurmd.pid
  stop /run/slurmctld.pid
fi
if ! alive /run/slurmctld.pid; then
  say "starting slurmctld ($HOST, $CPUS CPUs, ${REAL_MEMORY} MB, $FAKE_GPUS fake GPUs, $PROCTRACK)"
  slurmctld
fi
if ! alive /run/slurmd.pid; then
  say "starting slurmd"
  slurmd
fi

# --- wait for the node ----------------------------------------------------------------------------------
deadline=$(( SECONDS + TIMEOUT ))
state=""
while [ $SECONDS -lt $deadline ]; do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated|completing) say "node $HOST is $state (partition $PARTITION)"; exit 0 ;;
    down*|drain*|fail*)
      # A node that was down before (e.g. a previous daemon crash) stays down until resumed.
      scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
die "node $HOST not idle after ${TIMEOUT}s (state '${state:-no answer}'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
