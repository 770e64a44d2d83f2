#!/usr/bin/env bash
# The CPU profile of slurm/preflight.sh: the demo profile (configs/tiny-cpu.yaml) on a CPU-only
# cluster (such as slurm/local_cluster.sh), 2 tasks, no GPUs. The same checks and verdict table;
# bandwidths are shown, not judged (gloo). `make test` runs it on the local cluster.
#
#   make demo && sbatch slurm/preflight_cpu.sh
#   DATA=runs/demo/data RUN_DIR=runs/preflight-cpu sbatch slurm/preflight_cpu.sh
#
#SBATCH --job-name=gpt1-preflight-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
export CONFIG=${CONFIG:-configs/tiny-cpu.yaml}
export DATA=${DATA:-runs/demo/data}
export RUN_DIR=${RUN_DIR:-runs/preflight-cpu-${SLURM_JOB_ID:-0}}
# shellcheck source=slurm/preflight.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/preflight.sh"
