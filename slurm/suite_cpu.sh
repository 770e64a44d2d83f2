#!/usr/bin/env bash
# The CPU profile of slurm/suite.sh: 2 tasks, no GPUs (e.g. on slurm/local_cluster.sh), the demo's
# fine-tuning profile (configs/tiny-cpu-finetune.yaml) from the demo's pretraining run (`make demo`).
# Same settings and behaviour; other defaults.
#
#   TASKS_DIR=data/glue sbatch --array=0-1 slurm/suite_cpu.sh    # the embedded SST-2 and RTE
#   TASKS_DIR=data/glue GATHER=1 sbatch --dependency=afterany:JOB slurm/suite_cpu.sh
#
#SBATCH --job-name=gpt1-suite-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out
#SBATCH --error=slurm/logs/%x-%A_%a.out
export CONFIG=${CONFIG:-configs/tiny-cpu-finetune.yaml}
export INIT=${INIT:-runs/demo/run/checkpoints}
export OUT=${OUT:-runs/slurm-cpu-suite}
# shellcheck source=slurm/suite.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/suite.sh"
