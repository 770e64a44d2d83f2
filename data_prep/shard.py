"""Step 3: tokenize the cleaned documents and pack them into WebDataset shards.

For each split, the split's documents (sorted by id) are cut into shards at
document boundaries, about ``--shard-bytes`` of tokens each (estimated from the
text size). A shard's token stream is its documents' tokens, each followed by
``<eod>``; it is packed into sequences of ``seq_len + 1`` tokens that overlap by
one, so that each sequence trains ``seq_len`` next-token targets and every token
but the stream's first is a target exactly once; the last sequence is padded.
Blocks of ``--sequences-per-sample`` sequences are stored as raw uint16 tar
members (format: ``gpt1_ds.manifest``).

The shard plan depends only on the documents and the settings, not on the
number of processes: ``mpirun -np N python -m data_prep.shard ...`` gives the
same bytes for every N. Ranks take disjoint shards, balanced by size; each shard
is written under a temporary name and renamed when complete; rank 0 writes
``manifest.json`` last, once every shard is in place. A rerun skips shards whose
sha256 matches the manifest (or the record a killed run left of a finished
shard) and redoes partial or missing ones; ``--force`` redoes all.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import sys
import tarfile
from argparse import ArgumentParser, Namespace
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.common import (
    Comm,
    balance,
    launch,
    positive_int,
    progress,
    remove_stale,
    run_command,
    step_parser,
)
from gpt1_ds.files import atomic_write_text, atomic_writer, sha256_file
from gpt1_ds.manifest import (
    CHECKSUM,
    DTYPE,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SAMPLE_EXT,
    checksum,
    encode_block,
    read_splits,
    shard_name,
)
from gpt1_ds.text import SINGLE_SPACE
from gpt1_ds.tokenizer import MODEL_NAME, Tokenizer, load_tokenizer

log = logging.getLogger("data_prep.shard")

PROGRESS_DIR = ".progress"
TAR_MTIME = 0  # fixed, for byte-identical shards
EST_TOKEN_BYTES_PER_TEXT_BYTE = 0.55  # ≈ 2 bytes per token over ≈ 3.6 characters per token


@dataclass(frozen=True)
class Piece:
    """Lines [start, end) of one cleaned document."""

    doc: str
    start: int
    end: int
    last: bool  # the document's final piece: ends with <eod>


@dataclass(frozen=True)
class ShardPlan:
    index: int
    pieces: tuple[Piece, ...]
    text_bytes: int
    key: str  # hash of everything the shard's bytes depend on

    @property
    def name(self) -> str:
        return shard_name(self.index)


def plan_shards(docs: list[tuple[str, list[int]]], shard_bytes: int, fingerprint: str) -> list[ShardPlan]:
    """Cut the documents (id, byte size of each line), in order, into shards of about
    ``shard_bytes`` of tokens; a document larger than that is cut between lines."""
    target = max(1, int(shard_bytes / EST_TOKEN_BYTES_PER_TEXT_BYTE))
    groups: list[list[tuple[Piece, int]]] = [[]]
    size = 0
    for doc, lines in docs:
        start, piece_bytes = 0, 0
        for i, n in enumerate(lines):
            if size > 0 and size + n > target:  # this line opens the next shard
                if i > start:
                    groups[-1].append((Piece(doc, start, i, False), piece_bytes))
                groups.append([])
                size, start, piece_bytes = 0, i, 0
            size += n + 1
            piece_bytes += n + 1
        groups[-1].append((Piece(doc, start, len(lines), True), piece_bytes))
    plans = []
    for i, group in enumerate(g for g in groups if g):
        pieces = tuple(p for p, _ in group)
        key = hashlib.sha256(json.dumps([fingerprint, [list(asdict(p).values()) for p in pieces]]).encode())
        plans.append(ShardPlan(i, pieces, sum(b for _, b in group), key.hexdigest()))
    return plans


def line_sizes(path: Path) -> list[int]:
    """UTF-8 byte size of each line of a cleaned document."""
    return [len(line) for line in path.read_bytes().split(b"\n")]


PART_CHARS = 1 << 20
"""Characters encoded at a time within a document, so that the progress bar moves inside one."""


def encode_in_parts(
    tok: Tokenizer, text: str, threads: int, done: Callable[[int], Any], part_chars: int = PART_CHARS
) -> np.ndarray:
    """``tok.encode_batch([text])[0]``, about ``part_chars`` characters at a time: each part ends at a
    newline (its id joins the parts) or, in a longer line, at a single space (nothing joins them:
    the tokenizer encodes across neither). ``done(bytes)`` after each part, the separator counted,
    so that a document's parts add up to its bytes plus one."""
    ids, start = [], 0
    while start < len(text) or not ids:
        end, join = len(text), None
        if len(text) - start > part_chars:
            newline = text.find("\n", start + part_chars, start + 2 * part_chars)
            space = None if newline >= 0 else SINGLE_SPACE.search(text, start + part_chars)
            end = newline if newline >= 0 else (space.start() if space else len(text))
            join = tok.newline_id if newline >= 0 else None
        ids.append(tok.encode_batch([text[start:end]], num_threads=threads)[0])
        if join is not None:
            ids.append(np.array([join], dtype=np.uint32))
        done(len(text[start:end].encode("utf-8")) + 1)
        start = end + 1
    return np.concatenate(ids)


def pack(stream: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """A token stream → [n, seq_len + 1] windows with stride seq_len; the tail padded."""
    n = max(1, -(-(len(stream) - 1) // seq_len))  # ceil((len - 1) / seq_len)
    padded = np.full(n * seq_len + 1, pad_id, dtype=np.uint16)
    padded[: len(stream)] = stream
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return padded[index]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One sample's member, ``KEY.EXT``, as ``webdataset.TarWriter`` writes it (read-only, a fixed
    time and owner: byte-identical shards). Written with the standard library, so that data
    preparation does not import webdataset, which imports torch (1.7 s a process)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uname = info.gname = "gpt1-ds"
    tar.addfile(info, io.BytesIO(data))


def build_shard(
    plan: ShardPlan, docs_dir: Path, out_dir: Path, tok: Tokenizer, args: Namespace, bar: tqdm
) -> dict:
    """Tokenize, pack and write one shard (temporary name, renamed when complete)."""
    parts = []
    for piece in plan.pieces:  # a shard holds at most one piece of each document
        lines = (docs_dir / f"{piece.doc}.txt").read_text(encoding="utf-8").split("\n")
        text = "\n".join(lines[piece.start : piece.end])
        if piece.start > 0:  # the document goes on from the previous shard, after a newline
            parts.append(np.array([tok.newline_id], dtype=np.uint32))
        parts.append(encode_in_parts(tok, text, args.threads, bar.update))
        if piece.last:
            parts.append(np.array([tok.eod_id], dtype=np.uint32))
    stream = np.concatenate(parts)
    if stream.max(initial=0) >= 2**16:
        raise ValueError(f"token id {int(stream.max())} does not fit {DTYPE}")
    sequences = pack(stream.astype(np.uint16), args.seq_len, tok.pad_id)
    k = args.sequences_per_sample
    starts = range(0, len(sequences), k)
    final = out_dir / plan.name
    sums = []
    with atomic_writer(final) as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for i, start in enumerate(starts):
            block = encode_block(sequences[start : start + k])
            add_member(tar, f"{plan.index:06d}-{i:06d}.{SAMPLE_EXT}", block)
            sums.append(checksum(block))
    entry = {
        "name": plan.name,
        "samples": len(starts),
        "sequences": len(sequences),
        "tokens": len(stream),
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "documents": sum(p.last for p in plan.pieces),
        "plan": plan.key,
        CHECKSUM: sums,
    }
    atomic_write_text(out_dir / PROGRESS_DIR / f"{plan.name}.json", json.dumps(entry))
    return entry


def finished_entries(plans: list[ShardPlan], out_dir: Path) -> dict[str, dict]:
    """The records, by name, of the shards already on disk and whole for their plan: from the
    manifest, or from the record a killed run left of a finished shard."""
    previous = {}
    if (out_dir / MANIFEST_NAME).is_file():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            previous = {s["name"]: s for s in json.loads((out_dir / MANIFEST_NAME).read_text())["shards"]}
    done = {}
    for plan in plans:
        path = out_dir / plan.name
        if not path.is_file():
            continue
        candidates = [previous.get(plan.name)]
        record = out_dir / PROGRESS_DIR / f"{plan.name}.json"
        if record.is_file():
            with contextlib.suppress(json.JSONDecodeError):  # a record cut short: redo the shard
                candidates.append(json.loads(record.read_text()))
        size = path.stat().st_size
        candidates = [
            c for c in candidates if c and c.get("plan") == plan.key and c["bytes"] == size and CHECKSUM in c
        ]
        digest = sha256_file(path) if candidates else None
        entry = next((c for c in candidates if c["sha256"] == digest), None)
        if entry is not None:
            done[plan.name] = entry
    return done


def plan_split(
    out_dir: Path, docs: list[tuple[str, list[int]]], fingerprint: str, args: Namespace
) -> tuple[list[ShardPlan], list[int], dict[str, dict]]:
    """Rank 0: the split's shard plans, the indices of those to write and the records of the
    others; while anything is to be written, the manifest is taken away so that the split
    never looks complete."""
    plans = plan_shards(docs, args.shard_bytes, fingerprint)
    (out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    done = {} if args.force else finished_entries(plans, out_dir)
    todo = [p.index for p in plans if p.name not in done]
    if todo:
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    return plans, todo, done


def write_manifest(
    split: str, out_dir: Path, plans: list[ShardPlan], shards: list[dict], tok: Tokenizer, args: Namespace
) -> dict:
    """Rank 0, once every shard is in place: drop leftovers, then write the split's manifest."""
    remove_stale(out_dir, "shard-*.tar", {p.name for p in plans})  # from an earlier plan with more shards
    remove_stale(out_dir, ".shard-*.tmp*")  # left by a killed run
    manifest = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "seq_len": args.seq_len,
        "dtype": DTYPE,
        "sequences_per_sample": args.sequences_per_sample,
        "pad_id": tok.pad_id,
        "eod_id": tok.eod_id,
        "documents": sum(p.last for plan in plans for p in plan.pieces),  # each ends in one piece
        "text_bytes": sum(p.text_bytes for p in plans),
        **{f"total_{k}": sum(s[k] for s in shards) for k in ("tokens", "sequences", "bytes")},
        "shards": shards,
    }
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1))
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    return manifest


def shard_split(
    split: str, data_dir: Path, tok: Tokenizer, splits: dict, args: Namespace, comm: Comm
) -> dict | None:
    """Write one split's shards and (rank 0) its manifest."""
    out_dir = data_dir / split
    docs_dir = data_dir / "clean" / "docs"
    doc_ids = splits["splits"][split]
    if not doc_ids:  # turned off (its fraction is 0), or an empty split of an older dataset
        off = splits["settings"].get(f"{split}_fraction") == 0
        if comm.is_root:
            log.log(logging.INFO if off else logging.WARNING, "split %s has no documents: skipped", split)
        return None
    key = {"format_version": FORMAT_VERSION, "tokenizer": tok.sha256, "clean": splits["settings"]}
    key |= {"seq_len": args.seq_len, "sequences_per_sample": args.sequences_per_sample}
    # Ranks measure the lines of disjoint documents; rank 0 plans the shards.
    mine = balance([splits["docs"][d]["bytes"] for d in doc_ids], comm.size)[comm.rank]
    measured = comm.gather({i: line_sizes(docs_dir / f"{doc_ids[i]}.txt") for i in mine})
    plans = todo = done = None
    if comm.is_root:
        lines = {i: v for part in measured for i, v in part.items()}
        docs = [(d, lines[i]) for i, d in enumerate(doc_ids)]
        plans, todo, done = plan_split(out_dir, docs, json.dumps(key, sort_keys=True), args)
        if comm.size > len(todo) > 0:
            idle = "%s: %d shards to write for %d ranks: some ranks idle (lower --shard-bytes)"
            log.info(idle, split, len(todo), comm.size)
    plans, todo = comm.bcast((plans, todo))
    work = [plans[i] for i in todo]
    mine = [work[i] for i in balance([p.text_bytes for p in work], comm.size)[comm.rank]]
    bar = progress(sum(p.text_bytes for p in mine), f"shard {split}", comm, args.quiet)
    entries = [build_shard(p, docs_dir, out_dir, tok, args, bar) for p in mine]
    bar.close()
    gathered = comm.gather(entries)
    if not comm.is_root:
        return None
    done.update((e["name"], e) for part in gathered for e in part)
    shards = [done[p.name] for p in plans]
    manifest = write_manifest(split, out_dir, plans, shards, tok, args)
    log.info(
        "%s: %d documents → %d shards, %d tokens, %d sequences of %d, %.1f MB (%d written, %d kept)",
        split,
        len(doc_ids),
        len(shards),
        manifest["total_tokens"],
        manifest["total_sequences"],
        args.seq_len,
        manifest["total_bytes"] / 1e6,
        len(todo),
        len(plans) - len(todo),
    )
    return manifest


def run(args: Namespace, comm: Comm) -> dict[str, dict]:
    """Shard every split of ``args.splits``; rank 0 gets the manifests of those written."""
    data_dir = Path(args.data)
    splits = read_splits(data_dir)
    tok = load_tokenizer(data_dir / MODEL_NAME)
    if tok.vocab_size > 2**16:
        raise ValueError(f"{tok.path}: vocab of {tok.vocab_size} does not fit {DTYPE} shards")
    manifests = {split: shard_split(split, data_dir, tok, splits, args, comm) for split in args.splits}
    comm.barrier()
    return {split: m for split, m in manifests.items() if m is not None}


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--seq-len", type=positive_int, default=512, help="tokens the model sees per sequence"
    )
    parser.add_argument(
        "--shard-bytes",
        type=positive_int,
        default=256 * 2**20,
        help="target shard size in bytes (shards end at document boundaries)",
    )
    parser.add_argument(
        "--sequences-per-sample",
        type=positive_int,
        default=128,
        help="sequences per tar member (large blocks keep the tar overhead small)",
    )
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="splits to shard")
    parser.add_argument("--threads", type=positive_int, default=1, help="sentencepiece threads per process")


def main(argv: list[str] | None = None) -> None:
    parser = step_parser("data_prep.shard", __doc__)
    parser.add_argument("--data", required=True, help="dataset directory (holds clean/ and tokenizer.model)")
    add_arguments(parser)
    parser.add_argument("--force", action="store_true", help="rewrite every shard")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    run(*launch(parser, argv))


if __name__ == "__main__":
    sys.exit(run_command(main))
