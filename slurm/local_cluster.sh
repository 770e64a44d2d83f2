#!/usr/bin/env bash
# A one-machine SLURM cluster, to try the sbatch templates and to test them.
#
#   slurm/local_cluster.sh up       install SLURM + munge if missing (Debian, root), write the
#                                   config, start munged, slurmctld (with an empty job queue)
#                                   and slurmd, wait for the node
#   slurm/local_cluster.sh status   the node's state, or "down"
#   slurm/local_cluster.sh down     stop the daemons (by pid)
#   slurm/local_cluster.sh env      print the export line client commands need (SLURM_CONF)
#
# All state lives under $GPT1DS_SLURM_DIR (default: /tmp/gpt1-ds-slurm): keys, sockets, spool,
# logs, pid files. No systemd. Partitions: "cpu" (default) and "urgent", a higher-priority
# partition on the same node whose jobs preempt (requeue) those of "cpu".
# Client commands need SLURM_CONF: eval "$(slurm/local_cluster.sh env)".
set -euo pipefail

DIR=${GPT1DS_SLURM_DIR:-/tmp/gpt1-ds-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
HOST=$(hostname -s)

log() { echo "local_cluster: $*" >&2; }

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && ls /usr/lib/*/libpmix.so >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        log "SLURM is not installed and this is not root: apt-get install slurmctld slurmd slurm-client munge libpmix-dev"
        exit 1
    fi
    log "installing SLURM and munge (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge libpmix-dev >/dev/null
}

write_conf() {
    local node
    node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*//")  # CPUs, sockets, cores, memory of this machine
    cat >"$CONF" <<EOF
ClusterName=gpt1ds
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$HOST NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
    install_if_missing
    mkdir -p "$DIR"/{munge,spool/ctld,spool/d,log,run}
    chmod 0755 "$DIR" "$DIR/munge"  # munged refuses a socket folder others can write to
    [ -f "$DIR/munge.key" ] || mungekey -c -k "$DIR/munge.key" >/dev/null 2>&1
    chmod 0400 "$DIR/munge.key"
    write_conf
    if ! running "$DIR/run/munged.pid"; then
        munged --key-file="$DIR/munge.key" --socket="$DIR/munge/munge.socket" \
            --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    fi
    # -c: a fresh controller state. Jobs of an earlier `up` are not recovered: one left "running"
    # by a daemon that was killed would hold the node's CPUs until SLURM times it out.
    running "$DIR/run/slurmctld.pid" || slurmctld -c -f "$CONF"
    running "$DIR/run/slurmd.pid" || slurmd -f "$CONF"
    for _ in $(seq 1 300); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        if [ "$state" = idle ] || [ "$state" = mixed ] || [ "$state" = allocated ]; then
            log "up: node $HOST is $state (SLURM_CONF=$CONF)"
            return
        fi
        sleep 0.2
    done
    log "the node did not become idle; logs in $DIR/log"
    exit 1
}

down() {
    for daemon in slurmd slurmctld munged; do
        pidfile=$DIR/run/$daemon.pid
        if running "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    log "down"
}

status() {
    if running "$DIR/run/slurmctld.pid" && running "$DIR/run/slurmd.pid"; then
        sinfo -h -o "%P %T %D %c" || true
    else
        echo down
    fi
}

case "${1:-status}" in
up) up ;;
down) down ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
