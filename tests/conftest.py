"""Shared fixtures."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from filelock import FileLock
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt1_ds.env import free_port
from gpt1_ds.manifest import CHECKSUM, FORMAT_VERSION, MANIFEST_NAME, checksum, encode_block, shard_name

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "data" / "sample"
# Three of the embedded books: prose with curly quotes, a short poem, a long novel.
SAMPLE_BOOKS = [
    SAMPLE_DIR / "pg00105_Jane-Austen_Persuasion.txt.gz",
    SAMPLE_DIR / "pg00013_Lewis-Carroll_The-Hunting-of-the-Snark.txt.gz",
    SAMPLE_DIR / "pg00083_Jules-Verne_From-the-Earth-to-the-Moon.txt.gz",
]
# Small settings so that the whole chain takes about a second.
PREP_ARGS = [
    "--vocab-size",
    "2000",
    "--seq-len",
    "64",
    "--shard-bytes",
    "60000",
    "--sequences-per-sample",
    "16",
    "--val-fraction",
    "0.3",
    "--test-fraction",
    "0.3",
    "--quiet",
]


def run_prepare(
    out: Path,
    books: list[Path] | None = None,
    extra: list[str] | None = None,
    mpi_ranks: int = 0,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """`python -m data_prep.prepare` as a user runs it (optionally under mpirun); ``check``:
    assert that it succeeds."""
    cmd = [
        sys.executable,
        "-m",
        "data_prep.prepare",
        "--input",
        *map(str, books or SAMPLE_BOOKS),
        "--out",
        str(out),
        *PREP_ARGS,
        *(extra or []),
    ]
    if mpi_ranks:
        mpirun = Path(sys.executable).parent / "mpirun"
        cmd = [str(mpirun), "--allow-run-as-root", "--oversubscribe", "-np", str(mpi_ranks), *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0 or not check, result.stderr[-4000:]
    return result


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """The directory ``name``, made by ``make(directory)`` once per test run: under pytest-xdist
    (``make test``) by the first worker that asks, while the others wait on a file lock."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    out, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # what a failed attempt left
            make(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A dataset prepared once from three real books (read-only for the tests)."""
    return made_once(tmp_path_factory, "prepared", run_prepare)


@pytest.fixture(scope="session")
def openai_dir(tmp_path_factory) -> Path:
    """An ``openai-gpt`` tokenizer folder (``vocab.json``, ``merges.txt``): 1,000 BPE merges learned
    once from a real book with GPT-1's own words (ftfy, standardisation, spaCy, lower case), the
    layout of Hugging Face's ``openai-gpt`` files (read-only for the tests)."""
    from gpt1_ds.openai_bpe import learn_bpe, read_text, write_openai_files

    def make(out: Path) -> None:
        out.mkdir()
        vocab, merges = learn_bpe([read_text(SAMPLE_BOOKS[0])], num_merges=1000)
        write_openai_files(out, vocab, merges)

    return made_once(tmp_path_factory, "openai_bpe", make)


OPENAI_GPT_SHAPE = dict(n_positions=64, n_embd=64, n_layer=2, n_head=4)
"""The shape of ``openai_gpt_dir``'s model."""


@pytest.fixture(scope="session")
def openai_gpt_dir(openai_dir, tmp_path_factory) -> Path:
    """An ``openai-gpt``-format directory, as ``from_pretrained("openai-gpt")`` caches it: the
    tokenizer files of ``openai_dir`` and random weights saved by transformers'
    ``OpenAIGPTLMHeadModel.save_pretrained`` (config.json, model.safetensors)."""
    import torch
    import transformers

    from gpt1_ds.openai_bpe import MERGES_NAME, VOCAB_NAME

    def make(out: Path) -> None:
        out.mkdir()
        for name in (VOCAB_NAME, MERGES_NAME):
            shutil.copyfile(openai_dir / name, out / name)
        vocab = len(json.loads((out / VOCAB_NAME).read_text(encoding="utf-8")))
        torch.manual_seed(0)
        config = transformers.OpenAIGPTConfig(vocab_size=vocab, **OPENAI_GPT_SHAPE)
        transformers.OpenAIGPTLMHeadModel(config).save_pretrained(out)

    return made_once(tmp_path_factory, "openai-gpt", make)


SEQ = 8  # sequence length of the numbered test shards


def write_numbered_split(root: Path, sequences_per_shard: list[int], per_sample: int = 4) -> Path:
    """A split whose sequence g holds tokens (g, g+1, …): every sequence names itself.
    Written with webdataset's TarWriter in the shard format, with its manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shards, g = [], 1
    for index, n in enumerate(sequences_per_shard):
        seqs = (np.arange(g, g + n)[:, None] * 16 + np.arange(SEQ + 1)[None, :]) % 60000 + 1
        g += n
        blocks = [encode_block(seqs[b : b + per_sample]) for b in range(0, n, per_sample)]
        with open(root / shard_name(index), "wb") as f, wds.TarWriter(f, mtime=0) as w:
            for b, block in enumerate(blocks):
                w.write({"__key__": f"{index:06d}-{b:06d}", "tokens": block})
        data = (root / shard_name(index)).read_bytes()
        shards.append(
            {
                "name": shard_name(index),
                "samples": -(-n // per_sample),
                "sequences": n,
                "tokens": n * SEQ + 1,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                CHECKSUM: [checksum(b) for b in blocks],
            }
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": "0" * 64,
        "vocab_size": 65536,
        "seq_len": SEQ,
        "dtype": "uint16",
        "sequences_per_sample": per_sample,
        "pad_id": 0,
        "total_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


@pytest.fixture
def numbered(tmp_path) -> Path:
    return write_numbered_split(tmp_path / "numbered", [37, 3, 100, 61, 12, 45])


# --- Training runs as a user launches them -------------------------------------------------

BIN = Path(sys.executable).parent
# A small model on the test dataset (vocab 2000, sequences of 64), a small global batch.
SMALL = [
    "model=tiny",
    "model_overrides.n_layer=2",
    "model_overrides.n_embd=64",
    "model_overrides.n_head=2",
    "model_overrides.n_inner=256",
    "model_overrides.n_positions=64",
    "model_overrides.vocab_size=2000",
    "micro_batch_size=4",
    "num_workers=0",
    "log_interval=1",
    "eval_interval=1000",
    "eval_batches=4",
    "sample_interval=0",
    "ds.train_batch_size=8",
    "ds.scheduler.params.warmup_num_steps=5",
]
FP32_NO_DROPOUT = [
    "ds.bf16.enabled=false",
    "model_overrides.embd_pdrop=0",
    "model_overrides.attn_pdrop=0",
    "model_overrides.resid_pdrop=0",
]


def command(launcher: str, port: int, ds_config: str = "ds_configs/zero2.json", ranks: int = 2) -> list[str]:
    script = ["--deepspeed_config", ds_config]
    if launcher == "python":
        return [sys.executable, "-m", "gpt1_ds.train", *script]
    if launcher == "deepspeed":
        return [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            "gpt1_ds/train.py",
            *script,
        ]
    if launcher == "torchrun":
        return [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(port),
            "gpt1_ds/train.py",
            *script,
        ]
    if launcher == "mpirun":
        return [*mpirun(port, ranks), sys.executable, "-m", "gpt1_ds.train", *script]
    raise ValueError(launcher)


def mpirun(port: int, ranks: int = 2) -> list[str]:
    """Open MPI's launcher from the venv for ``ranks`` local processes (as root, oversubscribed),
    passing the rendezvous port."""
    return [
        str(BIN / "mpirun"),
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        str(ranks),
        "-x",
        f"MASTER_PORT={port}",
    ]


def train(
    data: Path,
    run_dir: Path,
    *overrides: str,
    launcher: str = "mpirun",
    port: int | None = None,
    ds_config: str = "ds_configs/zero2.json",
    check: bool = True,
    ranks: int = 2,
    **popen,
) -> subprocess.CompletedProcess:
    cmd = [
        *command(launcher, free_port() if port is None else port, ds_config, ranks),
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        *SMALL,
        *overrides,
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **popen)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


ONE_RANK_ENGINE = """
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import torch
from gpt1_ds import distributed
from gpt1_ds.config import RunConfig
from gpt1_ds.ds_config import load_ds_config, resolve_ds_config
from gpt1_ds.model import GPT, GPTConfig
from gpt1_ds.runner import build_engine
distributed.init()
config, batch, max_steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
run = RunConfig(model="tiny", micro_batch_size=batch, max_steps=max_steps)
ds = resolve_ds_config(load_ds_config(config), run, batch, lambda a: 10**6, config, "cpu")
ds.update(train_batch_size=batch, gradient_accumulation_steps=1)
engine, sched = build_engine(GPT(GPTConfig.from_preset("tiny", n_layer=1)), ds)
"""
"""A script's first lines, run as ``python -c SCRIPT PORT DS_CONFIG BATCH MAX_STEPS [...]``: a
one-rank DeepSpeed engine (``engine``, ``sched``) of a one-layer tiny model, batches of BATCH."""


SHIPPED_STEPS = 2
SHIPPED_TAG = f"step{SHIPPED_STEPS:08d}"
SHIPPED = {
    "zero0": ("zero0", ()),
    "zero1": ("zero1", ()),
    "zero2": ("zero2", ()),
    "zero3": ("zero3", ()),
    "zero0_fp32": ("zero0", ("ds.bf16.enabled=false",)),
    "zero2_padded": ("zero2", ("model_overrides.vocab_multiple=64",)),
}
"""name → (ds_configs file, overrides): the shipped configs as they stand, stage 0 in fp32, and a
table padded to a multiple of 64 rows."""


@pytest.fixture(scope="session")
def shipped_runs(prepared, tmp_path_factory) -> Callable[[str], Path]:
    """``shipped_runs(name)``: the run directory of a 2-rank, 2-step training run (``SMALL``) with
    ``SHIPPED[name]``, trained on first use, once per test run (read-only for the tests)."""

    def make(name: str, run: Path) -> None:
        config, overrides = SHIPPED[name]
        out = train(
            prepared,
            run,
            f"max_steps={SHIPPED_STEPS}",
            *overrides,
            ds_config=f"ds_configs/{config}.json",
            port=free_port(),
        )
        assert (run / "checkpoints" / SHIPPED_TAG / "COMPLETE").is_file(), out.stderr[-4000:]

    return lambda name: made_once(tmp_path_factory, f"shipped_{name}", functools.partial(make, name))
