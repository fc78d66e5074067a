#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine, for medscale's tests: its own munged, one slurmctld and
# two slurmd nodes (n1, n2) on loopback ports, all state under one directory.
#
#   slurm/testing/cluster.sh start [DIR]   # prints the line to export SLURM_CONF
#   slurm/testing/cluster.sh status [DIR]
#   slurm/testing/cluster.sh stop [DIR]    # cancels its jobs, stops exactly the daemons it started
#
# DIR defaults to $MEDSCALE_SLURM_DIR, else /tmp/medscale-slurm-$UID. Needs root (slurmd starts jobs as
# their users) and Debian's slurm-wlm and munge packages: apt-get install slurm-wlm munge.
# Knobs (environment): SLURM_TEST_CPUS (CPUs each node advertises, default 4: test jobs share the
# real cores), SLURM_TEST_CRED_EXPIRE (seconds; also how long a requeued job is held, default 10).
set -euo pipefail

ACTION=${1:-}
DIR=${2:-${MEDSCALE_SLURM_DIR:-/tmp/medscale-slurm-$(id -u)}}
CPUS=${SLURM_TEST_CPUS:-4}
CRED_EXPIRE=${SLURM_TEST_CRED_EXPIRE:-10}
NODES=(n1 n2)
export SLURM_CONF=$DIR/slurm.conf

die() { echo "cluster.sh: $*" >&2; exit 1; }

need() {
    local missing=()
    for b in munged slurmctld slurmd sinfo sbatch scontrol; do command -v "$b" >/dev/null || missing+=("$b"); done
    ((${#missing[@]} == 0)) || die "missing ${missing[*]}: install them with 'apt-get install slurm-wlm munge' (as root)"
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts every job as its user)"
}

free_ports() {  # N free TCP ports on 127.0.0.1, one per line
    python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))
PY
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    local ports host
    mapfile -t ports < <(free_ports 3)
    host=$(hostname -s)
    mkdir -p "$DIR/state" "$DIR/log"
    cat > "$DIR/slurm.conf" <<CONF
# Written by slurm/testing/cluster.sh: a private test cluster, two nodes on this one machine.
ClusterName=medscale-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${ports[0]}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool-%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=20
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[1]} CPUs=$CPUS RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[2]} CPUs=$CPUS RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    need
    if alive "$DIR/slurmctld.pid"; then echo "already running: export SLURM_CONF=$SLURM_CONF"; return 0; fi
    mkdir -p "$DIR"
    write_config
    # munge: a private key and socket, so a site's own munged (if any) is left alone.
    [[ -s $DIR/munge.key ]] || { head -c 1024 /dev/urandom > "$DIR/munge.key"; chmod 400 "$DIR/munge.key"; }
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge.seed"
    slurmctld -f "$SLURM_CONF" -i
    for n in "${NODES[@]}"; do slurmd -f "$SLURM_CONF" -N "$n"; done
    local i
    for i in $(seq 1 60); do  # nodes register within seconds
        if [[ $(sinfo -h -o '%t' -p debug 2>/dev/null | sort -u | tr '\n' ' ') == "idle " ]]; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 1
    done
    sinfo -N >&2 || true
    die "nodes did not come up within 60 s: see $DIR/log/"
}

status() {
    alive "$DIR/slurmctld.pid" || { echo "not running ($DIR)"; return 1; }
    sinfo -N
    squeue
}

stop_pid() {  # stop the daemon of a pid file, waiting until it is gone
    local f=$1 pid i
    [[ -s $f ]] || return 0
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    rm -f "$f"
}

stop() {
    [[ -f $SLURM_CONF ]] || { echo "nothing to stop ($DIR)"; return 0; }
    if alive "$DIR/slurmctld.pid"; then
        scancel --full --signal=KILL --state=RUNNING -u root 2>/dev/null || true
        scancel -u root 2>/dev/null || true
        local i
        for i in $(seq 1 30); do [[ -z $(squeue -h -t RUNNING,COMPLETING 2>/dev/null) ]] && break; sleep 1; done
    fi
    for n in "${NODES[@]}"; do stop_pid "$DIR/slurmd-$n.pid"; done
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/munged.pid"
    echo "stopped ($DIR)"
}

case $ACTION in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
