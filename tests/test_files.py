"""gpt1_ds.files: a file appears whole or not at all; hashes in chunks."""

from __future__ import annotations

import hashlib

import pytest

from gpt1_ds.files import atomic_write_text, atomic_writer, sha256_file


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_writer(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no .tmp left behind
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_sha256_in_chunks_is_the_whole_files(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob", chunk=1000) == hashlib.sha256(data).hexdigest()
