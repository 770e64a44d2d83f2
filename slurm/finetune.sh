#!/usr/bin/env bash
# GPT-1 fine-tuning on a SLURM cluster: one task per GPU with srun, DeepSpeed, preemption-safe.
#
#   INIT=runs/gpt1/checkpoints sbatch slurm/finetune.sh              # SST-2 from a pretraining run
#   TASK=rte TRAIN=data/glue/rte/train.tsv DEV=data/glue/rte/dev.tsv INIT=hf/gpt1 sbatch slurm/finetune.sh
#   INIT=hf/openai-gpt sbatch slurm/finetune.sh                       # GPT-1's released weights
#   sbatch --gpus-per-node=8 --ntasks-per-node=8 slurm/finetune.sh    # any #SBATCH line, by a flag
#   sbatch slurm/finetune_cpu.sh                                      # the CPU profile (tiny model)
#
# Settings (environment, with defaults): TASK=sst2, TRAIN=data/glue/sst2/stsa.binary.train,
# DEV=data/glue/sst2/stsa.binary.dev, INIT=runs/gpt1/checkpoints (a run's checkpoints, an HF
# directory, GPT-1's released openai-gpt directory, or none), RUN_DIR=runs/finetune-$TASK, DS_CONFIG=ds_configs/finetune.json,
# CONFIG="" (a FinetuneConfig YAML), PYTHON=.venv/bin/python, MAX_REQUEUES=20, OVERRIDES=""
# (key=value fine-tuning overrides, ds.key=value DeepSpeed overrides).
#
# Preemption and time limits work as in pretrain.sh (slurm/requeue.sh): USR1 → the tasks save
# a checkpoint mid-epoch and exit with 75 → the job is requeued → it resumes at that step.
#
#SBATCH --job-name=gpt1-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
TASK=${TASK:-sst2}
TRAIN=${TRAIN:-data/glue/sst2/stsa.binary.train}
DEV=${DEV:-data/glue/sst2/stsa.binary.dev}
INIT=${INIT:-runs/gpt1/checkpoints}
RUN_DIR=${RUN_DIR:-runs/finetune-$TASK}
DS_CONFIG=${DS_CONFIG:-ds_configs/finetune.json}
CONFIG=${CONFIG:-}
PYTHON=${PYTHON:-.venv/bin/python}
MAX_REQUEUES=${MAX_REQUEUES:-20}
OVERRIDES=${OVERRIDES:-}

echo "$(date -Is) job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
    "${SLURM_NTASKS:-1} tasks, task $TASK, init $INIT, DeepSpeed $DS_CONFIG, run $RUN_DIR"

# shellcheck source=slurm/requeue.sh
source slurm/requeue.sh
# shellcheck disable=SC2086  # OVERRIDES is a list of words
requeueable_srun "$PYTHON" -m gpt1_ds.finetune --deepspeed_config "$DS_CONFIG" ${CONFIG:+--config "$CONFIG"} \
    --task "$TASK" --train "$TRAIN" --dev "$DEV" --init "$INIT" --run-dir "$RUN_DIR" resume=auto $OVERRIDES
