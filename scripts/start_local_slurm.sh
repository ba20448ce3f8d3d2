#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the `slurm` tests (CI) and for trying the
# templates in slurm/ on a workstation. Needs root and Debian/Ubuntu (apt). Idempotent: rerunning
# it with the daemons up changes nothing.
#
#   sudo bash scripts/start_local_slurm.sh          install (if needed), configure, start
#   sudo bash scripts/start_local_slurm.sh stop     stop the daemons it started
#
# What it runs: munged (authentication), mariadb + slurmdbd (accounting: `sacct`, which the Hydra
# submitit launcher polls to learn that a job died), slurmctld and slurmd. The node gets every
# CPU and the memory less 1 GiB; the partition is `debug` with no time limit.
set -euo pipefail

HOST=$(hostname -s)
NCPU=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
CONF=/etc/slurm
DB_PASS=deepspec-local

stop() {
  for pid in /run/slurmctld.pid /run/slurmd.pid /run/slurmdbd.pid; do
    [[ -f $pid ]] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  pkill -x mariadbd 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
}
if [[ ${1:-} == stop ]]; then stop; exit 0; fi
if [[ $EUID -ne 0 ]]; then echo "start_local_slurm.sh: run as root (it installs packages and starts daemons)" >&2; exit 1; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    munge slurm-client slurmctld slurmd slurmdbd mariadb-server >/dev/null
fi

wait_for() {  # wait_for <what> <seconds> <command...>
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "start_local_slurm.sh: $what did not come up in ${secs}s" >&2; return 1
}

# munge
[[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
wait_for munge 10 bash -c "munge -n | unmunge"

# mariadb for slurmdbd
install -d -o mysql -g mysql -m 0755 /run/mysqld
if ! pgrep -x mariadbd >/dev/null; then
  (mariadbd --user=mysql >/var/log/mariadb-slurm.log 2>&1 &)
fi
wait_for mariadb 30 mysqladmin ping
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

mkdir -p "$CONF" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
chmod 600 "$CONF/slurmdbd.conf"

cat >"$CONF/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Credentials (and the revocation of a requeued job's old one) live 10 s instead of 120 s, so a
# requeued job starts again after ~10 s: the preemption tests requeue jobs.
AuthInfo=cred_expire=10
# Scheduling passes every 2 s instead of 60 (main) and 30 (backfill): a requeued job becomes eligible (after
# cred_expire) without an event that runs the scheduler, so it otherwise waits for the next pass (up to 60 s
# more per requeue; scripts/kill_campaign.py requeues jobs 50 times).
SchedulerParameters=sched_interval=2,bf_interval=2
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MailProg=/bin/true
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU Sockets=1 CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

[[ -f /run/slurmdbd.pid ]] && kill -0 "$(cat /run/slurmdbd.pid)" 2>/dev/null || slurmdbd
wait_for slurmdbd 30 sacctmgr -n list cluster
sacctmgr -i -Q add cluster local >/dev/null 2>&1 || true
[[ -f /run/slurmctld.pid ]] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null || slurmctld -i
[[ -f /run/slurmd.pid ]] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null || slurmd
wait_for "an idle node" 30 bash -c '[[ $(sinfo -h -o %t) == idle ]]'
sinfo
