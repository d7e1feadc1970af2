#!/usr/bin/env bash
# A throw-away Slurm cluster on this host, for tests/test_slurm.py and for trying slurm/ locally.
#
#   tools/slurm_ci.sh up [NODES]   install Debian's Slurm + MUNGE if missing, then start munged,
#                                  slurmctld and NODES slurmd daemons (default 2). NODES=1 is one
#                                  real node named after this host; NODES>1 emulates nodes
#                                  n1..nN on this host (`slurmd -N nI`, one port each), whose
#                                  names do not resolve: jobs must ask `scontrol show node`.
#                                  Idempotent: a cluster already up with this configuration is
#                                  kept; one with another (e.g. another node count) is restarted.
#   tools/slurm_ci.sh down         stop the daemons started by `up` (by their PID files; munged
#                                  only if `up` started it) and remove running jobs.
#   tools/slurm_ci.sh status       exit 0 if the cluster answers, and show its nodes.
#   tools/slurm_ci.sh install      only install the packages.
#
# Afterwards point the Slurm commands at the cluster:  export SLURM_CONF=$SLURM_CI_DIR/slurm.conf
# (`up` prints that line). Everything lives in SLURM_CI_DIR (default /tmp/tail-kd-slurm);
# SLURM_CI_PORT (default 16817) is the controller's port, the node daemons use the ports above
# it, so the cluster does not collide with a Slurm that the host already runs on 6817/6818.
#
# Needs root (the daemons start jobs as the submitting user) and, to install, apt-get.
# Exit status 77 means "Slurm cannot be started here" (not root, no apt-get, install failed);
# the tests skip on it. Debian 12's slurm-wlm 22.05 runs without systemd or cgroups this way.
set -euo pipefail

DIR=${SLURM_CI_DIR:-/tmp/tail-kd-slurm}
CONF=$DIR/slurm.conf
PORT=${SLURM_CI_PORT:-16817}
export SLURM_CONF=$CONF
EX_CANNOT=77

say() { echo "slurm_ci: $*" >&2; }

have_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
    command -v sbatch >/dev/null && command -v munged >/dev/null
}

install() {
  have_slurm && return 0
  if [ "$(id -u)" != 0 ]; then say "not root: cannot install Slurm"; exit $EX_CANNOT; fi
  if ! command -v apt-get >/dev/null; then say "no apt-get: install slurmctld slurmd slurm-client munge yourself"; exit $EX_CANNOT; fi
  say "installing slurmctld slurmd slurm-client munge"
  if ! { apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           slurmctld slurmd slurm-client munge >/dev/null; }; then
    say "apt-get could not install Slurm"; exit $EX_CANNOT
  fi
}

# PID files of the daemons this script started (slurmctld.pid, slurmd-<node>.pid).
alive_pids() {
  local f
  for f in "$DIR"/run/*.pid; do
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"
  done
  return 0
}

answers() { timeout 10 sinfo -h -o '%T' >/dev/null 2>&1; }

# The slurm.conf for NODES nodes, on stdout.
slurm_conf() {
  local nodes=$1 host cpus mem i
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
  cat <<CONF
# Written by tools/slurm_ci.sh: a throw-away test cluster on one host. Do not use in production.
ClusterName=tailkdci
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups or systemd here: track processes by parentage, no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
# Finished jobs are forgotten after a few seconds. Short on purpose: \`sbatch --wait\` polls every
# min(2 s x 4^n, MinJobAge / 2, 32 s), so a short MinJobAge keeps it polling every 2 s.
MinJobAge=4
KillWait=10
Waittime=0
CONF
  if [ "$nodes" -le 1 ]; then
    echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  else
    # Every emulated node offers all of this host's CPUs, and a share of its memory.
    for i in $(seq 1 "$nodes"); do
      echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1 + i))" \
           "CPUs=$cpus RealMemory=$((mem / nodes)) State=UNKNOWN"
    done
  fi
  # FORCE:4 lets up to 4 jobs share a core, so that the tests' jobs run side by side.
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
  touch "$DIR/run/started-munge"
}

node_names() {
  if [ "$1" -le 1 ]; then hostname -s; else seq -f 'n%g' 1 "$1"; fi
}

wait_idle() {
  local states
  for _ in $(seq 1 120); do
    states=$(sinfo -h -o '%T' 2>/dev/null | sort -u | tr -d '\n')
    [ "$states" = idle ] && return 0
    sleep 0.25
  done
  say "the cluster did not become idle:"
  sinfo -N >&2 || true
  tail -n 20 "$DIR"/log/*.log >&2 || true
  return 1
}

up() {
  local nodes=${1:-2} n
  if [ "$(id -u)" != 0 ]; then say "not root: cannot start Slurm daemons"; exit $EX_CANNOT; fi
  install
  mkdir -p "$DIR"/{state,log,run,spool}
  slurm_conf "$nodes" > "$CONF.new"
  if [ -n "$(alive_pids)" ]; then
    if cmp -s "$CONF" "$CONF.new" && answers; then
      rm -f "$CONF.new"
      say "already up with $nodes node(s)"
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    down
  fi
  mv "$CONF.new" "$CONF"
  start_munge
  slurmctld -c -f "$CONF"  # -c: forget jobs of an earlier cluster
  for n in $(node_names "$nodes"); do
    mkdir -p "$DIR/spool/$n"
    if [ "$nodes" -le 1 ]; then slurmd -f "$CONF"; else slurmd -f "$CONF" -N "$n"; fi
  done
  wait_idle
  say "up: $(sinfo -h -o '%D node(s) %P %T' | tr '\n' ' ')"
  echo "export SLURM_CONF=$CONF"
}

down() {
  local pid
  [ -f "$CONF" ] || return 0
  if answers; then
    scancel --quiet --full --signal=KILL --partition=debug 2>/dev/null || true
    scontrol shutdown 2>/dev/null || true  # slurmctld stops every slurmd, then itself
  fi
  for _ in $(seq 1 40); do
    [ -z "$(alive_pids)" ] && break
    sleep 0.25
  done
  for pid in $(alive_pids); do kill "$pid" 2>/dev/null || true; done
  rm -f "$DIR"/run/slurm*.pid
  if [ -f "$DIR/run/started-munge" ] && [ -f /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    rm -f "$DIR/run/started-munge"
  fi
  say "down"
}

case ${1:-} in
  up) up "${2:-2}" ;;
  down) down ;;
  status) answers && sinfo -N ;;
  install) install ;;
  *) echo "usage: $0 up [NODES] | down | status | install" >&2; exit 2 ;;
esac
