#!/usr/bin/env bash
# A single-node Slurm test cluster WITH accounting on this machine, for .ci/slurm.sh: everything on
# 127.0.0.1, daemons started by hand (no systemd) and stopped only by the PIDs recorded when they started.
#
#   .ci/slurm-cluster.sh check     can this machine host it? prints the reason and exits 1 when not
#   .ci/slurm-cluster.sh install   apt-get the packages (skipped when all are installed)
#   .ci/slurm-cluster.sh up        stop what an earlier run left, wipe its state, start a fresh cluster
#   .ci/slurm-cluster.sh down      cancel every job, wait for them, stop the daemons by their PIDs, remove the configs
#
# Daemons: munged -> mariadbd (private datadir, port 3307) -> slurmdbd -> slurmctld -> slurmd.
# Partitions: cpu (default) and gpu, both on this node (it has no GPU), the names of profiles/slurm.
# State, logs and PID files live under $DRPO_SLURM_BASE (default /var/tmp/drpo-slurm); the configs are written to
# /etc/slurm/ (the jobs' inner srun drops SLURM_CONF, so the default path is the one every client finds), and only
# over files that this script wrote. Requires root and Debian's packages (tested: Debian 12, Slurm 22.05).
set -euo pipefail

BASE=${DRPO_SLURM_BASE:-/var/tmp/drpo-slurm}
ETC=/etc/slurm
MARK="# Written by DrPO .ci/slurm-cluster.sh"
CLUSTER=drpoci
HOST=$(hostname -s)
DB_PORT=3307
DB_PASS=drpo-ci-only
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stopped in reverse

say() { echo "[slurm-cluster] $*"; }
die() { say "ERROR: $*" >&2; exit 1; }

check() {
    [ "$(id -u)" = 0 ] || { echo "not root (the daemons and apt-get need root)"; return 1; }
    command -v apt-get >/dev/null || { echo "no apt-get (the cluster is built from Debian's packages)"; return 1; }
    for f in "$ETC/slurm.conf" "$ETC/slurmdbd.conf"; do
        if [ -e "$f" ] && ! head -1 "$f" | grep -qF "$MARK"; then
            echo "$f exists and was not written by this script: not touching this machine's Slurm"; return 1
        fi
    done
    return 0
}

installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q "install ok installed"; }

install() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do installed "$pkg" || missing+=("$pkg"); done
    if [ ${#missing[@]} -eq 0 ]; then say "packages already installed"; return 0; fi
    say "installing ${missing[*]}"
    # Keep package scripts from starting any service: daemons here are started by hand, and only by `up`.
    local guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        guard=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$guard"; chmod 755 "$guard"
    fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } || rc=$?
    [ -z "$guard" ] || rm -f "$guard"
    return $rc
}

# --- processes ---------------------------------------------------------------------------------------------
pidfile() { echo "$BASE/pids/$1.pid"; }

# The PID recorded for a daemon, if that process is alive and still is that daemon (never trust a stale file).
live_pid() {
    local f pid; f=$(pidfile "$1")
    [ -f "$f" ] || return 1
    pid=$(cat "$f")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] && echo "$pid"
}

stop_daemon() {
    local name=$1 pid i
    if pid=$(live_pid "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 60); do [ -d "/proc/$pid" ] || break; sleep 0.5; done
        if [ -d "/proc/$pid" ]; then
            say "$name ($pid) ignored TERM for 30 s: KILL"; kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name ($pid)"
    fi
    rm -f "$(pidfile "$name")"
}

# Start a daemon in its foreground mode, as a simple command so that $! is the daemon itself, in a session of its
# own: a Ctrl-C or a signal to the caller's process group must not reach it before its jobs are cancelled. (This
# script runs without job control, so the child is no group leader and setsid does not fork.)
start_daemon() {
    local name=$1; shift
    setsid "$@" > "$BASE/logs/$name.out" 2>&1 < /dev/null &
    echo $! > "$(pidfile "$name")"
}

# Wait until a check passes; stop waiting as soon as the daemon has died, and show its logs.
wait_for() {
    local name=$1 seconds=$2 i; shift 2
    for i in $(seq 1 $((seconds * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        # The recorded PID itself: for a moment after the start it is still setsid/setpriv, about to exec the daemon.
        if ! kill -0 "$(cat "$(pidfile "$name")")" 2>/dev/null; then
            say "$name died while starting:"; tail -n 20 "$BASE/logs/$name".* >&2 || true; return 1
        fi
        sleep 0.25
    done
    say "$name did not come up within $seconds s:"; tail -n 20 "$BASE/logs/$name".* >&2 || true
    return 1
}

port_free() {
    ! ss -Htln "sport = :$1" | grep -q .
}

# --- configuration -----------------------------------------------------------------------------------------
write_configs() {
    local node cpus mem
    node=$(slurmd -C | head -1)   # NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$((mem * 9 / 10))         # leave the rest to the daemons and the submitting snakemake
    node=$(sed -e 's/RealMemory=[0-9]*//' -e 's/UpTime=.*//' <<<"$node")
    mkdir -p "$ETC"
    cat > "$ETC/slurm.conf" <<EOF
$MARK for the CI's single-node test cluster; \`.ci/slurm-cluster.sh up\` rewrites it.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it starts again (Slurm's default is 120).
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/logs/slurmctld.log
SlurmdLogFile=$BASE/logs/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here: jobs are scheduled by their requests but not confined to them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
# Look at pending jobs every 5 s (default 60 s): a requeued job becomes eligible without an event to trigger it.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job that asks no memory is given the whole node.
DefMemPerCPU=1000
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageEnforce=associations
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
# Sample every second, so that sacct has a MaxRSS for jobs of a few seconds.
JobAcctGatherFrequency=task=1
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue this long; the squeue status command needs >= 3 x its first wait.
MinJobAge=600
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300
$node NodeAddr=127.0.0.1 RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
    cat > "$ETC/slurmdbd.conf" <<EOF
$MARK for the CI's single-node test cluster; \`.ci/slurm-cluster.sh up\` rewrites it.
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$HOST
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$BASE/logs/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm "$ETC/slurmdbd.conf"; chmod 600 "$ETC/slurmdbd.conf"
    say "node: $node RealMemory=$mem; partitions cpu (default), gpu"
}

# --- up / down ---------------------------------------------------------------------------------------------
up() {
    local reason
    reason=$(check) || die "$reason"
    for cmd in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sacctmgr sinfo; do
        command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || die "$cmd not found: run install first"
    done
    export PATH=$PATH:/usr/sbin
    down quiet                       # whatever an earlier run left behind
    for port in 6817 6818 6819 $DB_PORT; do
        port_free "$port" || die "port $port is in use: $(ss -Htlnp "sport = :$port" | head -1)"
    done
    case "$BASE" in /|"") die "refusing DRPO_SLURM_BASE=$BASE" ;; esac
    rm -rf "$BASE"
    mkdir -p "$BASE"/{pids,logs,state,spool,run,mysql,mysql-run}
    chown slurm:slurm "$BASE/state" "$BASE/run"
    chown mysql:mysql "$BASE/mysql" "$BASE/mysql-run"
    touch "$BASE/logs/slurmctld.log" "$BASE/logs/slurmdbd.log" "$BASE/logs/mariadbd.log"
    chown slurm:slurm "$BASE/logs/slurmctld.log" "$BASE/logs/slurmdbd.log"
    chown mysql:mysql "$BASE/logs/mariadbd.log"
    write_configs

    if [ ! -s /etc/munge/munge.key ]; then   # the package creates it; only a removed key is made again
        say "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    start_daemon munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    wait_for munged 15 sh -c 'munge -n | unmunge'

    mariadb-install-db --user=mysql --datadir="$BASE/mysql" --skip-test-db \
        --auth-root-authentication-method=socket > "$BASE/logs/mariadb-install-db.log" 2>&1 \
        || { tail -n 20 "$BASE/logs/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
    local sock=$BASE/mysql-run/mysqld.sock
    start_daemon mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$BASE/mysql" \
        --bind-address=127.0.0.1 --port=$DB_PORT --socket="$sock" --pid-file="$BASE/mysql-run/mysqld.pid" \
        --log-error="$BASE/logs/mariadbd.log" --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900
    wait_for mariadbd 60 mariadb-admin --socket="$sock" ping
    mariadb --socket="$sock" <<EOF
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

    start_daemon slurmdbd /usr/sbin/slurmdbd -D
    wait_for slurmdbd 60 sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -i add account ci Cluster="$CLUSTER" Description=ci Organization=ci >/dev/null
    sacctmgr -i add user root Account=ci DefaultAccount=ci >/dev/null

    start_daemon slurmctld /usr/sbin/slurmctld -D -i
    wait_for slurmctld 60 scontrol ping
    start_daemon slurmd /usr/sbin/slurmd -D
    wait_for slurmd 60 sh -c "sinfo -h -n $HOST -o %T | grep -qx idle"
    say "up: $(sinfo -h -o '%P %a %D %T %C' | tr '\n' ';')"
}

down() {
    local quiet=${1:-} pid jobs i
    export PATH=$PATH:/usr/sbin
    if live_pid slurmctld >/dev/null; then
        # Jobs first: slurmd stopped under a running job leaves its slurmstepd and the job running.
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs $jobs"
            scancel $jobs 2>/dev/null || true
            # squeue lists pending, running and completing jobs by default: wait until none is left.
            for i in $(seq 1 120); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
        fi
    fi
    for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do stop_daemon "${DAEMONS[$i]}"; done
    # Our configs go too: with a slurm.conf naming a controller that is not running, every Slurm command (and so
    # every `snakemake` that loads the Slurm plugin, which calls `scontrol show config`) waits ~9 s to fail.
    for f in "$ETC/slurm.conf" "$ETC/slurmdbd.conf"; do
        if [ -f "$f" ] && head -1 "$f" | grep -qF "$MARK"; then rm -f "$f"; fi
    done
    [ -n "$quiet" ] || say "down"
}

status() {
    local name pid
    for name in "${DAEMONS[@]}"; do
        if pid=$(live_pid "$name"); then echo "$name $pid running"; else echo "$name stopped"; fi
    done
}

case "${1:-}" in
    check) check ;;
    install) install ;;
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 check|install|up|down|status" >&2; exit 2 ;;
esac
