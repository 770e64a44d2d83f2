"""Step 4: check a prepared dataset against its manifests.

    python -m data_prep.verify DIR [--splits train val test]

For each split: the manifest's tokenizer hash and vocab size against
``DIR/tokenizer.model``; every shard's size and sha256; every sample against its
checksum, then decoded (whole sequences, token ids inside the vocabulary, padding only at the end of a
shard) and the counts of samples, sequences and tokens against the manifest.
Exits non-zero, naming the shard, on any mismatch.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import numpy as np

from data_prep.common import step_parser
from gpt1_ds.files import sha256_file
from gpt1_ds.manifest import CHECKSUM, MANIFEST_NAME, SAMPLE_EXT, checksum, decode_block, read_manifest
from gpt1_ds.tokenizer import MODEL_NAME, load_tokenizer


def verify_shard(path: Path, entry: dict, manifest: dict) -> list[str]:
    """Problems found in one shard (empty when it is whole and matches its entry)."""
    if not path.is_file():
        return [f"{path}: missing"]
    if (size := path.stat().st_size) != entry["bytes"]:
        return [f"{path}: {size} bytes, manifest says {entry['bytes']}"]
    if sha256_file(path) != entry["sha256"]:
        return [f"{path}: sha256 differs from the manifest"]
    seq_len, pad, vocab = manifest["seq_len"], manifest["pad_id"], manifest["vocab_size"]
    samples = sequences = tokens = 0
    tail_seen = False
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.name.endswith("." + SAMPLE_EXT):
                    return [f"{path}: unexpected member {member.name}"]
                data = tar.extractfile(member).read()
                if CHECKSUM in entry and (
                    samples >= len(entry[CHECKSUM]) or checksum(data) != entry[CHECKSUM][samples]
                ):
                    return [f"{path}: {member.name}: {CHECKSUM} differs from the manifest"]
                block = decode_block(data, seq_len)
                if tail_seen:
                    return [f"{path}: {member.name} follows a padded (final) sequence"]
                if (top := int(block.max())) >= vocab:
                    return [f"{path}: {member.name} holds token {top}, vocab_size is {vocab}"]
                stream = block[:, 1:].ravel()  # the targets; the shard's very first token too
                if samples == 0:
                    stream = np.concatenate([block[0, :1], stream])
                real = int(np.count_nonzero(stream != pad))
                tail_seen = real != len(stream)
                if tail_seen and np.any(stream[real:] != pad):
                    return [f"{path}: {member.name} has padding inside the stream"]
                samples += 1
                sequences += len(block)
                tokens += real
    except (tarfile.TarError, ValueError, OSError) as e:
        return [f"{path}: unreadable: {e}"]
    got = {"samples": samples, "sequences": sequences, "tokens": tokens}
    return [f"{path}: {k} {v}, manifest says {entry[k]}" for k, v in got.items() if entry[k] != v]


def verify(data_dir: str | Path, splits: list[str] | None = None) -> list[str]:
    """All problems found in the dataset (an empty list when it verifies)."""
    data_dir = Path(data_dir)
    problems: list[str] = []
    try:
        tok = load_tokenizer(data_dir / MODEL_NAME)
    except (OSError, ValueError) as e:
        return [str(e)]
    names = splits or sorted(p.parent.name for p in data_dir.glob(f"*/{MANIFEST_NAME}"))
    if not names:
        return [f"{data_dir}: no split directory with a manifest.json"]
    for split in names:
        split_dir = data_dir / split
        try:
            manifest = read_manifest(split_dir)
        except (OSError, ValueError) as e:
            problems.append(str(e))
            continue
        where = split_dir / MANIFEST_NAME
        if manifest["tokenizer_sha256"] != tok.sha256:
            problems.append(
                f"{where}: tokenizer_sha256 differs from {tok.path} "
                "(the data was made with another tokenizer)"
            )
        if manifest["vocab_size"] != tok.vocab_size:
            problems.append(f"{where}: vocab_size {manifest['vocab_size']}, tokenizer has {tok.vocab_size}")
        for entry in manifest["shards"]:
            problems.extend(verify_shard(split_dir / entry["name"], entry, manifest))
        total = sum(s["tokens"] for s in manifest["shards"])
        if total != manifest["total_tokens"]:
            problems.append(f"{where}: total_tokens {manifest['total_tokens']}, shards add up to {total}")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = step_parser("data_prep.verify", __doc__)
    parser.add_argument("data", help="dataset directory (holds tokenizer.model and split directories)")
    parser.add_argument("--splits", nargs="+", help="default: every split with a manifest")
    args = parser.parse_args(argv)
    problems = verify(args.data, args.splits)
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"OK {args.data}: every shard matches its manifest")


if __name__ == "__main__":
    main()
