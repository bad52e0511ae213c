#!/usr/bin/env bash
# Run the data pipeline (raw text -> filtered, deduplicated, tokenized Megatron shards) as one Slurm job.
#
#   sbatch [sbatch options] slurm/data_pipeline.sh [hydra overrides...]
#   sbatch --cpus-per-task=32 --time=12:00:00 slurm/data_pipeline.sh
#   slurm/submit.sh --cpus-per-task=32 slurm/data_pipeline.sh ...   # log under logs/slurm/ instead
#
# One task on one node runs `python -m data_pipeline` with the overrides as given; its local executor
# gets the allocated CPUs as workers (data_pipeline.executor.workers=$SLURM_CPUS_PER_TASK) unless the
# overrides set them. Before the time limit
# (--signal=B:USR1@<margin>) or on `scancel --signal=USR1 --batch <job>`, the job ends the pipeline
# step and requeues itself; datatrove keeps a completion marker per finished task in its logging
# folder and skips those tasks on the restart, so only unfinished tasks run again. At most
# MAX_REQUEUES (default 20) requeues.
#
# Environment: PYTHON (default python), MAX_REQUEUES.
#
#SBATCH --job-name=data_pipeline
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail

log() { echo "[data_pipeline.sh $(date +%H:%M:%S)] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "slurm/data_pipeline.sh is an sbatch script: sbatch slurm/data_pipeline.sh [overrides]" >&2
  exit 2
fi
restart=${SLURM_RESTART_COUNT:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
log "job $SLURM_JOB_ID (restart $restart) on $SLURM_JOB_NODELIST, ${SLURM_CPUS_ON_NODE:-?} CPUs"

stop_signal="" srun_pid=""
# shellcheck disable=SC2317  # called from the traps below
forward() {
  stop_signal=USR1
  log "got SIGUSR1: stopping the pipeline (srun ends the step; unfinished tasks run again after a restart)"
  [ -n "$srun_pid" ] && kill -s TERM "$srun_pid" 2>/dev/null
}
trap forward USR1
# scancel and the time limit send SIGTERM to every process of the job themselves: no requeue then.
trap 'log "got SIGTERM: the job is ending"' TERM

# The local executor's worker pool gets the allocated CPUs unless the overrides say otherwise.
args=("$@")
if [ "${SLURM_CPUS_PER_TASK:-1}" -gt 1 ] && [[ " $* " != *" data_pipeline.executor.workers="* ]]; then
  args+=("data_pipeline.executor.workers=$SLURM_CPUS_PER_TASK")
fi
srun --ntasks=1 --kill-on-bad-exit=1 "${PYTHON:-python}" -m data_pipeline "${args[@]}" &
srun_pid=$!
log "${PYTHON:-python} -m data_pipeline ${args[*]}"
[ -n "$stop_signal" ] && kill -s TERM "$srun_pid" 2>/dev/null
while :; do
  wait "$srun_pid"; rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
log "pipeline exited with status $rc"

if [ "$stop_signal" = USR1 ] && [ "$rc" -ne 0 ]; then
  if [ "$restart" -ge "${MAX_REQUEUES:-20}" ]; then
    log "already requeued $restart times (MAX_REQUEUES): giving up"
    exit 1
  fi
  log "requeueing job $SLURM_JOB_ID: the restart skips completed tasks"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
