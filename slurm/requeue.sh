# shellcheck shell=bash
# Sourced by the training templates (pretrain.sh, finetune.sh, preflight.sh): run one srun step
# so that USR1 leads to checkpoint → requeue → resume.
#
#   RUN_DIR=... requeueable_srun CMD [ARG ...]
#
# When the job is requeued the script ends here (exit 0: nothing may run after the requeue);
# otherwise the function returns the training's exit status (75 when preempted past the cap).
#
# USR1 (from --signal=B:USR1@N, preemption, or `scancel -b --signal=USR1 JOB`) reaches this
# shell only; it is forwarded to the srun step, whose tasks finish the steps up to their next
# log line, save a checkpoint, write RUN_DIR/PREEMPTED and exit with 75. Only then is the job
# requeued, at most MAX_REQUEUES times (default 20); the requeued job (SLURM_RESTART_COUNT >= 1)
# resumes from that checkpoint (resume=auto). The marker counts, not only the exit code: with
# --kill-on-bad-exit srun terminates the ranks still shutting down when the first one exits with
# 75, and then reports their 143. A run that dies after USR1 without a checkpoint (e.g. still
# starting) is requeued too. A run whose ranks stalled or whose collective timed out (exit 76 and
# RUN_DIR/HUNG, gpt1_ds/watchdog.py) saved nothing and is requeued to resume from the last complete
# checkpoint. A run that finishes, that refused its input (exit 2), or fails otherwise with no
# USR1, is never requeued. The requeue message says what was saved. Attempts that save nothing
# new (the newest complete checkpoint unchanged) MAX_IDLE_REQUEUES times in a row (default 3: a
# time limit shorter than the start-up, a rank that stalls before the first checkpoint) end the
# requeues, naming how long each attempt ran before its signal and the --time/--signal it needs.

PREEMPTED=75
HUNG=76
REFUSED=2

requeueable_srun() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-20} rc last signalled=0 srun_pid=""
    local saved="" started signal_after="" idle_max=${MAX_IDLE_REQUEUES:-3}
    started=$(date +%s)
    forward() {
        signalled=1
        signal_after=$(($(date +%s) - started))
        echo "$(date -Is) USR1: asking the training tasks to checkpoint and stop"
        [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null
    }
    trap forward USR1
    rm -f "$RUN_DIR/PREEMPTED" "$RUN_DIR/HUNG"
    srun --kill-on-bad-exit=1 "$@" &
    srun_pid=$!
    [ "$signalled" = 1 ] && kill -USR1 "$srun_pid" 2>/dev/null  # it came before srun started
    # A trap runs only while the shell waits on a background child: wait until srun is really gone.
    while true; do
        wait "$srun_pid"
        rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    if [ "$rc" -gt 128 ]; then  # the last wait may have been cut short by the trap: srun's own status
        wait "$srun_pid" 2>/dev/null
        last=$?
        [ "$last" -ne 127 ] && rc=$last
    fi
    # Requeue when the run saved a preemption checkpoint (exit 75, or its marker when srun reports
    # another code), or when it died after USR1 came (e.g. during start-up, before its handler):
    # resume=auto then continues from the newest complete checkpoint.
    if [ "$rc" -eq "$REFUSED" ]; then
        echo "$(date -Is) the run refused its input (exit 2, the reason above): not requeueing"
        return "$rc"
    fi
    if [ "$rc" -eq "$HUNG" ] || [ -f "$RUN_DIR/HUNG" ]; then
        echo "$(date -Is) a rank stalled or a collective timed out: $(head -c 300 "$RUN_DIR/HUNG" 2>/dev/null)"
        rc=$PREEMPTED
        saved="nothing saved, the run resumes from the last complete checkpoint"
    fi
    if [ "$rc" -eq "$PREEMPTED" ] || [ -f "$RUN_DIR/PREEMPTED" ] || { [ "$signalled" = 1 ] && [ "$rc" -ne 0 ]; }; then
        rc=$PREEMPTED
        if [ -f "$RUN_DIR/PREEMPTED" ]; then
            saved="checkpoint of step $(head -c 20 "$RUN_DIR/PREEMPTED" | tr -d '\n') saved"
        elif [ -z "$saved" ]; then
            saved="nothing saved (USR1 came ${signal_after:-?} s after the start; the run ended before it"
            saved="$saved could save), the run resumes from the last complete checkpoint"
        fi
        echo "$(date -Is) $saved"
        if ! made_progress "$idle_max"; then
            echo "$(date -Is) $idle_max attempts in a row saved nothing new (this one ran $(($(date +%s) - started)) s;" \
                "USR1 came ${signal_after:-?} s after its start): not requeueing. Give the job a longer --time," \
                "or its signal earlier (--signal=B:USR1@N with N above the start-up plus one log interval)"
            return "$rc"
        fi
        if [ "$restarts" -lt "$max" ]; then
            echo "$(date -Is) requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max)"
            # scontrol sends TERM to this script too once it has requeued: nothing may follow
            scontrol requeue "$SLURM_JOB_ID" || { echo "$(date -Is) scontrol requeue failed"; exit "$rc"; }
            exit 0
        fi
        echo "$(date -Is) requeue cap $max reached, not requeueing"
        return "$rc"
    fi
    echo "$(date -Is) training exited with $rc"
    return "$rc"
}

# Whether this job's attempts still make progress: false once `$1` attempts in a row ended with
# the same newest complete checkpoint (RUN_DIR/.requeue_progress: job, that checkpoint, the count).
made_progress() {
    local limit=$1 file="$RUN_DIR/.requeue_progress" latest job prev_job prev count
    latest=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none)
    job=${SLURM_JOB_ID:-none}
    read -r prev_job prev count < "$file" 2>/dev/null || { prev_job=""; prev=""; count=0; }
    if [ "$prev_job" = "$job" ] && [ "$prev" = "$latest" ]; then
        count=$((count + 1))
    elif [ "$prev_job" != "$job" ] && [ "$latest" = none ]; then
        count=1  # the job's first attempt saved nothing
    else
        count=0
    fi
    echo "$job $latest $count" > "$file"
    [ "$count" -lt "$limit" ]
}
