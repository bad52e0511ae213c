#!/usr/bin/env bash
# Run a command on node K of the simulated multi-node cluster (slurm/cluster/up.sh --nodes N).
#
#   slurm/cluster/node.sh K [command...]        (no command: an interactive shell)
#   slurm/cluster/node.sh 1 sinfo
#   slurm/cluster/node.sh 1 sbatch --nodes=2 slurm/pretrain.sh --nproc-per-node 1 parallel=single
#
# A node is a network namespace (/run/netns/slurm-mnK, address 10.250.0.K) plus, per command, a private
# mount and UTS namespace: host name mnK and an /etc/hosts that lists every node. SLURM_CONF points at
# the cluster's own configuration, so sbatch/squeue/scontrol/scancel talk to its controller (they only
# reach it from inside a node). The working directory and the environment are kept. Needs root.
set -euo pipefail

NS_PREFIX=slurm-mn
RUN_DIR=/run/slurm-mn
export SLURM_CONF=/etc/slurm-mn/slurm.conf

k=${1:-}
case "$k" in
  ''|*[!0-9]*) echo "usage: slurm/cluster/node.sh K [command...]  (K: node number, 1 = the controller)" >&2; exit 2 ;;
esac
shift
ns=/run/netns/$NS_PREFIX$k
if [ ! -e "$ns" ] || [ ! -s "$RUN_DIR/hosts" ]; then
  echo "node.sh: node $k is not up (start the cluster with: slurm/cluster/up.sh --nodes N)" >&2
  exit 2
fi
[ $# -gt 0 ] || set -- "${SHELL:-/bin/bash}"
# nsenter --net rather than `ip netns exec`, which remounts /sys and can hide the cgroup hierarchy.
exec nsenter --net="$ns" -- unshare --mount --uts --propagation private -- \
  sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "$RUN_DIR/hosts" "mn$k" "$@"
