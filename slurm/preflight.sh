#!/usr/bin/env bash
# The preflight: run it once on a new cluster (or after a change of nodes, drivers or
# environment), before the first real job. In a few minutes it checks what CI cannot and
# prints one verdict table (gpt1_ds/preflight.py; also RUN_DIR/preflight/verdict.md):
#   versions        torch, DeepSpeed, CUDA, NCCL: the same on every rank, and the tested ones
#   GPUs, binding   the GPU each rank uses (one each), rank → host → device
#   dataset         DATA read from every node: tokenizer, manifests, a shard member per rank
#   run directory   RUN_DIR one file system for all nodes, free space for the checkpoints
#   all-reduce      the gradients' all-reduce over the world, within each node (NVLink: PASS
#                   from 100 GB/s bus bandwidth) and between nodes (PASS from 20 GB/s)
#   DeepSpeed ops   FusedAdam built (once per node) and loaded on every rank
#   training        STEPS steps of CONFIG: loss, tokens/s, ms per step, MFU
#   preemption      USR1 halfway (the ranks wait for it) → checkpoint → requeue → resume → the end
# It exits 0 when no row fails (WARN rows are worth reading), 1 otherwise.
#
#   sbatch slurm/preflight.sh                              # 2 nodes × 8 GPUs, configs/gpt1.yaml
#   sbatch --nodes=1 slurm/preflight.sh                    # any #SBATCH line overridden by a flag
#   DATA=/shared/bookscorpus RUN_DIR=/shared/runs/preflight sbatch slurm/preflight.sh
#   sbatch slurm/preflight_cpu.sh                          # the CPU profile (tiny model)
#
# Settings (environment, with defaults): CONFIG=configs/gpt1.yaml, DS_CONFIG=ds_configs/zero1.json,
# DATA=data/bookscorpus, RUN_DIR=runs/preflight-JOBID (put it where the real runs will go; it
# must not hold checkpoints), PYTHON=.venv/bin/python, STEPS=50, LOG_INTERVAL=5, OVERRIDES=""
# (key=value run and ds.key=value DeepSpeed overrides, as for pretrain.sh). The training part
# uses a 10-step warm-up (so that the loss visibly falls), saves only on USR1 and at the end,
# and validates on 4 batches; its speed is that of the recipe's settings.
#
#SBATCH --job-name=gpt1-preflight
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
CONFIG=${CONFIG:-configs/gpt1.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
DATA=${DATA:-data/bookscorpus}
RUN_DIR=${RUN_DIR:-runs/preflight-${SLURM_JOB_ID:-0}}
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-50}
LOG_INTERVAL=${LOG_INTERVAL:-5}
OVERRIDES=${OVERRIDES:-}
MAX_REQUEUES=${MAX_REQUEUES:-2}
restarts=${SLURM_RESTART_COUNT:-0}
HOLD=$((STEPS / 2 / LOG_INTERVAL * LOG_INTERVAL))  # a logged step halfway
if [ "$HOLD" -lt "$LOG_INTERVAL" ] || [ $((HOLD + LOG_INTERVAL)) -ge "$STEPS" ]; then
    echo "STEPS=$STEPS is too few for the round trip: at least 3 × LOG_INTERVAL ($LOG_INTERVAL)"
    exit 2
fi

echo "$(date -Is) preflight job ${SLURM_JOB_ID:-?} (restart $restarts) on ${SLURM_JOB_NODELIST:-?}:" \
    "${SLURM_NTASKS:-1} tasks, config $CONFIG, DeepSpeed $DS_CONFIG, data $DATA, run $RUN_DIR"
# shellcheck disable=SC2206  # OVERRIDES is a list of words
run=(--deepspeed_config "$DS_CONFIG" --config "$CONFIG" --data "$DATA" --run-dir "$RUN_DIR" $OVERRIDES)
training=(max_steps="$STEPS" log_interval="$LOG_INTERVAL" checkpoint_interval=1000000000
    eval_interval=1000000000 eval_batches=4 keep_checkpoints=2 sample_interval=0
    ds.scheduler.params.warmup_num_steps=10)
report() {
    "$PYTHON" -m gpt1_ds.preflight report --run-dir "$RUN_DIR" --steps "$STEPS" \
        --log-interval "$LOG_INTERVAL" --restarts "$restarts"
}

watcher=""
if [ "$restarts" = 0 ]; then
    if [ -d "$RUN_DIR/checkpoints" ]; then
        echo "$(date -Is) $RUN_DIR already holds checkpoints: give the preflight a new RUN_DIR"
        exit 1
    fi
    mkdir -p "$RUN_DIR/preflight"
    srun --kill-on-bad-exit=1 "$PYTHON" -m gpt1_ds.preflight check "${run[@]}"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "$(date -Is) the checks ended with $rc: a check failed (the table or the error above); no training"
        report
        exit 1
    fi
    # The round trip: once step HOLD is logged (the ranks wait there for it, GPT1_DS_HOLD_AT),
    # USR1 to this script, as SLURM sends it before a time limit or on a preemption; the ranks
    # save at the next log line, the script requeues the job, and the job resumes from there.
    ("$PYTHON" -m gpt1_ds.preflight wait --run-dir "$RUN_DIR" --step "$HOLD" \
        && scancel -b --signal=USR1 "$SLURM_JOB_ID") &
    watcher=$!
    export GPT1_DS_HOLD_AT=$HOLD
fi

# shellcheck source=slurm/requeue.sh
source slurm/requeue.sh
requeueable_srun "$PYTHON" -m gpt1_ds.train "${run[@]}" "${training[@]}" resume=auto
rc=$?
if [ -n "$watcher" ]; then
    pkill -P "$watcher" 2>/dev/null
    kill "$watcher" 2>/dev/null
fi
report
verdict=$?
[ "$rc" -ne 0 ] && exit "$rc"
exit "$verdict"
