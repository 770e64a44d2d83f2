#!/usr/bin/env bash
# A SLURM cluster on this one machine, to try the sbatch templates and to test them.
#
#   slurm/local_cluster.sh up [--nodes N]
#                                   install SLURM + munge if missing (Debian, root), write the
#                                   config, start munged, slurmctld (with an empty job queue)
#                                   and the slurmd(s), wait for the nodes
#   slurm/local_cluster.sh status   the nodes' state, or "down"
#   slurm/local_cluster.sh down     stop the daemons (by pid); with several nodes, also remove
#                                   their network namespaces, bridge and /etc/hosts lines
#   slurm/local_cluster.sh env      print the export line client commands need (SLURM_CONF)
#
# One node (the default): this machine's hostname on 127.0.0.1; partitions "cpu" (default) and
# "urgent", a higher-priority partition on the same node whose jobs preempt (requeue) those of
# "cpu". Several nodes (--nodes 2): each node is a slurmd in its own network namespace (gpt1n1,
# gpt1n2, ...) with its own hostname (a UTS namespace) and address (10.231.0.11, .12, ... on a
# bridge, gpt1br, where the controller is 10.231.0.1), its own spool and job temporary directory
# (TmpFS, where PMIx keeps its files); /etc/hosts names the nodes, so that ranks find each other
# by name as on a cluster. Debian's SLURM is built without multiple-slurmd support, hence the
# namespaces. It needs root; its controller listens on port 6827, so that a one-node cluster
# (port 6817) can run beside it, with another GPT1DS_SLURM_DIR.
#
# All state lives under $GPT1DS_SLURM_DIR (default: /tmp/gpt1-ds-slurm): keys, sockets, spool,
# logs, pid files. No systemd. Client commands need SLURM_CONF: eval "$(slurm/local_cluster.sh env)".
set -euo pipefail

DIR=${GPT1DS_SLURM_DIR:-/tmp/gpt1-ds-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF
HOST=$(hostname -s)
NET=${GPT1DS_SLURM_NET:-10.231.0}  # the multi-node cluster's /24
HOSTS_TAG="# gpt1-ds local cluster"

log() { echo "local_cluster: $*" >&2; }

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && command -v ip >/dev/null && command -v nsenter >/dev/null \
        && ls /usr/lib/*/libpmix.so >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        log "SLURM is not installed and this is not root: apt-get install slurmctld slurmd slurm-client munge libpmix-dev iproute2 util-linux"
        exit 1
    fi
    log "installing SLURM and munge (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge libpmix-dev \
        iproute2 util-linux >/dev/null
}

write_conf() {
    local nodes=$1 node i port=6817
    node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*//")  # CPUs, sockets, cores, memory of this machine
    local ctld="$HOST(127.0.0.1)" spool="$DIR/spool/d" pid="$DIR/run/slurmd.pid" slog="$DIR/log/slurmd.log"
    if [ "$nodes" -gt 1 ]; then  # %n: each slurmd's node name
        ctld="$HOST($NET.1)" port=6827
        spool="$DIR/spool/d-%n" pid="$DIR/run/slurmd-%n.pid" slog="$DIR/log/slurmd-%n.log"
    fi
    cat >"$CONF" <<EOF
ClusterName=gpt1ds
SlurmctldHost=$ctld
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$slog
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
# Pending jobs tried every 1-2 s (defaults: 30 s and 60 s): a requeued job starts once its
# begin time (about 10 s after the requeue) has passed, not at the next pass after it.
SchedulerParameters=bf_interval=1,sched_interval=2
EOF
    if [ "$nodes" -gt 1 ]; then
        echo "TmpFS=$DIR/tmp/%n" >>"$CONF"
        for i in $(seq 1 "$nodes"); do
            echo "NodeName=gpt1n$i NodeAddr=$NET.$((10 + i)) $node State=UNKNOWN" >>"$CONF"
        done
        echo "PartitionName=cpu Nodes=gpt1n[1-$nodes] Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    else
        cat >>"$CONF" <<EOF
NodeName=$HOST NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10
EOF
    fi
}

# The nodes' network: a bridge holding the controller's address, one namespace per node joined to
# it by a veth pair, and the nodes' names in /etc/hosts.
net_up() {
    local nodes=$1 i addr
    if ! ip link show gpt1br >/dev/null 2>&1; then
        ip link add gpt1br type bridge
        ip addr add "$NET.1/24" dev gpt1br
        ip link set gpt1br up
    fi
    for i in $(seq 1 "$nodes"); do
        addr=$NET.$((10 + i))
        if ! ip netns list | grep -qw "gpt1n$i"; then
            ip netns add "gpt1n$i"
            ip link add "gpt1v$i" type veth peer name eth0 netns "gpt1n$i"
            ip link set "gpt1v$i" master gpt1br up
            ip netns exec "gpt1n$i" ip addr add "$addr/24" dev eth0
            ip netns exec "gpt1n$i" ip link set eth0 up
            ip netns exec "gpt1n$i" ip link set lo up
        fi
        grep -q "^$addr gpt1n$i " /etc/hosts || echo "$addr gpt1n$i $HOSTS_TAG" >>/etc/hosts
    done
}

net_down() {
    local ns
    for ns in $(ip netns list | grep -o '^gpt1n[0-9]*' || true); do
        ip netns del "$ns" 2>/dev/null || true
        ip link del "gpt1v${ns#gpt1n}" 2>/dev/null || true
    done
    ip link del gpt1br 2>/dev/null || true
    if grep -q "$HOSTS_TAG" /etc/hosts; then  # rewritten in place: /etc/hosts may be a mount point
        grep -v "$HOSTS_TAG" /etc/hosts >"$DIR/hosts.tmp" || true
        cat "$DIR/hosts.tmp" >/etc/hosts
        rm -f "$DIR/hosts.tmp"
    fi
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# any_alive PID...: one of them runs and is not a zombie (a container's init may not reap the
# daemons at once)
any_alive() {
    local pid state
    for pid; do
        state=$(ps -o stat= -p "$pid" 2>/dev/null) && [[ $state != Z* ]] && return 0
    done
    return 1
}

start_slurmds() {
    local nodes=$1 i
    if [ "$nodes" -eq 1 ]; then
        running "$DIR/run/slurmd.pid" || slurmd -f "$CONF"
        return
    fi
    for i in $(seq 1 "$nodes"); do
        mkdir -p "$DIR/spool/d-gpt1n$i" "$DIR/tmp/gpt1n$i"
        running "$DIR/run/slurmd-gpt1n$i.pid" && continue
        # nsenter, not `ip netns exec`, which remounts /sys and so hides the cgroup file system
        nsenter --net="/run/netns/gpt1n$i" unshare --uts \
            sh -c "hostname gpt1n$i && exec slurmd -N gpt1n$i -f '$CONF'"
    done
}

up() {
    local nodes=1 ready
    if [ "${1:-}" = "--nodes" ]; then
        nodes=${2:?--nodes needs a number}
    fi
    install_if_missing
    mkdir -p "$DIR"/{munge,spool/ctld,spool/d,log,run}
    chmod 0755 "$DIR" "$DIR/munge"  # munged refuses a socket folder others can write to
    [ -f "$DIR/munge.key" ] || mungekey -c -k "$DIR/munge.key" >/dev/null 2>&1
    chmod 0400 "$DIR/munge.key"
    write_conf "$nodes"
    echo "$nodes" >"$DIR/nodes"
    if ! running "$DIR/run/munged.pid"; then
        munged --key-file="$DIR/munge.key" --socket="$DIR/munge/munge.socket" \
            --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    fi
    if [ "$nodes" -gt 1 ]; then
        net_up "$nodes"
    fi
    # -c: a fresh controller state. Jobs of an earlier `up` are not recovered: one left "running"
    # by a daemon that was killed would hold the node's CPUs until SLURM times it out.
    running "$DIR/run/slurmctld.pid" || slurmctld -c -f "$CONF"
    start_slurmds "$nodes"
    for _ in $(seq 1 300); do
        ready=$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)' || true)
        if [ "$ready" -ge "$nodes" ]; then
            log "up: $nodes node(s) ready (SLURM_CONF=$CONF)"
            return
        fi
        sleep 0.2
    done
    log "the nodes did not become idle; logs in $DIR/log"
    exit 1
}

down() {
    local pidfile pids=()
    for pidfile in "$DIR"/run/slurmd*.pid "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
        [ -f "$pidfile" ] || continue
        running "$pidfile" && pids+=("$(cat "$pidfile")")
        rm -f "$pidfile"
    done
    # All stopped at once (each takes seconds to save its state), killed after 5 s.
    ((${#pids[@]})) && { kill "${pids[@]}" 2>/dev/null || true; }
    for _ in $(seq 1 50); do any_alive "${pids[@]}" || break; sleep 0.1; done
    ((${#pids[@]})) && { kill -9 "${pids[@]}" 2>/dev/null || true; }
    if [ "$(cat "$DIR/nodes" 2>/dev/null || echo 1)" -gt 1 ]; then
        net_down
    fi
    rm -f "$DIR/nodes"
    log "down"
}

status() {
    local first
    first=$(find "$DIR/run" -name 'slurmd*.pid' 2>/dev/null | head -1)
    if running "$DIR/run/slurmctld.pid" && [ -n "$first" ] && running "$first"; then
        sinfo -h -o "%P %T %D %c" || true
    else
        echo down
    fi
}

case "${1:-status}" in
up) shift; up "$@" ;;
down) down ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*) echo "usage: $0 up [--nodes N]|down|status|env" >&2; exit 2 ;;
esac
