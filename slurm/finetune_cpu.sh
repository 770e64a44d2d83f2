#!/usr/bin/env bash
# The CPU profile of slurm/finetune.sh: 2 tasks, no GPUs (e.g. on slurm/local_cluster.sh),
# the demo's fine-tuning profile (configs/tiny-cpu-finetune.yaml) from the demo's pretraining
# run (`make demo`). Same settings and behaviour; other defaults.
#
#   sbatch slurm/finetune_cpu.sh
#   TASK=rte TRAIN=data/glue/rte/train.tsv DEV=data/glue/rte/dev.tsv sbatch slurm/finetune_cpu.sh
#
#SBATCH --job-name=gpt1-finetune-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
export CONFIG=${CONFIG:-configs/tiny-cpu-finetune.yaml}
export INIT=${INIT:-runs/demo/run/checkpoints}
export RUN_DIR=${RUN_DIR:-runs/slurm-cpu-finetune}
# shellcheck source=slurm/finetune.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/finetune.sh"
