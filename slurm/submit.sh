#!/usr/bin/env bash
# sbatch with the log directory created first (Slurm does not create --output directories: a missing
# one fails the job without a word). Same arguments as sbatch; prints the job id.
#
#   slurm/submit.sh [sbatch options] slurm/pretrain.sh [hydra overrides...]
#       log: <run dir>/slurm-<job id>.out, run dir = $RUNS_DIR/<run name> (RUNS_DIR default ./runs);
#       run name = trainer.run_name=... from the overrides, else $RUN_NAME, else pretrain-<date-time>.
#       RUN_NAME is exported to the job, so every requeued restart uses the same run directory.
#   slurm/submit.sh [sbatch options] slurm/data_pipeline.sh [hydra overrides...]   (or any other script)
#       log: $SLURM_LOG_DIR/<job name>-<job id>.out (SLURM_LOG_DIR default ./logs/slurm).
#
# An --output/-o given among the sbatch options wins (its directory is created too).
set -euo pipefail

sbatch_opts=() script="" script_args=()
while [ $# -gt 0 ]; do
  if [ -z "$script" ] && [[ "$1" == *.sh ]] && [ -f "$1" ]; then
    script=$1; shift; script_args=("$@"); break
  fi
  sbatch_opts+=("$1"); shift
done
[ -n "$script" ] || { echo "usage: slurm/submit.sh [sbatch options] SCRIPT.sh [arguments]" >&2; exit 2; }

output=""
for ((i = 0; i < ${#sbatch_opts[@]}; i++)); do
  case "${sbatch_opts[i]}" in
    --output=*) output=${sbatch_opts[i]#*=} ;;
    --output|-o) output=${sbatch_opts[i+1]:-} ;;
    -o?*) output=${sbatch_opts[i]#-o} ;;
  esac
done

if [ "$(basename "$script")" = pretrain.sh ]; then
  run_name="" run_dir=""
  for arg in "${script_args[@]}"; do
    case "$arg" in
      trainer.run_name=*) run_name=${arg#*=} ;;
      hydra.run.dir=*) run_dir=${arg#*=} ;;
    esac
  done
  [ -n "$run_name" ] || run_name=${RUN_NAME:-pretrain-$(date +%Y%m%d-%H%M%S)}
  [ -n "$run_dir" ] || run_dir=${RUNS_DIR:-runs}/$run_name
  export RUN_NAME=$run_name
  [ -n "$output" ] || { output=$run_dir/slurm-%j.out; sbatch_opts+=(--output="$output"); }
  mkdir -p "$run_dir"
  echo "run name $run_name, run dir $run_dir" >&2
else
  [ -n "$output" ] || { output=${SLURM_LOG_DIR:-logs/slurm}/%x-%j.out; sbatch_opts+=(--output="$output"); }
fi
mkdir -p "$(dirname "$output")"
job_id=$(sbatch --parsable "${sbatch_opts[@]}" "$script" "${script_args[@]}")
echo "submitted job $job_id, log $output" >&2
echo "$job_id"
