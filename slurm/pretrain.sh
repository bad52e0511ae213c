#!/usr/bin/env bash
# Train on a Slurm allocation: one `srun` task per node, each a torchrun that starts the node's ranks.
#
#   sbatch [sbatch options] slurm/pretrain.sh [--nproc-per-node N] [hydra overrides...]
#   sbatch --nodes=4 --gpus-per-node=8 --time=24:00:00 slurm/pretrain.sh model=qwen2_1_5b parallel.tp=2
#   slurm/submit.sh --nodes=2 slurm/pretrain.sh ...     # same, with the Slurm log in the run directory
#
# Ranks per node: $NPROC_PER_NODE or --nproc-per-node, else the GPUs Slurm allocated on the node
# (--gpus-per-node), else 2 CPU processes. Every rank joins one rendezvous on the first node, at the
# address its host name resolves to; when that is a loopback address (Debian's "127.0.1.1 <host>"),
# Slurm's NodeAddr for it, else the address this node uses to reach the second node; MASTER_ADDR wins
# over all of them. Each node first checks that the head answers (slurm/launch_node.sh) and fails with
# one line if it does not.
# Run directory: runs/<run_name> under the submit directory, where run_name is trainer.run_name=...
# from the overrides, else $RUN_NAME, else <job name>-<job id>. It is the same after a requeue (the
# job keeps its id), and the trainer resumes from its checkpoints/latest.
#
# Preemption and time limit: Slurm sends SIGUSR1 to this shell <margin> seconds before the time limit
# (--signal=B:USR1@<margin>; `scancel --signal=USR1 --batch <job>` does the same by hand). The shell
# forwards it to the training processes, which finish their step, save a checkpoint and exit; then it
# requeues the job, which restarts with SLURM_RESTART_COUNT+1 and resumes. `scancel --signal=USR1 <job>`
# (no --batch: the signal reaches the job's steps, not this shell) ends the same way. It does not requeue when
# training already finished, or when the run saved no new step (a margin too short for startup
# would otherwise requeue forever). Make the margin cover one step + one checkpoint save.
#
# Environment: PYTHON (default python), NPROC_PER_NODE, RUN_NAME, RUNS_DIR (default
# $SLURM_SUBMIT_DIR/runs), MASTER_ADDR, MASTER_PORT (default 20000 + job id % 20000), RDZV_TIMEOUT
# (seconds torchrun waits for every node to join, default 300), HEAD_PROBE_TIMEOUT (default 10),
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (the interface the nodes share, when several), REQUEUE_SETTLE_S
# (seconds a restarted multi-node job waits before it launches, default 10), STOP_TIMEOUT (seconds
# torchrun waits for ranks to save after the signal before killing them, default 240; torch releases
# before --shutdown-timeout existed use 30), OMP_NUM_THREADS (default: the node's CPUs / ranks per
# node). Needs torch >= 2.9 (torchrun --signals-to-handle).
#
#SBATCH --job-name=pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail

log() { echo "[pretrain.sh $(date +%H:%M:%S)] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "slurm/pretrain.sh is an sbatch script: sbatch slurm/pretrain.sh [overrides] (or slurm/submit.sh)" >&2
  exit 2
fi

# --- arguments -----------------------------------------------------------------------------------------
nproc=${NPROC_PER_NODE:-}
overrides=()
run_name="" run_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node) nproc=$2; shift 2; continue ;;
    --nproc-per-node=*) nproc=${1#*=} ;;
    trainer.run_name=*) run_name=${1#*=}; overrides+=("$1") ;;
    hydra.run.dir=*) run_dir=${1#*=} ;;
    *) overrides+=("$1") ;;
  esac
  shift
done
if [ -z "$nproc" ]; then
  if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then nproc=$SLURM_GPUS_ON_NODE; else nproc=2; fi
fi
if [ -z "$run_name" ]; then
  run_name=${RUN_NAME:-${SLURM_JOB_NAME%.sh}-$SLURM_JOB_ID}
  overrides+=("trainer.run_name=$run_name")
fi
[ -n "$run_dir" ] || run_dir=${RUNS_DIR:-$SLURM_SUBMIT_DIR/runs}/$run_name
case "$run_dir" in /*) ;; *) run_dir=$SLURM_SUBMIT_DIR/$run_dir ;; esac
overrides+=("hydra.run.dir=$run_dir")
mkdir -p "$run_dir"

nnodes=$SLURM_JOB_NUM_NODES
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${hosts[0]}
port=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
is_loopback() { case "$1" in 127.*|::1|"") return 0 ;; *) return 1 ;; esac; }
resolve() { getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}'; }
head_addr=${MASTER_ADDR:-$(resolve "$head_node")}
if [ -z "${MASTER_ADDR:-}" ] && [ "$nnodes" -gt 1 ] && is_loopback "$head_addr"; then
  # The other nodes cannot reach a loopback address: try Slurm's address for the node, then the
  # source address this node (the head: the batch script runs on the first node) uses for the second.
  seen=$head_addr
  node_addr=$(scontrol show node "$head_node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -1)
  case "$node_addr" in
    [0-9]*.[0-9]*.[0-9]*.[0-9]*) head_addr=$node_addr ;;
    ?*) head_addr=$(resolve "$node_addr") ;;
  esac
  if is_loopback "$head_addr"; then
    head_addr=$(ip -o route get "$(resolve "${hosts[1]}")" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
  fi
  if is_loopback "$head_addr"; then
    echo "launch error: the head node $head_node resolves to $seen (loopback), which the other nodes cannot" \
      "reach, and no other address of it was found: set MASTER_ADDR to its address on the network the nodes" \
      "share (and GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME to that interface)" >&2
    exit 2
  fi
  log "head node $head_node resolves to $seen (loopback): rendezvous at $head_addr instead"
fi
restart=${SLURM_RESTART_COUNT:-0}
cpus_on_node=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus_on_node / nproc > 0 ? cpus_on_node / nproc : 1 ))}

latest_step() {  # the step of checkpoints/latest, 0 without one
  local latest; latest=$(cat "$run_dir/checkpoints/latest" 2>/dev/null) || { echo 0; return; }
  latest=${latest##*_}; echo $(( 10#${latest:-0} ))
}
planned_steps() {  # trainer.steps of this run, from the config the trainer wrote
  "${PYTHON:-python}" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["trainer"]["steps"])' \
    "$run_dir/resolved_config.yaml" 2>/dev/null || echo -1
}

step_at_start=$(latest_step)
echo "job $SLURM_JOB_ID restart $restart on $SLURM_JOB_NODELIST at $(date -Is): from step $step_at_start," \
  "log $(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')" >>"$run_dir/slurm_jobs.log"
log "job $SLURM_JOB_ID (restart $restart): $nnodes node(s) x $nproc ranks, rendezvous $head_node ($head_addr:$port)," \
  "run dir $run_dir, checkpoint step $step_at_start"

# --- signals -----------------------------------------------------------------------------------------
stop_signal="" srun_pid=""
# Each node's launch_node.sh notes a SIGUSR1 that reaches it here: `scancel --signal=USR1 <job>`
# without --batch signals the steps only, and this shell learns of it from the file.
export PRETRAIN_STOP_FILE=$run_dir/.stop_signal.$SLURM_JOB_ID
rm -f "$PRETRAIN_STOP_FILE"
# shellcheck disable=SC2317  # called from the traps below
forward() {
  stop_signal=USR1
  log "got SIGUSR1: forwarding it to the training processes"
  [ -n "$srun_pid" ] && kill -s USR1 "$srun_pid" 2>/dev/null
}
trap forward USR1
# scancel and the time limit itself send SIGTERM to every process of the job: the ranks save on it
# by themselves (within KillWait). This shell only keeps waiting for them; no requeue.
ending=""
trap 'ending=1; log "got SIGTERM: the job is ending; the ranks save if they can"' TERM

# --- launch --------------------------------------------------------------------------------------------
srun_opts=(--nodes="$nnodes" --ntasks-per-node=1 --ntasks="$nnodes" --kill-on-bad-exit=1)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# torchrun must pass SIGUSR1 on to the ranks (without --signals-to-handle, torch >= 2.9, it dies of it
# and the step's ranks with it) and give them time to save before it kills them (the environment
# variable, unlike --shutdown-timeout, is simply ignored by releases that keep the fixed 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${STOP_TIMEOUT:-240}
# shellcheck disable=SC2054  # the commas belong to --signals-to-handle
torchrun=(
  "${PYTHON:-python}" -m torch.distributed.run
  --nnodes="$nnodes" --nproc-per-node="$nproc"
  --rdzv-backend=c10d --rdzv-endpoint="$head_addr:$port" --rdzv-id="$SLURM_JOB_ID"
  --rdzv-conf=join_timeout="${RDZV_TIMEOUT:-300}"
  --max-restarts=0
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
)
# sbatch runs a copy of this script: find its neighbour in the submit directory, else next to the package.
launcher=$SLURM_SUBMIT_DIR/slurm/launch_node.sh
[ -x "$launcher" ] || launcher=$("${PYTHON:-python}" -c 'import pathlib, pretrain
print(pathlib.Path(pretrain.__file__).resolve().parents[1] / "slurm" / "launch_node.sh")' 2>/dev/null)
[ -x "$launcher" ] || { echo "launch error: slurm/launch_node.sh not found (submit from the repository root)" >&2; exit 2; }
launch=("$launcher" "$head_addr" "$port" "$nnodes" --)
if [ "$restart" -gt 0 ] && [ "$nnodes" -gt 1 ]; then
  # After a node failure the controller's cleanup of the lost run can reach a returning node just after
  # this restart began, and kill its new step (the job keeps its id): let that cleanup land first.
  log "restart of a multi-node job: waiting ${REQUEUE_SETTLE_S:-10} s for Slurm's cleanup of the previous run"
  sleep "${REQUEUE_SETTLE_S:-10}"
fi
log "srun ${srun_opts[*]} ${torchrun[*]} -m pretrain ${overrides[*]}"
srun "${srun_opts[@]}" "${launch[@]}" "${torchrun[@]}" -m pretrain "${overrides[@]}" &
srun_pid=$!
[ -n "$stop_signal" ] && kill -s USR1 "$srun_pid" 2>/dev/null
# `wait` returns early when a trapped signal arrives: wait again until srun has really exited.
while :; do
  wait "$srun_pid"; rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
log "training processes exited with status $rc"
# After a forwarded signal torchrun exits 1 with a SignalException traceback even when every rank
# saved and exited 0: what decides is the checkpoint the ranks left.

if [ "$stop_signal" != USR1 ] && [ -s "$PRETRAIN_STOP_FILE" ]; then
  stop_signal=USR1
  log "the training processes got SIGUSR1 (scancel --signal=USR1 without --batch): treated as a preemption"
fi
rm -f "$PRETRAIN_STOP_FILE"
if [ "$stop_signal" != USR1 ] && [ "$rc" -ne 0 ] && [ "$nnodes" -gt 1 ] && [ -z "$ending" ]; then
  # The ranks here fail as soon as a peer on a lost node is gone, usually before Slurm declares that
  # node down. Exiting now would end the job FAILED; waiting lets Slurm end it as NODE_FAIL and requeue it.
  slurmd_port=$(scontrol show config 2>/dev/null | sed -n 's/^SlurmdPort *= *//p')
  node_timeout=$(scontrol show config 2>/dev/null | sed -n 's/^SlurmdTimeout *= *\([0-9]*\).*/\1/p')
  lost=""
  for h in "${hosts[@]}"; do
    addr=$(scontrol show node "$h" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -1)
    timeout 3 bash -c "exec 3<>/dev/tcp/${addr:-$h}/${slurmd_port:-6818}" 2>/dev/null || lost+=" $h"
  done
  if [ -n "$lost" ]; then
    wait_s=$(( ${node_timeout:-300} * 2 + 30 ))
    log "node(s)$lost do not answer: waiting up to $wait_s s for Slurm to declare them down and requeue the job"
    sleep "$wait_s"
    log "Slurm did not end the job: requeueing it"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
fi
if [ "$stop_signal" != USR1 ]; then
  exit "$rc"
fi
step=$(latest_step) steps=$(planned_steps)
if [ "$step" -ge "$steps" ] && [ "$steps" -ge 0 ]; then
  log "training finished at step $step of $steps: not requeueing"
  exit 0
fi
if [ "$step" -le "$step_at_start" ]; then
  log "no new checkpoint since step $step_at_start: not requeueing (is the signal margin shorter than startup + one step + a save?)"
  exit 1
fi
log "checkpoint at step $step of $steps: requeueing job $SLURM_JOB_ID"
scontrol requeue "$SLURM_JOB_ID"
exit 0
