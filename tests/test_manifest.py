"""gpt1_ds.manifest: a manifest's types and keys checked, naming the file and the key."""

from __future__ import annotations

import json

import pytest

from gpt1_ds.manifest import CHECKSUM, MANIFEST_NAME, read_manifest


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("seq_len"), r"missing keys \['seq_len'\]"),
        (lambda m: m.update(vocab_size="2000"), r"vocab_size must be int, got '2000'"),
        (lambda m: m.update(shards={}), r"shards must be list"),
        (lambda m: m["shards"][1].update(sequences=None), r"shards\[1\]: sequences must be int, got None"),
        (lambda m: m["shards"][0][CHECKSUM].pop(), r"shards\[0\]\.crc32 must list one integer per sample"),
    ],
)
def test_a_manifest_with_wrong_types_or_missing_keys_names_the_file_and_key(numbered, edit, message):
    manifest = json.loads((numbered / MANIFEST_NAME).read_text())
    edit(manifest)
    (numbered / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{numbered / MANIFEST_NAME}: {message}"):
        read_manifest(numbered)
