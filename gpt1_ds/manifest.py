"""The shard format and its manifest: the contract between data prep and the loader.

A split directory holds ``shard-%06d.tar`` files and one ``manifest.json``. Each
tar member (``<shard>-<block>.tokens``) is a block of up to
``sequences_per_sample`` sequences of ``seq_len + 1`` tokens, raw little-endian
``uint16``: a sequence gives ``seq_len`` inputs and their ``seq_len`` next-token
targets. Within a shard, consecutive sequences overlap by one token, so every
token of the shard's stream but the first is a target exactly once; the stream's
tail is padded with ``pad_id`` (targets equal to ``pad_id`` are padding). Each shard
entry lists the CRC-32 of every member's bytes (``crc32``), which the loader checks as
the shard streams; datasets prepared before it existed lack the key and stream unchecked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

try:  # ISA-L: the same CRC-32 as zlib's, about 9× faster, so that the loader's checks cost little
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS_NAME = "splits.json"
"""``DATASET/clean/splits.json``: the settings, each split's document ids, each document's size."""
SAMPLE_EXT = "tokens"
DTYPE = "uint16"
# Every key the loader (gpt1_ds.data) and data_prep.verify read, with its type, at the top and
# in each shard entry.
REQUIRED: dict[str, type] = {
    "format_version": int,
    "tokenizer_sha256": str,
    "vocab_size": int,
    "seq_len": int,
    "dtype": str,
    "sequences_per_sample": int,
    "pad_id": int,
    "total_tokens": int,
    "shards": list,
}
SHARD_REQUIRED: dict[str, type] = {
    "name": str,
    "samples": int,
    "sequences": int,
    "tokens": int,
    "bytes": int,
    "sha256": str,
}
CHECKSUM = "crc32"
"""Shard entry key: the CRC-32 of each member's bytes, in member order (optional: see the module doc)."""


def checksum(data: bytes) -> int:
    """The ``CHECKSUM`` of one member: detects flipped bits, not deliberate tampering (the
    shard's sha256 is for that, checked by ``data_prep.verify``)."""
    return crc32(data)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_block(sequences: np.ndarray) -> bytes:
    """[n, seq_len + 1] token ids → the bytes of one sample."""
    return np.ascontiguousarray(sequences, dtype="<u2").tobytes()


def decode_block(data: bytes, seq_len: int) -> np.ndarray:
    """The bytes of one sample → [n, seq_len + 1] uint16; a size that is not whole sequences is an error."""
    row = 2 * (seq_len + 1)
    if len(data) == 0 or len(data) % row:
        raise ValueError(
            f"sample of {len(data)} bytes is not a whole number of {seq_len + 1}-token sequences"
        )
    return np.frombuffer(data, dtype="<u2").reshape(-1, seq_len + 1)


def read_manifest(split_dir: str | Path) -> dict[str, Any]:
    """Load and check the manifest of a split directory; errors name the file and key."""
    path = Path(split_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (is the dataset prepared and complete?)")
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes | str, where: str) -> dict[str, Any]:
    """Check a manifest's JSON text; ``where`` (its path or URL) names it in errors."""
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    _check_keys(manifest, REQUIRED, where)
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {manifest['format_version']}, this code reads {FORMAT_VERSION}"
        )
    if manifest["dtype"] != DTYPE:
        raise ValueError(f"{where}: dtype {manifest['dtype']!r}, expected {DTYPE!r}")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise ValueError(f"{where}: shards[{i}] is not an object")
        _check_keys(shard, SHARD_REQUIRED, f"{where}: shards[{i}]")
        sums = shard.get(CHECKSUM)
        if sums is not None and (
            not isinstance(sums, list)
            or len(sums) != shard["samples"]
            or not all(isinstance(v, int) for v in sums)
        ):
            raise ValueError(
                f"{where}: shards[{i}].{CHECKSUM} must list one integer per sample ({shard['samples']})"
            )
    return manifest


def _check_keys(data: dict[str, Any], types: dict[str, type], where: str) -> None:
    """Every key of ``types`` present in ``data`` with its type (an int is not a bool)."""
    if missing := [k for k in types if k not in data]:
        raise ValueError(f"{where}: missing keys {missing}")
    for key, kind in types.items():
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}: {key} must be {kind.__name__}, got {value!r}")


def check_compatible(
    manifest: dict[str, Any],
    where: str,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
) -> None:
    """Refuse a dataset that does not fit the tokenizer or the model, naming both values."""
    if tokenizer_sha256 is not None and manifest["tokenizer_sha256"] != tokenizer_sha256:
        raise ValueError(
            f"{where}: tokenizer_sha256 {manifest['tokenizer_sha256'][:16]}… does not match "
            f"the tokenizer's {tokenizer_sha256[:16]}…"
        )
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise ValueError(f"{where}: vocab_size {manifest['vocab_size']} exceeds the model's {vocab_size}")
    if seq_len is not None and manifest["seq_len"] < seq_len:
        raise ValueError(f"{where}: seq_len {manifest['seq_len']} is shorter than the model's {seq_len}")


def read_splits(dataset_dir: str | Path) -> dict:
    """``clean/splits.json`` of a dataset directory."""
    path = Path(dataset_dir) / "clean" / SPLITS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run data_prep.clean first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None


def train_docs(dataset_dir: Path) -> tuple[list[Path], str]:
    """The cleaned train documents listed in ``clean/splits.json``, and a fingerprint of them."""
    splits = read_splits(dataset_dir)
    train_ids = splits["splits"]["train"]
    fingerprint = json.dumps([splits["settings"], [(d, splits["docs"][d]["bytes"]) for d in train_ids]])
    docs = [dataset_dir / "clean" / "docs" / f"{d}.txt" for d in train_ids]
    return docs, hashlib.sha256(fingerprint.encode()).hexdigest()
