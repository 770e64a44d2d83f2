"""Step 3: tokenize the cleaned documents and pack them into WebDataset shards.

For each split, the split's documents (sorted by id) are cut into shards at
document boundaries, about ``--shard-bytes`` of tokens each (estimated from the
text size). A shard's token stream is its documents' tokens, each followed by
``<eod>``; it is packed into sequences of ``seq_len + 1`` tokens that overlap by
one, so that each sequence trains ``seq_len`` next-token targets and every token
but the stream's first is a target exactly once; the last sequence is padded.
Blocks of ``--sequences-per-sample`` sequences are stored as raw uint16 tar
members (format: ``data_prep.manifest``).

The shard plan depends only on the documents and the settings, not on the
number of processes: ``mpirun -np N python -m data_prep.shard ...`` gives the
same bytes for every N. Ranks take disjoint shards, balanced by size; each shard
is written under a temporary name and renamed when complete; rank 0 writes
``manifest.json`` last, once every shard is in place. A rerun skips shards whose
sha256 matches the manifest (or the record a killed run left of a finished
shard) and redoes partial or missing ones; ``--force`` redoes all.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data_prep.clean import read_splits
from data_prep.common import Comm, balance, get_comm
from data_prep.manifest import (
    DTYPE,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SAMPLE_EXT,
    encode_block,
    shard_name,
)
from gpt1_ds.env import setup_logging
from gpt1_ds.files import atomic_write_text, atomic_writer, sha256_file
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


def pack(stream: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """A token stream → [n, seq_len + 1] windows with stride seq_len; the tail padded."""
    n = max(1, -(-(len(stream) - 1) // seq_len))  # ceil((len - 1) / seq_len)
    padded = np.full(n * seq_len + 1, pad_id, dtype=np.uint16)
    padded[: len(stream)] = stream
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return padded[index]


def build_shard(
    plan: ShardPlan, docs_dir: Path, out_dir: Path, tok: Tokenizer, args: argparse.Namespace, bar: tqdm
) -> dict:
    """Tokenize, pack and write one shard (temporary name, renamed when complete)."""
    parts = []
    lines: list[str] = []
    loaded = None
    for piece in plan.pieces:
        if loaded != piece.doc:
            lines = (docs_dir / f"{piece.doc}.txt").read_text(encoding="utf-8").split("\n")
            loaded = piece.doc
        text = "\n".join(lines[piece.start : piece.end])
        if piece.start > 0:  # the document goes on from the previous shard, after a newline
            parts.append(np.array([tok.newline_id], dtype=np.uint32))
        (ids,) = tok.encode_batch([text], num_threads=args.threads)
        parts.append(ids)
        if piece.last:
            parts.append(np.array([tok.eod_id], dtype=np.uint32))
        bar.update(len(text.encode("utf-8")) + 1)
    stream = np.concatenate(parts)
    if stream.max(initial=0) >= 2**16:
        raise ValueError(f"token id {int(stream.max())} does not fit {DTYPE}")
    sequences = pack(stream.astype(np.uint16), args.seq_len, tok.pad_id)
    k = args.sequences_per_sample
    samples = 0
    final = out_dir / plan.name
    with atomic_writer(final) as f, wds.TarWriter(f, mtime=TAR_MTIME, user="gpt1-ds", group="gpt1-ds") as w:
        for start in range(0, len(sequences), k):
            w.write(
                {
                    "__key__": f"{plan.index:06d}-{start // k:06d}",
                    SAMPLE_EXT: encode_block(sequences[start : start + k]),
                }
            )
            samples += 1
    entry = {
        "name": plan.name,
        "samples": samples,
        "sequences": len(sequences),
        "tokens": len(stream),
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "documents": sum(p.last for p in plan.pieces),
        "plan": plan.key,
    }
    atomic_write_text(out_dir / PROGRESS_DIR / f"{plan.name}.json", json.dumps(entry))
    return entry


def finished_entry(plan: ShardPlan, out_dir: Path, previous: dict[str, dict]) -> dict | None:
    """The record of a shard already on disk and whole for this plan, else None."""
    path = out_dir / plan.name
    if not path.is_file():
        return None
    candidates = [previous.get(plan.name)]
    record = out_dir / PROGRESS_DIR / f"{plan.name}.json"
    if record.is_file():
        with contextlib.suppress(json.JSONDecodeError):  # a record cut short: redo the shard
            candidates.append(json.loads(record.read_text()))
    candidates = [
        c for c in candidates if c and c.get("plan") == plan.key and c["bytes"] == path.stat().st_size
    ]
    if not candidates:
        return None
    digest = sha256_file(path)
    return next((c for c in candidates if c["sha256"] == digest), None)


def shard_split(
    split: str, data_dir: Path, tok: Tokenizer, splits: dict, args: argparse.Namespace, comm: Comm
) -> dict | None:
    """Write one split's shards and (rank 0) its manifest."""
    out_dir = data_dir / split
    docs_dir = data_dir / "clean" / "docs"
    doc_ids = splits["splits"][split]
    if not doc_ids:
        if comm.is_root:
            log.warning("split %s has no documents: skipped", split)
        return None
    fingerprint = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.sha256,
            "seq_len": args.seq_len,
            "sequences_per_sample": args.sequences_per_sample,
            "clean": splits["settings"],
        },
        sort_keys=True,
    )
    # Rank 0 plans the shards and finds what is already done; while anything is redone,
    # the manifest is taken away so that the split never looks complete.
    sizes = [splits["docs"][d]["bytes"] for d in doc_ids]
    mine = balance(sizes, comm.size)[comm.rank]  # ranks measure the lines of disjoint documents
    measured = comm.gather({i: line_sizes(docs_dir / f"{doc_ids[i]}.txt") for i in mine})
    plans = todo = None
    done: dict[str, dict] = {}
    if comm.is_root:
        lines = {i: v for part in measured for i, v in part.items()}
        plans = plan_shards([(d, lines[i]) for i, d in enumerate(doc_ids)], args.shard_bytes, fingerprint)
        (out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        previous = {}
        manifest_path = out_dir / MANIFEST_NAME
        if manifest_path.is_file() and not args.force:
            try:
                previous = {s["name"]: s for s in json.loads(manifest_path.read_text())["shards"]}
            except (json.JSONDecodeError, KeyError, TypeError):
                previous = {}
        for plan in plans:
            entry = None if args.force else finished_entry(plan, out_dir, previous)
            if entry is not None:
                done[plan.name] = entry
        todo = [p.index for p in plans if p.name not in done]
        if todo:
            manifest_path.unlink(missing_ok=True)
        if comm.size > len(todo) > 0:
            log.info(
                "%s: %d shards to write for %d ranks: some ranks idle (lower --shard-bytes)",
                split,
                len(todo),
                comm.size,
            )
    plans, todo = comm.bcast((plans, todo))
    work = [plans[i] for i in todo]
    mine = [work[i] for i in balance([p.text_bytes for p in work], comm.size)[comm.rank]]

    bar = tqdm(
        total=sum(p.text_bytes for p in mine),
        unit="B",
        unit_scale=True,
        desc=f"shard {split}",
        disable=not comm.is_root or args.quiet,
    )
    entries = [build_shard(p, docs_dir, out_dir, tok, args, bar) for p in mine]
    bar.close()
    gathered = comm.gather(entries)
    if not comm.is_root:
        return None

    for part in gathered:
        done.update((e["name"], e) for e in part)
    shards = [done[p.name] for p in plans]
    names = {p.name for p in plans}
    for stale in out_dir.glob("shard-*.tar"):  # from an earlier plan with more shards
        if stale.name not in names:
            stale.unlink()
    for tmp in out_dir.glob(".shard-*.tmp*"):  # left by a killed run
        tmp.unlink()
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
        "documents": len(doc_ids),
        "text_bytes": sum(p.text_bytes for p in plans),
        "total_tokens": sum(s["tokens"] for s in shards),
        "total_sequences": sum(s["sequences"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1))
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
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


def run(args: argparse.Namespace, comm: Comm) -> dict[str, dict]:
    data_dir = Path(args.data)
    splits = read_splits(data_dir)
    tok = load_tokenizer(data_dir / MODEL_NAME)
    if tok.vocab_size > 2**16:
        raise ValueError(f"{tok.path}: vocab of {tok.vocab_size} does not fit {DTYPE} shards")
    manifests = {}
    for split in args.splits:
        manifest = shard_split(split, data_dir, tok, splits, args, comm)
        if manifest is not None:
            manifests[split] = manifest
    comm.barrier()
    return manifests


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=512, help="tokens the model sees per sequence")
    parser.add_argument(
        "--shard-bytes",
        type=int,
        default=256 * 2**20,
        help="target shard size in bytes (shards end at document boundaries)",
    )
    parser.add_argument(
        "--sequences-per-sample",
        type=int,
        default=128,
        help="sequences per tar member (large blocks keep the tar overhead small)",
    )
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--threads", type=int, default=1, help="sentencepiece threads per process")
    parser.add_argument("--force", action="store_true", help="rewrite every shard")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.shard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="dataset directory (holds clean/ and tokenizer.model)")
    add_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    comm = get_comm()
    setup_logging(comm.rank, comm.size)
    run(args, comm)


if __name__ == "__main__":
    main()
