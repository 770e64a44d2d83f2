"""data_prep.prepare: a dataset directory is never replaced unasked; bad input is one line, exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import SAMPLE_BOOKS, run_prepare

from gpt1_ds.manifest import MANIFEST_NAME


def dataset_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_another_dataset_in_out_is_refused_naming_the_difference_until_forced(prepared, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(prepared, out)
    before = dataset_bytes(out)
    assert run_prepare(out).returncode == 0 and dataset_bytes(out) == before  # same inputs: kept
    for extra, books, named in [
        (["--vocab-size", "1500", "--seq-len", "32"], None, "--vocab-size 2000 then, 1500 now; --seq-len 64"),
        (["--lowercase"], None, "--lowercase False then, True now"),
        ([], SAMPLE_BOOKS[:2], f"inputs: 1 not given now ({SAMPLE_BOOKS[2].name})"),
    ]:  # fmt: skip
        out_ = run_prepare(out, books, extra, check=False)
        assert out_.returncode == 2 and "Traceback" not in out_.stderr, out_.stderr[-2000:]
        assert f"--out {out} holds a dataset made from other inputs or settings (" in out_.stderr
        assert named in out_.stderr and "choose another --out, or replace it with --force" in out_.stderr
        assert dataset_bytes(out) == before  # nothing touched
    replaced = run_prepare(out, extra=["--vocab-size", "1500", "--force"])
    assert "replacing it (--force)" in replaced.stderr
    assert (out / "train" / MANIFEST_NAME).is_file() and dataset_bytes(out) != before


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(prepare's arguments, the words its one-line error must hold) for each mistake."""
    (tmp / "empty").mkdir()
    (tmp / "binary").mkdir()
    (tmp / "binary" / "a.txt").write_bytes(bytes(range(256)) * 100)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.md").write_text("mine")
    (tmp / "a_file").write_text("x")
    books = [str(b) for b in SAMPLE_BOOKS]
    out = ["--out", str(tmp / "out")]
    a_file, mine = tmp / "a_file", tmp / "mine"
    return [
        (["--input", str(tmp / "empty"), *out], f"no input files under ['{tmp / 'empty'}']"),
        (["--input", str(tmp / "nope"), *out], f"input '{tmp / 'nope'}' matches no file or directory"),
        (
            ["--input", str(tmp / "binary"), *out, "--val-fraction", "0", "--test-fraction", "0"],
            "no documents: every one of the 1 input file(s) was skipped (1 binary file)",
        ),
        (["--input", *books, *out, "--vocab-size", "10"], "--vocab-size 10 is too small for this text"),
        (["--input", *books, *out, "--vocab-size", "70000"], "--vocab-size: must lie in 1..65536"),
        (["--input", *books, *out, "--seq-len", "0"], "--seq-len: must be 1 or more, got 0"),
        (["--input", *books, *out, "--seq-len", "-5"], "--seq-len: must be 1 or more, got -5"),
        (["--input", *books, *out, "--val-fraction", "1.5"], "--val-fraction: must lie in [0, 1), got 1.5"),
        (["--input", *books, "--out", str(a_file)], f"--out {a_file} is a file, not a directory"),
        (["--input", *books, "--out", str(mine)], f"--out {mine} is not empty and holds no dataset"),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", range(10))
def test_a_bad_input_is_one_line_and_exit_2(tmp_path, case):
    import subprocess
    import sys

    from conftest import REPO

    args, words = bad_inputs(tmp_path)[case]
    cmd = [sys.executable, "-m", "data_prep.prepare", *args, "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert words in out.stderr.strip().splitlines()[-1]
    assert (tmp_path / "mine" / "notes.md").read_text() == "mine"
    if ": must " in words:  # a flag's value: refused before any work
        assert not (tmp_path / "out").exists()
