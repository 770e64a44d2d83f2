#!/usr/bin/env bash
# GPT-1 pretraining on a SLURM cluster of GPUs: one task per GPU, srun, DeepSpeed.
#
#   sbatch slurm/pretrain.sh                                  # as it stands: 1 node × 8 GPUs
#   sbatch --nodes=4 slurm/pretrain.sh                        # any #SBATCH line overridden by a flag
#   CONFIG=configs/gpt1.yaml DATA=data/bookscorpus RUN_DIR=runs/gpt1 sbatch slurm/pretrain.sh
#   sbatch slurm/pretrain_cpu.sh                              # the CPU profile (tiny model)
#
# Settings (environment, with defaults): CONFIG=configs/gpt1.yaml, DS_CONFIG=ds_configs/zero1.json,
# DATA=data/bookscorpus, RUN_DIR=runs/gpt1, PYTHON=.venv/bin/python, MAX_REQUEUES=20,
# OVERRIDES="" (key=value run overrides, ds.key=value DeepSpeed overrides).
#
# Preemption and time limits (slurm/requeue.sh): SLURM sends USR1 to this script 300 s before
# the time limit (--signal=B:USR1@300), on preemption, or on `scancel --signal=USR1 -b JOB`. The
# script forwards it to the training tasks; they finish the steps up to their next log line,
# save a checkpoint and exit with 75; only then does the script requeue the job (at most
# MAX_REQUEUES times). The requeued job (SLURM_RESTART_COUNT ≥ 1) resumes from that
# checkpoint (resume=auto). A run that finishes, or fails with no USR1, is never requeued.
#
# The deepspeed launcher instead of srun (its slurm runner calls srun; no ssh needed; USR1 is
# not forwarded, so no preemption handling), from a batch script:
#   scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=$SLURM_NTASKS_PER_NODE/" > hostfile
#   deepspeed --hostfile hostfile --launcher slurm --no_ssh_check \
#       --master_addr "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)" \
#       gpt1_ds/train.py --deepspeed_config "$DS_CONFIG" ...
#
#SBATCH --job-name=gpt1-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
CONFIG=${CONFIG:-configs/gpt1.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
DATA=${DATA:-data/bookscorpus}
RUN_DIR=${RUN_DIR:-runs/gpt1}
PYTHON=${PYTHON:-.venv/bin/python}
MAX_REQUEUES=${MAX_REQUEUES:-20}
OVERRIDES=${OVERRIDES:-}
restarts=${SLURM_RESTART_COUNT:-0}

echo "$(date -Is) job ${SLURM_JOB_ID:-?} (restart $restarts) on ${SLURM_JOB_NODELIST:-?}:" \
    "${SLURM_NTASKS:-1} tasks, config $CONFIG, DeepSpeed $DS_CONFIG, data $DATA, run $RUN_DIR"

# shellcheck source=slurm/requeue.sh
source slurm/requeue.sh
# shellcheck disable=SC2086  # OVERRIDES is a list of words
requeueable_srun "$PYTHON" -m gpt1_ds.train --deepspeed_config "$DS_CONFIG" --config "$CONFIG" \
    --data "$DATA" --run-dir "$RUN_DIR" resume=auto $OVERRIDES
