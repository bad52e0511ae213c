#!/usr/bin/env bash
# Stop the one-node Slurm cluster that slurm/cluster/up.sh started.
#
#   slurm/cluster/down.sh [--purge]
#   slurm/cluster/down.sh --nodes N [--purge]    (the simulated cluster of up.sh --nodes N: all its nodes)
#
# Cancels the jobs still queued or running (their processes would otherwise outlive slurmd), then
# stops slurmd, slurmctld and munged by their pid files. --purge also deletes the controller state
# (job queue, job ids) and the logs, so the next up.sh starts from job id 1. Packages and
# /etc/slurm stay; running it when nothing is up is fine.
set -euo pipefail

PURGE=0 MULTINODE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --purge) PURGE=1; shift ;;
    --nodes) MULTINODE=1; shift 2 ;;
    --nodes=*) MULTINODE=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "down.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
SLURM_SCRIPT=down
# shellcheck source=slurm/cluster/common.sh
. "$(dirname "$0")/common.sh"
[ "$(id -u)" -eq 0 ] || die "needs root"
if [ "$MULTINODE" -eq 1 ]; then
  "$(dirname "$0")/multinode.sh" down $([ "$PURGE" -eq 1 ] && echo --purge)
  say "multi-node cluster down"
  exit 0
fi

if alive /run/slurmctld.pid && command -v squeue >/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs || true
    for _ in $(seq 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi
stop /run/slurmd.pid slurmd
stop /run/slurmctld.pid slurmctld
stop /run/munge/munged.pid munged

if [ "$PURGE" -eq 1 ]; then
  say "removing controller state and logs"
  rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/* /var/log/slurm/*
fi
say "down"
