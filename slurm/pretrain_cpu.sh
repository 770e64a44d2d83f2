#!/usr/bin/env bash
# The CPU profile of slurm/pretrain.sh: the demo profile (configs/tiny-cpu.yaml: the tiny
# preset, its warm-up and learning rate) on a CPU-only cluster (such as
# slurm/local_cluster.sh), 2 tasks, no GPUs. Same settings and behaviour; other defaults.
#
#   sbatch slurm/pretrain_cpu.sh
#   DATA=runs/demo/data RUN_DIR=runs/slurm-cpu sbatch slurm/pretrain_cpu.sh
#
#SBATCH --job-name=gpt1-pretrain-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
export CONFIG=${CONFIG:-configs/tiny-cpu.yaml}
export DATA=${DATA:-runs/demo/data}
export RUN_DIR=${RUN_DIR:-runs/slurm-cpu}
# shellcheck source=slurm/pretrain.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/pretrain.sh"
