"""data_prep.verify: a prepared dataset checked against its manifests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from data_prep.verify import verify
from gpt1_ds.manifest import CHECKSUM, MANIFEST_NAME, read_manifest


@pytest.mark.slow
def test_verify_detects_a_tokenizer_mismatch_and_a_corrupt_shard(prepared, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    train = read_manifest(ds / "train")
    shard = ds / "train" / train["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(ds)
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]
    shard.write_bytes(bytes(data[:2000]) + bytes([data[2000] ^ 0xFF]) + bytes(data[2001:]))  # whole again
    train["shards"][1][CHECKSUM][2] ^= 1  # a manifest whose checksums do not describe its shards
    (ds / "train" / MANIFEST_NAME).write_text(json.dumps(train))
    problems = verify(ds)
    assert len(problems) == 1 and f"{train['shards'][1]['name']}: 000001-000002.tokens: crc32" in problems[0]

    # A tokenizer trained with other settings: every manifest is flagged.
    out = subprocess.run(
        [sys.executable, "-m", "data_prep.tokenizer", "--out", str(ds), "--vocab-size", "1500", "--force"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "data_prep.verify", str(ds)], cwd=REPO, capture_output=True, text=True
    )
    assert cli.returncode == 1
    assert "train/manifest.json: tokenizer_sha256 differs" in cli.stderr
    assert "vocab_size 2000, tokenizer has 1500" in cli.stderr
