# shellcheck shell=bash
# Sourced by the training templates (pretrain.sh, finetune.sh): run one srun step so that
# USR1 leads to checkpoint → requeue → resume.
#
#   RUN_DIR=... requeueable_srun CMD [ARG ...]
#
# USR1 (from --signal=B:USR1@N, preemption, or `scancel -b --signal=USR1 JOB`) reaches this
# shell only; it is forwarded to the srun step, whose tasks finish the step in flight, save a
# checkpoint, write RUN_DIR/PREEMPTED and exit with 75. Only then is the job requeued, at most
# MAX_REQUEUES times (default 20); the requeued job (SLURM_RESTART_COUNT >= 1) resumes from
# that checkpoint (resume=auto). A run that finishes or fails is never requeued. The marker
# file decides, not only the exit code: with --kill-on-bad-exit srun terminates the ranks still
# shutting down when the first one exits with 75, and then reports their 143.

PREEMPTED=75

requeueable_srun() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-20} rc signalled=0 srun_pid=""
    forward() {
        signalled=1
        echo "$(date -Is) USR1: asking the training tasks to checkpoint and stop"
        [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null
    }
    trap forward USR1
    rm -f "$RUN_DIR/PREEMPTED"
    srun --kill-on-bad-exit=1 "$@" &
    srun_pid=$!
    # A trap runs only while the shell waits on a background child: wait until srun is really gone.
    while true; do
        wait "$srun_pid"
        rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    if [ "$rc" -eq "$PREEMPTED" ] || { [ "$signalled" = 1 ] && [ -f "$RUN_DIR/PREEMPTED" ]; }; then
        rc=$PREEMPTED
        if [ "$restarts" -lt "$max" ]; then
            echo "$(date -Is) checkpoint saved; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
            scontrol requeue "$SLURM_JOB_ID"  # this sends TERM to this script too: nothing may follow
            exit 0
        fi
        echo "$(date -Is) checkpoint saved; requeue cap $max reached, not requeueing"
        exit "$rc"
    fi
    [ "$signalled" = 1 ] && echo "$(date -Is) USR1 came, but training exited with $rc: no requeue"
    echo "$(date -Is) training exited with $rc"
    exit "$rc"
}
