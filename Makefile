# gpt1-ds: one command each for setup, the demo, the tests and the benchmarks.
#
#   make demo     set up, then run the main job on the CPU
#   make test     set up, then lint and run the test suite
#   make test-fast  set up, lint, then run the tests not marked slow (slow ones start
#                 processes or take more than a few seconds): a check in under two minutes
#   make bench    set up, then run every benchmark in benchmarks/ and write this
#                 machine's section of benchmarks/RESULTS.md (and results.json)
#   make gpu-wheels  the wheels benchmarks/gpu_check.sh installs on a GPU machine with no registry
#
# Setup makes a virtual environment in $(VENV): torch first ($(TORCH_SPEC)), then
# DeepSpeed built against it, then this package with its extras, all under the tested
# versions of constraints.txt. A second run does no work. On a cluster, keep your own
# CUDA build of torch (the tested release) with e.g.
#   make setup TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130'
# or reuse the torch already installed in the system Python:
#   make setup TORCH_SPEC= VENV_ARGS=--system-site-packages
# EXTRAS: `mpi` brings Open MPI from PyPI for mpirun; drop it to use the cluster's MPI. `eval`
# brings lm-evaluation-harness (gpt1_ds.evaluate --tasks); `gpt1` brings spaCy for GPT-1's own
# tokenizer (gpt1_ds/openai_bpe.py: fine-tuning its released openai-gpt directory).

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
CONSTRAINTS := constraints.txt
TORCH_SPEC ?= $(shell grep -m1 '^torch==' $(CONSTRAINTS))
EXTRAS ?= dev,mpi,eval,gpt1
# DeepSpeed's ops compiled into it at install where torch is a CUDA build and nvcc exists; on a
# CPU build of torch, the ops a CPU run loads are built into torch's extension cache
# (TORCH_EXTENSIONS_DIR) by `python -m gpt1_ds.ops`: nothing compiles at run time
# (gpt1_ds/ops.py). DS_PREBUILD=0: no CUDA prebuild.
DS_PREBUILD ?= auto
PREBUILD_ENV = $(PY) -c 'import shutil, torch; print("DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1" \
	if "$(DS_PREBUILD)" != "0" and torch.version.cuda and shutil.which("nvcc") else "")'
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.gpt1-ds-setup

.PHONY: setup demo test test-fast lint bench clean gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install --quiet $(TORCH_SPEC); fi
	$(PY) -c "import torch; print('torch', torch.__version__)"
	$(PY) -c "import deepspeed" 2>/dev/null || env $$($(PREBUILD_ENV)) $(PIP) install --quiet --no-build-isolation \
		-c $(CONSTRAINTS) deepspeed
	$(PIP) install --quiet --no-build-isolation -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	$(PY) -m gpt1_ds.ops || echo "warning: an op the CPU path loads did not build (above); runs will try again"
	touch $(STAMP)

DEMO_DIR ?= runs/demo
CORPUS ?= ../shared/corpus

# The demo's profiles: the tiny model's run (and how its data is prepared: `prep`), then
# its SST-2 fine-tuning. Extra key=value / ds.key=value overrides: DEMO_OVERRIDES,
# DEMO_FINETUNE_OVERRIDES.
DEMO_PROFILE ?= configs/tiny-cpu.yaml
DEMO_FINETUNE_PROFILE ?= configs/tiny-cpu-finetune.yaml
DEMO_OVERRIDES ?=
DEMO_FINETUNE_OVERRIDES ?=
PROFILE_PREP = $(PY) -c 'import sys, yaml; print(" ".join(yaml.safe_load(open(sys.argv[1]))["prep"]))'

# The demo's ranks are CPU processes (the tiny profile): DeepSpeed is told so instead of guessing.
demo: export DS_ACCELERATOR ?= cpu
demo: setup
	$(PY) -m data_prep.prepare --input data/sample --out $(DEMO_DIR)/data $$($(PROFILE_PREP) $(DEMO_PROFILE))
	rm -rf $(DEMO_DIR)/run
	$(VENV)/bin/deepspeed --num_gpus 2 gpt1_ds/train.py --deepspeed_config ds_configs/zero2.json \
		--config $(DEMO_PROFILE) --data $(DEMO_DIR)/data --run-dir $(DEMO_DIR)/run $(DEMO_OVERRIDES)
	rm -rf $(DEMO_DIR)/sst2
	$(VENV)/bin/deepspeed --num_gpus 2 gpt1_ds/finetune.py --deepspeed_config ds_configs/finetune.json \
		--config $(DEMO_FINETUNE_PROFILE) --init $(DEMO_DIR)/run/checkpoints --run-dir $(DEMO_DIR)/sst2 \
		$(DEMO_FINETUNE_OVERRIDES)
	$(PY) -m gpt1_ds.export $(DEMO_DIR)/run/checkpoints --out $(DEMO_DIR)/hf
	$(PY) -m gpt1_ds.generate $(DEMO_DIR)/hf --prompt "It was" --prompt "The ship" --max-new-tokens 40 --seed 0
	$(PY) -m gpt1_ds.evaluate $(DEMO_DIR)/hf --held-out $(DEMO_DIR)/data --random-init --unigram $(DEMO_DIR)/data \
		--zero-shot sst2
	$(PY) -m gpt1_ds.plot $(DEMO_DIR)/run --out $(DEMO_DIR)/curves.png

# Wheels for a GPU machine without a package registry (Python 3.12, x86-64, torch and CUDA
# already there): DeepSpeed built here as a pure-Python wheel (its CUDA ops compile there on
# first use) and what else that image lacks, at the versions installed here. Carried as .whl/
# to benchmarks/gpu_check.sh.
GPU_WHEELS ?= .whl
GPU_PACKAGES := hjson pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand \
	ftfy wcwidth isal typing-extensions
GPU_PLATFORMS := $(foreach n,28 27 17,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64

gpu-wheels: setup
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(PIP) wheel --quiet --no-deps --no-build-isolation -w $(GPU_WHEELS) \
		deepspeed==$$($(PY) -c 'from importlib.metadata import version; print(version("deepspeed"))')
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) $$($(PY) -c 'import sys; from importlib.metadata import version; \
		print(" ".join(f"{p}=={version(p)}" for p in sys.argv[1:]))' $(GPU_PACKAGES))
	ls -l $(GPU_WHEELS); du -sh $(GPU_WHEELS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The tests run in TEST_WORKERS processes (pytest-xdist), a test file to each in turn: most tests
# wait on processes they start, which leaves a core idle in a run of one (TEST_WORKERS=0: one).
TEST_WORKERS ?= 2

test: setup lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

test-fast: setup lint
	$(PY) -m pytest -m "not slow"

# BENCH_ARGS: e.g. --only model,train or --quick (benchmarks/run_all.py --help).
BENCH_ARGS ?=

bench: setup
	if [ -d $(CORPUS)/books ]; then \
		$(PY) benchmarks/run_all.py --corpus $(CORPUS)/books --list $(CORPUS)/books_small.txt $(BENCH_ARGS); \
	else $(PY) benchmarks/run_all.py --corpus data/sample $(BENCH_ARGS); fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
