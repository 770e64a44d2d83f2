#!/usr/bin/env bash
# GPT-1's evaluation (gpt1_ds.suite) as a SLURM job array: one task of the paper per array index,
# each fine-tuned with srun and requeued on preemption like slurm/finetune.sh; then a job that
# gathers the table (OUT/suite.md, OUT/suite.json).
#
#   n=$(.venv/bin/python -m gpt1_ds.suite --tasks-dir DATA --out OUT --which)    # tasks found
#   jid=$(INIT=runs/gpt1/checkpoints TASKS_DIR=DATA OUT=OUT sbatch --parsable --array=0-$((n - 1)) slurm/suite.sh)
#   TASKS_DIR=DATA OUT=OUT GATHER=1 sbatch --dependency=afterany:$jid slurm/suite.sh
#   sbatch slurm/suite_cpu.sh ...                                                  # the CPU profile
#
# Settings (environment, with defaults): INIT=runs/gpt1/checkpoints, TASKS_DIR (required: the folder
# the releases unpacked into), OUT=runs/suite, TASKS="" (default: every task found), DS_CONFIG=
# ds_configs/finetune.json, CONFIG="" (a FinetuneConfig YAML), PYTHON=.venv/bin/python,
# MAX_REQUEUES=20, OVERRIDES="" (key=value for every task, ds.key=value too), GATHER=0.
# An index past the tasks found does nothing; a task done before is not run again.
#
#SBATCH --job-name=gpt1-suite
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out
#SBATCH --error=slurm/logs/%x-%A_%a.out
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
INIT=${INIT:-runs/gpt1/checkpoints}
TASKS_DIR=${TASKS_DIR:?TASKS_DIR: the folder the task releases were unpacked into}
OUT=${OUT:-runs/suite}
TASKS=${TASKS:-}
DS_CONFIG=${DS_CONFIG:-ds_configs/finetune.json}
CONFIG=${CONFIG:-}
PYTHON=${PYTHON:-.venv/bin/python}
MAX_REQUEUES=${MAX_REQUEUES:-20}
OVERRIDES=${OVERRIDES:-}
GATHER=${GATHER:-0}
INDEX=${SLURM_ARRAY_TASK_ID:-0}
SUITE=("$PYTHON" -m gpt1_ds.suite --tasks-dir "$TASKS_DIR" --out "$OUT" ${TASKS:+--tasks $TASKS})

if [ "$GATHER" = 1 ]; then
    exec "${SUITE[@]}" --gather
fi
TASK=$("${SUITE[@]}" --index "$INDEX" --which) || exit 2
if [ -z "$TASK" ]; then
    echo "$(date -Is) array index $INDEX: no task of the paper there (fewer found); nothing to do"
    exit 0
fi
RUN_DIR=$OUT/$TASK  # what slurm/requeue.sh watches: the task's run directory
echo "$(date -Is) job ${SLURM_JOB_ID:-?} (array index $INDEX, restart ${SLURM_RESTART_COUNT:-0}) on" \
    "${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-1} tasks, task $TASK, init $INIT, run $RUN_DIR"

# shellcheck source=slurm/requeue.sh
source slurm/requeue.sh
# shellcheck disable=SC2086  # OVERRIDES is a list of words
requeueable_srun "${SUITE[@]}" --init "$INIT" --index "$INDEX" --deepspeed_config "$DS_CONFIG" \
    ${CONFIG:+--config "$CONFIG"} resume=auto $OVERRIDES
