#!/usr/bin/env bash
# One command for a GPU machine with no package registry: install the carried wheelhouse, say
# what the machine is, build DeepSpeed's CUDA FusedAdam, run the CUDA tests, the gpt1 training
# and per-step latency benchmarks (recorded under the machine's key in a copy of benchmarks/results.json), then about
# two minutes of gpt1_ds.train at GPT-1's per-GPU micro-batch.
#
#   make gpu-wheels                        # here, once: the wheels into .whl/ (Python 3.12, x86-64)
#   bash benchmarks/gpu_check.sh           # there, with .whl/ carried along; results in $OUT
#   bash benchmarks/gpu_check.sh --dry-run # here: every step on the CPU with tiny sizes
#
# Each step writes its log into $OUT as soon as it ends, and runs under its own time limit and
# within GPU_CHECK_SECONDS (default 560) for the whole script, so that a run cut short still
# returns what it measured; $OUT/summary.txt has one line per step (exit code, seconds). At
# most 8 files: summary.txt, env.txt, fused_adam.txt, cuda_tests.txt, bench_train.txt,
# RESULTS.md, results.json, train.txt. Copy the last two over benchmarks/ to keep them.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ $DRY = 1 ] && [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
: >"$OUT/summary.txt"
DEADLINE=$(($(date +%s) + ${GPU_CHECK_SECONDS:-560}))

# step NAME LIMIT_SECONDS COMMAND...: run it, its output into $OUT/NAME.txt, a line in summary.txt.
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    ((limit > DEADLINE - start)) && limit=$((DEADLINE - start))
    ((limit < 10)) && { echo "$name: not run, no time left" | tee -a "$OUT/summary.txt"; return 124; }
    echo "== $name: $*"
    timeout --kill-after=30 "$limit" "$@" >"$OUT/$name.txt" 2>&1  # SIGTERM: train.py saves, exits 75
    rc=$?
    echo "$name: exit $rc in $(($(date +%s) - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 5 "$OUT/$name.txt"
    return $rc
}

if [ $DRY = 0 ]; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run 'make gpu-wheels' here and carry .whl" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "== dry run: no install (the wheels are for Python 3.12 on x86-64); $PY"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step env 60 sh -c "nvidia-smi 2>&1 || echo 'nvidia-smi: none'; $PY - <<'EOF'
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ('deepspeed', 'webdataset', 'transformers', 'sentencepiece', 'pydantic', 'isal'):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, 'MISSING', type(e).__name__, e)
EOF"

# DeepSpeed's FusedAdam: compiled here with nvcc on first use (for the Hopper arch only), timed.
step fused_adam 240 $PY - <<'EOF'
import time, torch
from deepspeed.ops.op_builder import FusedAdamBuilder
builder = FusedAdamBuilder()
if not torch.cuda.is_available():
    print("no CUDA device: FusedAdam not built")
else:
    start = time.time()
    builder.load()
    print(f"FusedAdam built and loaded in {time.time() - start:.1f} s")
EOF

step cuda_tests 240 $PY -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py

# The training and per-step benchmarks, through run_all so that its figures land under this machine's key.
cp benchmarks/RESULTS.md benchmarks/results.json "$OUT/"
if [ $DRY = 1 ]; then
    BENCH=(--quick)
else
    BENCH=(--args "train=--presets gpt1 --variants plain hf ds-z2 ds-z2+chunk ds-z2+pad ds-z2+compile --batch 16 --steps 20 --warmup 3")
    # What the host adds to a step (gpt1_ds.train against a plain loop, syncs counted with
    # torch.cuda.set_sync_debug_mode), GPT-1's default JSON against zero2.json and DeepCompile;
    # then the compute/update split at a rank's share of GPT-1's batch on 8 GPUs (8 × 512).
    HOST_ROWS="plain@1 train:zero1@1 train:zero2@1 train:zero1+compile+ds.compile.deepcompile=true@1"
    BENCH+=(--args "step=--rows $HOST_ROWS --repeats 3 --batch 8 --seq-len 512 --steps 20 --warmup 3")
fi
step bench_train 330 $PY benchmarks/run_all.py --only train,step "${BENCH[@]}" --out-dir "$OUT"

# GPT-1's step on one GPU: the gpt1 model at micro-batch 8 and no accumulation (one rank's share
# of the batch of 64 on 8 GPUs), bf16, GPT-1's default JSON (zero1.json), on the embedded books
# (tokenizer of 8,192 pieces in a model of GPT-1's 40,478 rows), for about two minutes;
# its log lines give the step time.
DATA=$(mktemp -d -t gpu_check_data.XXXX)
trap 'rm -rf "$DATA"' EXIT
if [ $DRY = 1 ]; then
    PREP=(--vocab-size 2000 --seq-len 64 --shard-bytes 200000)
    TRAIN=(model=tiny model_overrides.n_positions=64 max_steps=20 log_interval=5 micro_batch_size=4)
    TRAIN+=(ds.train_batch_size=4 ds.bf16.enabled=false)
else
    PREP=(--vocab-size 8192 --seq-len 512 --shard-bytes 2000000)
    TRAIN=(max_steps=100000 log_interval=100 micro_batch_size=8 ds.train_batch_size=8)
fi
step train 170 sh -c "$PY -m data_prep.prepare --input data/sample --out $DATA --quiet ${PREP[*]} \
    --val-fraction 0.1 --test-fraction 0 && exec $PY -m gpt1_ds.train --deepspeed_config ds_configs/zero1.json \
    --config configs/gpt1.yaml --data $DATA --run-dir $DATA/run ${TRAIN[*]} eval_interval=1000000 \
    eval_batches=2 checkpoint_interval=1000000 sample_interval=0 allow_untested_versions=true"

echo "== done; in $OUT:"
ls "$OUT"
cat "$OUT/summary.txt"
