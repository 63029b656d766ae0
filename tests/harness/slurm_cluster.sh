#!/usr/bin/env bash
# A real Slurm (Debian's slurmctld + slurmd + munge) on this machine for the system tests: two nodes
# n1, n2 = two `slurmd -N` on 127.0.0.1, linuxproc process tracking, no cgroups, no accounting.
# Made from ../shared/reference/start_slurm.sh (which has the traps these lines avoid).
#
# usage: slurm_cluster.sh install | up | down         (as root)
#   BASE       state, logs and slurm.conf (default /tmp/lvmtrain-slurm); clients need
#              SLURM_CONF=$BASE/etc/slurm.conf
#   NODE_CPUS  CPUs each node advertises (default 2)
# `up` exits 3 when the packages cannot be installed (no apt / no repository): tests skip on it.
set -euo pipefail
BASE=${BASE:-/tmp/lvmtrain-slurm}
NODE_CPUS=${NODE_CPUS:-2}
export SLURM_CONF=$BASE/etc/slurm.conf
HOST=$(hostname -s)

log() { printf '[slurm_cluster %s] %s\n' "$(date +%T)" "$*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then return 0; fi
  command -v apt-get >/dev/null || { log "no apt-get: cannot install slurm"; exit 3; }
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         slurmctld slurmd slurm-client munge >/dev/null; }; then
    log "apt-get could not install slurmctld slurmd slurm-client munge"; exit 3
  fi
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged   # no systemd here
  cp /run/munge/munged.pid "$BASE/munged.pid"   # ours: `down` stops it
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  log "munged did not come up"; exit 1
}

write_conf() {
  mkdir -p "$BASE"/{etc,state,spool/n1,spool/n2,log}
  # NOTE: SlurmctldHost must be this machine's hostname; each slurmd has its own port (-N name).
  cat >"$SLURM_CONF" <<CONF
ClusterName=lvmtrain-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/state/slurmctld.pid
SlurmdPidFile=$BASE/state/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=300
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6821 CPUs=$NODE_CPUS RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6822 CPUs=$NODE_CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  # `scontrol show hostnames` gives n1: the batch script's MASTER_ADDR must resolve.
  grep -q "# lvmtrain-slurm-nodes$" /etc/hosts || echo "127.0.0.1 n1 n2 # lvmtrain-slurm-nodes" >>/etc/hosts
}

up() {
  [ "$(id -u)" = 0 ] || { log "not root: cannot start slurmd"; exit 3; }
  install_packages
  mkdir -p "$BASE"
  start_munge
  write_conf
  /usr/sbin/slurmctld -f "$SLURM_CONF" -i
  for n in n1 n2; do /usr/sbin/slurmd -f "$SLURM_CONF" -N "$n"; done
  for _ in $(seq 150); do
    [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u)" = idle ] && { log "up: $(sinfo -h -N -o '%N:%T' | tr '\n' ' ')"; return; }
    sleep 0.2
  done
  sinfo -N >&2 || true; log "nodes did not become idle"; exit 1
}

down() {
  [ -f "$SLURM_CONF" ] && scontrol shutdown >/dev/null 2>&1 || true
  local pids="" alive
  for f in "$BASE"/state/slurmctld.pid "$BASE"/state/slurmd-*.pid; do [ -f "$f" ] && pids="$pids $(cat "$f")"; done
  for _ in $(seq 50); do
    alive=""
    for p in $pids; do [ -d "/proc/$p" ] && [ "$(awk '{print $3}' "/proc/$p/stat")" != Z ] && alive="$alive $p"; done
    [ -z "$alive" ] && break
    sleep 0.2
  done
  for p in $alive; do kill -9 "$p" 2>/dev/null || true; done
  rm -f "$BASE"/state/*.pid
  if [ -f "$BASE/munged.pid" ]; then kill "$(cat "$BASE/munged.pid")" 2>/dev/null || true; rm -f "$BASE/munged.pid"; fi
  sed -i '/# lvmtrain-slurm-nodes$/d' /etc/hosts
  log "down"
}

case ${1:-} in
  install) install_packages ;;
  up) up ;;
  down) down ;;
  *) echo "usage: $0 install|up|down" >&2; exit 2 ;;
esac
