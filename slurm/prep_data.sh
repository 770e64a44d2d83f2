#!/usr/bin/env bash
# Data preparation across the ranks of an allocation: clean and shard in parallel (MPI),
# the tokenizer on rank 0. Output is byte-identical whatever the number of ranks.
#
#   INPUT=/data/books OUT=data/bookscorpus sbatch slurm/prep_data.sh
#   sbatch --nodes=4 --ntasks-per-node=32 slurm/prep_data.sh
#
# Settings (environment, with defaults): INPUT=data/books (files, directories, globs; several
# separated by spaces), OUT=data/bookscorpus, PYTHON=.venv/bin/python, MPI=pmix (the srun MPI
# plugin), PREP_ARGS="" (more data_prep.prepare flags, e.g. "--lowercase --vocab-size 40478").
#
# srun --mpi=pmix needs SLURM built with PMIx (Debian: libpmix-dev on the nodes). A plugin that
# does not match the MPI library (e.g. --mpi=pmi2 or none with Open MPI 5) gives every task a
# world of one: data_prep notices and stops instead of running the same work N times. Inside
# the allocation, mpirun works too:  mpirun -np "$SLURM_NTASKS" python -m data_prep.prepare ...
#
#SBATCH --job-name=gpt1-prep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=16
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
INPUT=${INPUT:-data/books}
OUT=${OUT:-data/bookscorpus}
PYTHON=${PYTHON:-.venv/bin/python}
MPI=${MPI:-pmix}
PREP_ARGS=${PREP_ARGS:-}

echo "$(date -Is) job ${SLURM_JOB_ID:-?}: ${SLURM_NTASKS:-1} ranks, $INPUT → $OUT"
# shellcheck disable=SC2086  # INPUT and PREP_ARGS are lists of words
srun --mpi="$MPI" "$PYTHON" -m data_prep.prepare --input $INPUT --out "$OUT" --quiet $PREP_ARGS
"$PYTHON" -m data_prep.verify "$OUT"
echo "$(date -Is) done: $OUT"
