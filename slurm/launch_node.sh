#!/usr/bin/env bash
# One node's part of slurm/pretrain.sh, which runs it through srun (one task per node); not for direct use.
#
#   launch_node.sh HEAD_ADDR PORT NNODES -- COMMAND...      (COMMAND: the torchrun command line)
#
# Before COMMAND starts, on a multi-node job:
# - a node other than the head checks within HEAD_PROBE_TIMEOUT seconds (default 10) that the head node
#   answers at HEAD_ADDR:PORT. A refused connection counts as an answer (the head's rendezvous may not
#   listen yet); a timeout or "no route" ends the task with one clear line instead of torchrun's
#   rendezvous timeout minutes later.
# - when this node's host name resolves to a loopback address (Debian's "127.0.1.1 <host>"), gloo would
#   advertise that address to the other nodes: GLOO_SOCKET_IFNAME is set to the interface that reaches
#   the head node, unless already set.
# It then runs COMMAND and waits for it. A SIGUSR1 that reaches this task (Slurm signals a step's task
# processes, this script, not their children: `scancel --signal=USR1 <job>` and the batch script's
# forward alike) is passed on to COMMAND and appended to $PRETRAIN_STOP_FILE, so the batch script knows
# to requeue after the ranks saved.
set -uo pipefail

if [ $# -lt 5 ] || [ "$4" != -- ]; then
  echo "usage: launch_node.sh HEAD_ADDR PORT NNODES -- COMMAND..." >&2
  exit 2
fi
head_addr=$1 port=$2 nnodes=$3
shift 4
node=$(hostname)
log() { echo "[launch_node.sh $node $(date +%H:%M:%S)] $*"; }
is_loopback() { case "$1" in 127.*|::1|"") return 0 ;; *) return 1 ;; esac; }
child="" stop=""
# shellcheck disable=SC2317  # called from the traps below
stop_requested() {
  stop=1
  [ -n "${PRETRAIN_STOP_FILE:-}" ] && echo "$node $(date -Is)" >>"$PRETRAIN_STOP_FILE"
  [ -n "$child" ] && kill -s USR1 "$child" 2>/dev/null
}
trap stop_requested USR1
trap ':' TERM  # torchrun gets it too and lets the ranks save: keep waiting for it

if [ "$nnodes" -gt 1 ]; then
  if [ "${SLURM_NODEID:-0}" != 0 ]; then
    probe=$("${PYTHON:-python}" - "$head_addr" "$port" "${HEAD_PROBE_TIMEOUT:-10}" 2>&1 <<'EOF'
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    socket.create_connection((host, port), timeout=timeout).close()
except ConnectionRefusedError:
    pass  # the head answered; its rendezvous just does not listen yet
except OSError as exc:
    sys.exit(str(exc) or type(exc).__name__)
EOF
    ) || {
      echo "launch error: node $node cannot reach the head node at $head_addr:$port ($probe);" \
        "check that the address is right (MASTER_ADDR to override), the nodes share a network and no firewall" \
        "blocks the port (MASTER_PORT to change it)" >&2
      exit 2
    }
  fi
  self_addr=$(getent ahostsv4 "$node" 2>/dev/null | awk 'NR == 1 {print $1}')
  if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && is_loopback "$self_addr"; then
    iface=$(ip -o route get "$head_addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    if [ -z "$iface" ] || [ "$iface" = lo ]; then  # this is the head node: the interface holding its address
      iface=$(ip -o -4 addr show 2>/dev/null | awk -v a="$head_addr" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}')
    fi
    if [ -n "$iface" ] && [ "$iface" != lo ]; then
      export GLOO_SOCKET_IFNAME=$iface
      log "host name $node resolves to $self_addr (loopback): GLOO_SOCKET_IFNAME=$iface"
    else
      log "warning: host name $node resolves to $self_addr (loopback) and no interface reaches $head_addr:" \
        "set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the interface the nodes share"
    fi
  fi
fi

"$@" &
child=$!
[ -n "$stop" ] && kill -s USR1 "$child" 2>/dev/null
while :; do
  wait "$child"; rc=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$rc"
