"""data_prep.shard and verify: real books end to end, determinism, MPI, kill and rerun."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE_BOOKS, run_prepare

from data_prep.shard import TAR_MTIME, encode_in_parts, pack
from data_prep.verify import verify
from gpt1_ds.manifest import CHECKSUM, MANIFEST_NAME, SAMPLE_EXT, decode_block, read_manifest
from gpt1_ds.tokenizer import MODEL_NAME, load_tokenizer


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every shard, manifest and the tokenizer: relative path → bytes."""
    files = [*root.glob("*/shard-*.tar"), *root.glob("*/manifest.json"), root / MODEL_NAME]
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(files)}


def shard_stream(path: Path, seq_len: int, pad_id: int) -> np.ndarray:
    """The token stream a shard holds (overlaps undone, padding dropped)."""
    with tarfile.open(path) as tar:
        blocks = [decode_block(tar.extractfile(m).read(), seq_len) for m in tar]
    seqs = np.concatenate(blocks)
    stream = np.concatenate([seqs[0], seqs[1:, 1:].ravel()])
    return stream[stream != pad_id]


def test_pack_makes_every_token_but_the_first_a_target_once():
    stream = np.arange(1, 24, dtype=np.uint16)  # 23 tokens, pad 0
    seqs = pack(stream, seq_len=5, pad_id=0)
    assert seqs.shape == (5, 6)  # ceil(22 / 5) sequences of 5 + 1
    targets = seqs[:, 1:].ravel()
    assert list(targets[targets != 0]) == list(stream[1:])
    inputs = seqs[:, :-1].ravel()
    assert list(inputs[:22]) == list(stream[:-1])
    assert np.all(seqs[-1, 3:] == 0)


def test_manifest_totals_add_up_and_dataset_verifies(prepared):
    assert verify(prepared) == []
    tok = load_tokenizer(prepared / MODEL_NAME)
    splits = json.loads((prepared / "clean" / "splits.json").read_text())["splits"]
    for split in ("train", "val", "test"):
        m = read_manifest(prepared / split)
        assert m["documents"] == len(splits[split]) >= 1
        assert m["tokenizer_sha256"] == tok.sha256 and m["vocab_size"] == tok.vocab_size
        assert m["total_tokens"] == sum(s["tokens"] for s in m["shards"])
        assert m["total_sequences"] == sum(s["sequences"] for s in m["shards"])
        for s in m["shards"]:
            assert (prepared / split / s["name"]).stat().st_size == s["bytes"]
            assert s["sequences"] == -(-(s["tokens"] - 1) // m["seq_len"])
    # Tar overhead: at most a 512-byte header and 511 bytes of padding per sample, and the
    # end-of-archive record per shard (with the default 128 × 513-token samples and large
    # shards this is under 1% of the token bytes: see benchmarks/bench_prep.py).
    train = read_manifest(prepared / "train")
    token_bytes = 2 * train["total_sequences"] * (train["seq_len"] + 1)
    samples = sum(s["samples"] for s in train["shards"])
    assert token_bytes < train["total_bytes"] <= token_bytes + 1023 * samples + 10240 * len(train["shards"])


def test_decoding_a_books_tokens_gives_back_its_cleaned_text(prepared):
    tok = load_tokenizer(prepared / MODEL_NAME)
    for split in ("train", "val", "test"):
        m = read_manifest(prepared / split)
        stream = np.concatenate(
            [shard_stream(prepared / split / s["name"], m["seq_len"], m["pad_id"]) for s in m["shards"]]
        )
        assert len(stream) == m["total_tokens"]
        docs = np.split(stream, np.flatnonzero(stream == tok.eod_id) + 1)[:-1]
        ids = json.loads((prepared / "clean" / "splits.json").read_text())["splits"][split]
        assert len(docs) == len(ids)
        for doc_id, tokens in zip(ids, docs, strict=True):
            text = (prepared / "clean" / "docs" / f"{doc_id}.txt").read_text(encoding="utf-8")
            assert tok.decode(tokens[:-1]) == text


@pytest.mark.slow
def test_two_runs_and_two_mpi_ranks_give_identical_bytes(prepared, tmp_path):
    run_prepare(tmp_path / "again")
    run_prepare(tmp_path / "mpi", mpi_ranks=2)
    reference = dataset_files(prepared)
    assert len(reference) > 5
    assert dataset_files(tmp_path / "again") == reference
    assert dataset_files(tmp_path / "mpi") == reference
    for split in ("train", "val", "test"):
        assert (
            read_manifest(tmp_path / "mpi" / split)["total_tokens"]
            == read_manifest(prepared / split)["total_tokens"]
        )


def test_the_shards_are_what_webdatasets_writer_writes_and_its_reader_reads(prepared):
    """Written with the standard library, a shard is byte for byte the tar ``webdataset.TarWriter``
    makes of its samples, and ``webdataset.WebDataset`` reads them back."""
    import webdataset as wds

    shard = prepared / "train" / read_manifest(prepared / "train")["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    samples = [{"__key__": name.removesuffix(f".{SAMPLE_EXT}"), SAMPLE_EXT: data} for name, data in members]
    assert len(samples) > 1 and all(name.endswith(f".{SAMPLE_EXT}") for name, _ in members)
    rewritten = io.BytesIO()
    with wds.TarWriter(rewritten, mtime=TAR_MTIME, user="gpt1-ds", group="gpt1-ds") as writer:
        for sample in samples:
            writer.write(dict(sample))
    assert rewritten.getvalue() == shard.read_bytes()
    read = [
        {k: s[k] for k in ("__key__", SAMPLE_EXT)} for s in wds.WebDataset(str(shard), shardshuffle=False)
    ]
    assert read == samples


@pytest.mark.slow
def test_preparing_a_dataset_imports_neither_torch_nor_webdataset(tmp_path, monkeypatch):
    """Data preparation (MPI ranks on CPU nodes) needs neither: each import of torch costs seconds."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # python -X importtime: every module, on stderr
    out = run_prepare(tmp_path / "ds")
    imported = {
        line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")
    }
    assert "data_prep.shard" in imported and "sentencepiece" in imported
    assert not {m.split(".")[0] for m in imported} & {"torch", "webdataset"}


@pytest.mark.slow
def test_rerun_skips_whole_shards_and_redoes_damaged_ones(prepared, tmp_path):
    out = tmp_path / "ds"
    run_prepare(out)
    shards = sorted((out / "train").glob("shard-*.tar"))
    assert len(shards) >= 3
    stamps = {s.name: s.stat().st_mtime_ns for s in shards}
    with open(shards[1], "r+b") as f:  # damage one shard
        f.truncate(1000)
    result = run_prepare(out)
    assert f"({1} written, {len(shards) - 1} kept)" in result.stderr
    assert dataset_files(out) == dataset_files(prepared)
    assert all(s.stat().st_mtime_ns == stamps[s.name] for s in shards if s != shards[1])
    manifest = json.loads((out / "train" / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:  # as prepared by an older data_prep.shard: no member checksums
        del entry[CHECKSUM]
    (out / "train" / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = run_prepare(out)
    assert f"train: {manifest['documents']} documents" in result.stderr
    assert f"({len(shards)} written, 0 kept)" in result.stderr
    assert dataset_files(out) == dataset_files(prepared)
    result = run_prepare(out, extra=["--force"])
    assert f"({len(shards)} written, 0 kept)" in result.stderr


@pytest.mark.slow
def test_sigkill_after_the_first_shard_then_rerun_completes_identically(prepared, tmp_path):
    out = tmp_path / "killed"
    run_prepare(out, extra=["--splits", "val"])  # clean + tokenizer + a first split, as a run would
    # Many small shards, so that the shard step is still running when the first one lands.
    cmd = [
        sys.executable,
        "-m",
        "data_prep.shard",
        "--data",
        str(out),
        "--seq-len",
        "64",
        "--sequences-per-sample",
        "16",
        "--shard-bytes",
        "4000",
        "--splits",
        "train",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = out / "train" / ".progress"
    deadline = time.monotonic() + 120
    while not (progress.is_dir() and any(progress.glob("*.json"))):
        assert proc.poll() is None, "the shard step ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "train" / "manifest.json").exists(), "killed too late"
    written = len(list((out / "train").glob("shard-*.tar")))
    assert written >= 1
    assert verify(out, ["train"]) != []  # an incomplete dataset never verifies

    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    assert verify(out, ["train"]) == []
    clean_run = tmp_path / "clean_run"
    run_prepare(clean_run, extra=["--splits", "val"])
    subprocess.run([*cmd[:4], str(clean_run), *cmd[5:]], cwd=REPO, check=True, capture_output=True)
    assert dataset_files(out) == dataset_files(clean_run)
    assert not list((out / "train").glob(".shard-*"))  # no temporary file left behind


@pytest.mark.slow
def test_each_step_has_help():
    for step in ("clean", "tokenizer", "shard", "verify", "prepare"):
        out = subprocess.run(
            [sys.executable, "-m", f"data_prep.{step}", "--help"], cwd=REPO, capture_output=True, text=True
        )
        assert out.returncode == 0 and "usage:" in out.stdout, step


@pytest.mark.slow
def test_a_size_one_world_under_a_multi_task_launch_is_refused(tmp_path):
    env = {**os.environ, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    out = subprocess.run(
        [sys.executable, "-m", "data_prep.shard", "--data", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode != 0 and "MPI world of size 1" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2])
def test_mpi_clean_splits_files_between_ranks(tmp_path, ranks):
    run_prepare(tmp_path / "ds", books=SAMPLE_BOOKS, mpi_ranks=ranks, extra=["--no-verify"])
    report = json.loads((tmp_path / "ds" / "clean" / "report.json").read_text())
    assert report["documents"] == len(SAMPLE_BOOKS) and report["skipped"] == []


@pytest.mark.slow
def test_a_split_turned_off_is_not_an_error(tmp_path):
    """--test-fraction 0: train and val are written and verified, and there is no test split."""
    out = tmp_path / "ds"
    run_prepare(out, extra=["--val-fraction", "0.3", "--test-fraction", "0"])  # asserts exit 0
    assert sorted(p.parent.name for p in out.glob("*/manifest.json")) == ["train", "val"]
    assert verify(out) == []


@pytest.mark.slow
def test_too_few_books_for_the_splits_fail_before_any_work(tmp_path):
    out = tmp_path / "ds"
    result = run_prepare(out, SAMPLE_BOOKS[:2], check=False)  # val and test requested: 3 splits
    assert result.returncode != 0
    assert "2 input file(s) cannot fill train, val, test with one document each" in result.stderr
    assert not (out / "clean" / "docs").exists()  # nothing was cleaned


def test_a_document_is_encoded_in_parts_to_the_ids_of_the_whole_and_its_bytes_counted(prepared):
    tok = load_tokenizer(prepared / MODEL_NAME)
    docs = sorted((prepared / "clean" / "docs").glob("*.txt"))
    book = docs[0].read_text(encoding="utf-8")
    for text in (
        book,
        " ".join(book.split()),
        book[:500] + "\n\n" + " ".join(book.split())[:5000],
        "",
        "a\n",
    ):
        counted = []
        ids = encode_in_parts(tok, text, 1, counted.append, part_chars=700)
        assert ids.tolist() == tok.encode_batch([text])[0].tolist()
        assert len(counted) > 1 or len(text) <= 700
        assert sum(counted) in (len(text.encode("utf-8")) + 1, len(text.encode("utf-8")))
