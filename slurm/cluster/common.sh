# Shared by up.sh, multinode.sh and down.sh (sourced, not run): messages, daemon pid files, the packages,
# munge, and the slurm.conf/cgroup.conf settings the one-node and the multi-node cluster have in common.
# Set SLURM_SCRIPT (up, down) before sourcing: it prefixes every message.

say() { echo "[slurm ${SLURM_SCRIPT:-up}] $*"; }
die() { echo "[slurm ${SLURM_SCRIPT:-up}] error: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # stop the daemon whose pid file is $1 (named $2 in a message, when given)
  alive "$1" || return 0
  local pid; pid=$(cat "$1")
  [ -z "${2:-}" ] || say "stopping $2 (pid $pid)"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
memory_mb() { awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo; }

install_packages() {  # slurmctld, slurmd, the clients and munge, when one of them is missing
  local packages=(slurmctld slurmd slurm-client munge) missing=() bin
  for bin in slurmctld slurmd sbatch munged; do command -v "$bin" >/dev/null 2>&1 || missing+=("$bin"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install ${packages[*]}"
  say "installing ${packages[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  fi
}

start_munge() {  # one munged for both clusters
  # Without systemd nothing creates munge's run directory; munged must run as user munge.
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  fi
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
  fi
}

common_slurm_conf() {  # the slurm.conf lines both clusters share; $1: the ProctrackType
  cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job restarts in ~12 s instead of ~2.5 min.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=$1
TaskPlugin=task/none
ReturnToService=2
MailProg=$(command -v true)
SchedulerType=sched/backfill
# Schedule every 2 s; cancel jobs whose dependency failed instead of leaving them pending forever.
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A request the partition can never satisfy is refused at submit time instead of pending forever.
EnforcePartLimits=ALL
# A node may announce more CPUs than it has cores.
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
InactiveLimit=0
EOF
}

cgroup_conf() {  # cgroup.conf for either cluster; $1: who wrote it
  cat <<EOF
# Written by $1.
CgroupPlugin=cgroup/v1
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
}
