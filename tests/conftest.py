"""Shared fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A dataset prepared once from three real books (read-only for the tests)."""
    out = tmp_path_factory.mktemp("prepared")
    run_prepare(out)
    return out


@pytest.fixture(scope="session")
def openai_dir(tmp_path_factory) -> Path:
    """An ``openai-gpt`` tokenizer folder (``vocab.json``, ``merges.txt``): 1,000 BPE merges learned
    once from a real book with GPT-1's own words (ftfy, standardisation, spaCy, lower case), the
    layout of Hugging Face's ``openai-gpt`` files (read-only for the tests)."""
    from gpt1_ds.openai_bpe import learn_bpe, read_text, write_openai_files

    out = tmp_path_factory.mktemp("openai_bpe")
    vocab, merges = learn_bpe([read_text(SAMPLE_BOOKS[0])], num_merges=1000)
    write_openai_files(out, vocab, merges)
    return out


OPENAI_GPT_SHAPE = dict(n_positions=64, n_embd=64, n_layer=2, n_head=4)
"""The shape of ``openai_gpt_dir``'s model."""


@pytest.fixture(scope="session")
def openai_gpt_dir(openai_dir, tmp_path_factory) -> Path:
    """An ``openai-gpt``-format directory, as ``from_pretrained("openai-gpt")`` caches it: the
    tokenizer files of ``openai_dir`` and random weights saved by transformers'
    ``OpenAIGPTLMHeadModel.save_pretrained`` (config.json, model.safetensors)."""
    import shutil

    import torch
    import transformers

    out = tmp_path_factory.mktemp("openai-gpt")
    from gpt1_ds.openai_bpe import MERGES_NAME, VOCAB_NAME

    for name in (VOCAB_NAME, MERGES_NAME):
        shutil.copyfile(openai_dir / name, out / name)
    vocab = len(json.loads((out / VOCAB_NAME).read_text(encoding="utf-8")))
    torch.manual_seed(0)
    config = transformers.OpenAIGPTConfig(vocab_size=vocab, **OPENAI_GPT_SHAPE)
    transformers.OpenAIGPTLMHeadModel(config).save_pretrained(out)
    return out
