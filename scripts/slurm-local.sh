#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the launcher tests (tests/test_launch.py)
# and for trying slurm/apogee.sbatch. Needs root; works without systemd.
#
#   bash scripts/slurm-local.sh start    # install (once), write slurm.conf, start munged/slurmctld/slurmd
#   bash scripts/slurm-local.sh status   # the recorded daemons and the node's state
#   bash scripts/slurm-local.sh stop     # stop exactly the daemons that `start` recorded
#
# Packages: slurm-wlm munge, and openmpi-bin libopenmpi-dev for mpirun and `srun --mpi=pmix`.
# apt's policy-rc.d keeps services from starting at install, so the daemons are started by hand
# and their PIDs recorded in $STATE_DIR/pids; `stop` kills those PIDs only (never by name).
# Both `start` and `stop` are idempotent. See shared/reference/slurm-local.md for the settings.
set -euo pipefail

STATE_DIR=${APOGEE_SLURM_STATE:-/var/lib/apogee-slurm}
PID_FILE=$STATE_DIR/pids
CONF=/etc/slurm/slurm.conf
MARKER="# Written by apogee scripts/slurm-local.sh"
DAEMONS=(munged slurmctld slurmd)

die() { echo "slurm-local: $*" >&2; exit 1; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null && command -v srun >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v mpirun >/dev/null || missing+=(openmpi-bin)
    # libpmix.so (unversioned) is what `srun --mpi=pmix` loads; libopenmpi-dev brings it.
    dpkg -s libopenmpi-dev >/dev/null 2>&1 || missing+=(libopenmpi-dev)
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "slurm-local: installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

write_conf() {
    [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && die "$CONF exists and was not written by this script; not touching it"
    local host node_line mem
    host=$(hostname -s)
    # CPUs, sockets, cores and threads as slurmd sees them; RealMemory a little under the total
    # so the node is not drained for having less memory than configured.
    node_line=$(slurmd -C | head -n 1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    node_line=$(sed -e "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/" \
                    -e "s/RealMemory=[0-9]*/RealMemory=$((mem * 95 / 100))/" <<<"$node_line")
    mkdir -p /etc/slurm
    cat >"$CONF.tmp" <<EOF
$MARKER: a one-node cluster for tests.
ClusterName=apogee
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait for the credential to expire: 10 s instead of the default 120 s.
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# pgid, not linuxproc: with linuxproc orphaned background processes outlive their job.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
$node_line State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# The PID recorded for daemon $1, if that process is still that daemon (PIDs get reused).
running_pid() {
    local pid
    pid=$(awk -v d="$1" '$1 == d {print $2}' "$PID_FILE" 2>/dev/null || true)
    [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$1" ] && echo "$pid"
    return 0
}

record_pid() {  # record_pid DAEMON PIDFILE_WRITTEN_BY_THE_DAEMON
    local pid="" i
    for i in $(seq 50); do
        pid=$(cat "$2" 2>/dev/null || true)
        [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$1" ] && break
        pid=""; sleep 0.1
    done
    [ -n "$pid" ] || die "$1 did not start; see its log (/var/log/munge, /var/log/slurm)"
    { grep -v "^$1 " "$PID_FILE" 2>/dev/null || true; echo "$1 $pid"; } >"$PID_FILE.tmp"
    mv "$PID_FILE.tmp" "$PID_FILE"
}

start_daemon() {
    local name=$1
    if [ -n "$(running_pid "$name")" ]; then
        echo "slurm-local: $name already running (pid $(running_pid "$name"))"; return 0
    fi
    case $name in
        munged)
            mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
            [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || \
                dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
            chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
            rm -f /run/munge/munged.pid
            runuser -u munge -- /usr/sbin/munged --force
            record_pid munged /run/munge/munged.pid ;;
        slurmctld)
            rm -f "$STATE_DIR/slurmctld.pid"; /usr/sbin/slurmctld
            record_pid slurmctld "$STATE_DIR/slurmctld.pid" ;;
        slurmd)
            rm -f "$STATE_DIR/slurmd.pid"; /usr/sbin/slurmd
            record_pid slurmd "$STATE_DIR/slurmd.pid" ;;
    esac
    echo "slurm-local: started $name (pid $(running_pid "$name"))"
}

wait_for_node() {
    local host state i
    host=$(hostname -s)
    for i in $(seq 60); do
        state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
        case $state in
            idle*|mixed*|allocated*|completing*) echo "slurm-local: node $host is $state"; return 0 ;;
            down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $host did not become idle (state: ${state:-unknown}); see /var/log/slurm/"
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (daemons, /etc/slurm)"
    install_packages
    mkdir -p "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" /var/log/slurm
    write_conf
    for name in "${DAEMONS[@]}"; do start_daemon "$name"; done
    wait_for_node
}

stop() {
    local name pid i
    for name in slurmd slurmctld munged; do  # reverse start order
        pid=$(running_pid "$name")
        [ -n "$pid" ] || continue
        kill "$pid"
        for i in $(seq 50); do [ -d /proc/"$pid" ] || break; sleep 0.1; done
        [ -d /proc/"$pid" ] && kill -9 "$pid"
        echo "slurm-local: stopped $name (pid $pid)"
    done
    rm -f "$PID_FILE"
}

status() {
    local name pid rc=0
    for name in "${DAEMONS[@]}"; do
        pid=$(running_pid "$name")
        if [ -n "$pid" ]; then echo "$name: running (pid $pid)"; else echo "$name: not running"; rc=3; fi
    done
    [ $rc = 0 ] && sinfo -h -o "partition %P: node %N is %T (%c CPUs)"
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
