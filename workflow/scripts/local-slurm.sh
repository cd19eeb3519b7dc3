#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try profiles/slurm without a real cluster.
#
#   workflow/scripts/local-slurm.sh start    # install slurm-wlm + munge if missing, start
#   workflow/scripts/local-slurm.sh status   # exit 0 when the cluster takes jobs
#   workflow/scripts/local-slurm.sh stop     # cancel jobs, stop slurmctld, slurmd, munged
#
# Then, from the repository root (partition "local", no account, no GPUs):
#
#   snakemake --profile profiles/slurm --configfile .test/config.yaml \
#       --default-resources slurm_partition=local --slurm-no-account
#
# (.ci/slurm does this in CI and compares the results with a local run.)
#
# What it sets up (Debian/Ubuntu, as root or through sudo): munged as the munge user with
# /etc/munge/munge.key; slurmctld and slurmd as root; /etc/slurm/slurm.conf naming this
# host (`hostname -s`, at 127.0.0.1) as controller and only node, with the CPUs and
# topology `slurmd -C` reports, RealMemory a little below `free -m`'s total, no GPUs (no
# gres), select/cons_tres with CR_Core_Memory, proctrack/linuxproc, task/none, one
# partition, and no accounting (sacct has nothing: the plugin polls with squeue, which is
# why MinJobAge keeps finished jobs visible, for an hour).  `start` is idempotent: with
# the cluster up it only says so.  It refuses to touch a slurm.conf it did not write, so it
# never reconfigures a real cluster's node.
#
# Settings (environment): LOCAL_SLURM_PARTITION (default "local"), LOCAL_SLURM_STATE
# (pid files and logs, default /var/lib/local-slurm), LOCAL_SLURM_MEM_HEADROOM_MB (memory
# kept from slurmd, default max(512, 5% of the total)), LOCAL_SLURM_TIMEOUT (seconds to
# wait for the node, default 60), LOCAL_SLURM_MIN_JOB_AGE (seconds a finished job stays in
# squeue, default 3600; at least 120 for the plugin's squeue polling).
set -euo pipefail

PARTITION="${LOCAL_SLURM_PARTITION:-local}"
STATE="${LOCAL_SLURM_STATE:-/var/lib/local-slurm}"
TIMEOUT="${LOCAL_SLURM_TIMEOUT:-60}"
MIN_JOB_AGE="${LOCAL_SLURM_MIN_JOB_AGE:-3600}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by blockpruner workflow/scripts/local-slurm.sh"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
HOST="$(hostname -s)"

log() { echo "local-slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

# a wrong command is a usage error for anyone, before root is asked for
case "${1:-}" in start | stop | status) ;; *) echo "usage: $0 start|stop|status" >&2; exit 2 ;; esac

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "needs root (or sudo) to install and run the daemons"
    SUDO=(sudo -n)
fi
as_root() { "${SUDO[@]}" "$@"; }

ours() { [ -f "$CONF" ] && head -n 1 "$CONF" | grep -qxF "$MARKER"; }

pid_alive() {  # pid file -> 0 when the process it names runs
    local pid
    pid="$(as_root cat "$1" 2>/dev/null || true)"
    [ -n "$pid" ] && as_root kill -0 "$pid" 2>/dev/null
}

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1 || true; }

cluster_up() {  # controller answers and the node takes jobs
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    case "$(node_state)" in
        idle* | mixed* | allocated* | completing*) return 0 ;;
        *) return 1 ;;
    esac
}

install() {
    local missing=()
    for cmd in slurmctld slurmd sbatch squeue munged; do
        command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM and munge yourself"
    log "installing slurm-wlm and munge (missing: ${missing[*]})"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    if [ -f "$CONF" ] && ! ours; then
        die "$CONF exists and was not written by this script; not touching a real cluster's configuration"
    fi
    local node total headroom mem
    # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
    node="$(/usr/sbin/slurmd -C | head -n 1)"
    [[ "$node" == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    total="$(free -m | awk '/^Mem:/ {print $2}')"
    headroom="${LOCAL_SLURM_MEM_HEADROOM_MB:-$(( total / 20 > 512 ? total / 20 : 512 ))}"
    mem=$(( total - headroom ))
    [ "$mem" -gt 0 ] || die "free -m reports ${total} MB, too little for a headroom of ${headroom} MB"
    # the topology from slurmd -C, our own name, address and memory
    node="$(echo "$node" | sed -E "s/^NodeName=[^ ]+/NodeName=$HOST NodeAddr=127.0.0.1/; s/RealMemory=[0-9]+/RealMemory=$mem/")"
    as_root mkdir -p /etc/slurm "$STATE" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
    as_root tee "$CONF" >/dev/null <<EOF
$MARKER
# A one-node cluster on $HOST for trying the workflow's SLURM profile; no accounting, no GPUs.
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue is the only record without accounting: keep finished jobs visible (the plugin's
# squeue status polling needs at least 120 s; longer lets a CI check list every job)
MinJobAge=$MIN_JOB_AGE
SlurmctldTimeout=30
SlurmdTimeout=60
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pid_alive "$MUNGE_PID" || munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if ! as_root test -s "$MUNGE_KEY"; then
        log "creating $MUNGE_KEY"
        as_root mkdir -p /etc/munge
        as_root dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
    as_root chown munge:munge "$MUNGE_KEY"
    as_root chmod 0400 "$MUNGE_KEY"
    as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
    as_root chown munge:munge /run/munge /var/log/munge /var/lib/munge
    as_root chmod 0755 /run/munge
    as_root chmod 0700 /var/log/munge /var/lib/munge
    as_root runuser -u munge -- /usr/sbin/munged
    as_root touch "$STATE/munged.ours"  # stop ends munged only when start started it
    munge -n </dev/null | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
}

start() {
    if ours && cluster_up; then
        log "up: partition $PARTITION on $HOST ($(sinfo -h -N -n "$HOST" -o '%c CPUs, %m MB')); nothing to do"
        return 0
    fi
    install
    write_conf
    local t0=$SECONDS
    start_munge
    pid_alive "$STATE/slurmctld.pid" || as_root /usr/sbin/slurmctld
    pid_alive "$STATE/slurmd.pid" || as_root /usr/sbin/slurmd
    local state=""
    while [ $(( SECONDS - t0 )) -lt "$TIMEOUT" ]; do
        state="$(node_state)"
        case "$state" in
            idle* | mixed* | allocated*) break ;;
            down* | drain* | drained* | fail*)
                as_root scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
    done
    if ! cluster_up; then
        log "node state: '${state}'"
        as_root tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
        die "the cluster did not come up within ${TIMEOUT}s"
    fi
    log "up after $(( SECONDS - t0 ))s: partition $PARTITION on $HOST ($(sinfo -h -N -n "$HOST" -o '%c CPUs, %m MB')); logs in $STATE"
}

stop_pid() {  # name, pid file
    local pid i
    pid="$(as_root cat "$2" 2>/dev/null || true)"
    if [ -n "$pid" ] && as_root kill -0 "$pid" 2>/dev/null; then
        as_root kill -TERM "$pid"
        for i in $(seq 100); do
            as_root kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if as_root kill -0 "$pid" 2>/dev/null; then
            log "$1 ($pid) ignores SIGTERM; killing it"
            as_root kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $1 ($pid)"
    fi
    as_root rm -f "$2"
}

stop() {
    if [ -f "$CONF" ] && ! ours; then
        log "$CONF was not written by this script; not stopping a real cluster's daemons"
        return 1
    fi
    if ours && scontrol ping 2>/dev/null | grep -q "is UP"; then
        local jobs
        jobs="$(squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING -o %i 2>/dev/null | tr '\n' ' ')"
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            as_root scancel $jobs || true
            local i
            for i in $(seq 30); do
                [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
                sleep 1
            done
        fi
    fi
    local names="slurmctld slurmd slurmstepd"
    stop_pid slurmd "$STATE/slurmd.pid"
    stop_pid slurmctld "$STATE/slurmctld.pid"
    if as_root test -f "$STATE/munged.ours"; then
        stop_pid munged "$MUNGE_PID"
        as_root rm -f "$STATE/munged.ours"
        names+=" munged"
    fi
    # With a slurm.conf and no controller every scontrol call waits ~10 s before it fails, and
    # the SLURM executor plugin runs one whenever Snakemake loads it (any snakemake command):
    # take our slurm.conf away (start writes it again; a copy stays in $STATE).
    if ours; then
        as_root cp "$CONF" "$STATE/slurm.conf"
        as_root rm -f "$CONF"
    fi
    local left="" name
    for name in $names; do
        left+="$(pgrep -a -x "$name" || true)"
    done
    if [ -n "$left" ]; then
        log "still running (not started through this script's pid files):"
        echo "$left" >&2
        return 1
    fi
    log "stopped; none of $names left"
}

status() {
    if ours && cluster_up; then
        echo "up: partition $PARTITION on $HOST ($(sinfo -h -N -n "$HOST" -o '%c CPUs, %m MB, %T'))"
        return 0
    fi
    echo "down"
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
