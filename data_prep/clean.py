"""Step 1: raw books → cleaned documents, split train/val/test by document.

Inputs are files, directories (searched recursively for ``*.txt`` and
``*.txt.gz|bz2|xz``) and globs. Each book file is one document; with
``--format bookscorpus`` a file holds many books, one sentence per line, books
separated by a line matching ``--doc-separator`` (default: an empty line).

Cleaning, in order: decompress; refuse binary files; drop a UTF-8 BOM; decode
UTF-8, falling back line by line to cp1252 (then latin-1) where bytes are not
UTF-8; CRLF and CR → LF; drop NUL and other control characters; keep what lies
between the Project Gutenberg ``*** START OF`` and ``*** END OF`` marker lines
when present, and drop a leading "Produced by" paragraph; unwrap hard-wrapped
lines into paragraphs (one paragraph per line in the output, runs of spaces and
tabs collapsed); ``ftfy.fix_text`` on every paragraph; optional lower-casing
(GPT-1 lower-cased its text; off by default).

Output, under ``OUT/clean/``:
  ``docs/<doc_id>.txt``  one cleaned document each (UTF-8)
  ``splits.json``        the split of every document (hash of its id: deterministic)
  ``report.json``        documents, bytes in/out, repairs and skipped files with reasons

Bad input never stops the run: unreadable, binary, empty or undecodable files
are skipped and listed in the report. Under ``mpirun`` the ranks take disjoint
input files, balanced by bytes; rank 0 writes the split and the report.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import lzma
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

from data_prep.common import Comm, balance, fraction, launch, progress, remove_stale, run_command, step_parser
from gpt1_ds.files import atomic_write_text
from gpt1_ds.manifest import SPLITS_NAME
from gpt1_ds.text import clean_text, iter_documents

log = logging.getLogger("data_prep.clean")

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SETTINGS = ("format", "lowercase", "val_fraction", "test_fraction", "split_seed")
"""The flags recorded in ``splits.json`` and ``report.json``."""
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.bz2", ".txt.xz")


@dataclass
class DocResult:
    """What cleaning one document did."""

    doc_id: str
    source: str
    bytes_in: int
    bytes_out: int = 0
    repairs: list[str] = field(default_factory=list)
    skipped: str | None = None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (recursive) and globs → a sorted, de-duplicated list of files."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.name.endswith(TEXT_SUFFIXES) and not p.is_dir())
        elif path.exists() or path.is_symlink():
            found.add(path)
        else:
            matches = glob.glob(item, recursive=True)
            if not matches:
                raise FileNotFoundError(f"input {item!r} matches no file or directory")
            found.update(expand_inputs(matches))
    return sorted(found)


def doc_ids_for(files: list[Path]) -> list[str]:
    """One id per file: its name without the text/compression suffixes, made
    filename-safe; a clash gets a short hash of the path."""
    suffixes = (".gz", ".bz2", ".xz", ".txt")  # removed in this order
    stems = [
        re.sub(r"[^A-Za-z0-9._-]", "_", reduce(str.removesuffix, suffixes, f.name)) or "doc" for f in files
    ]
    counts = Counter(stems)
    return [
        s if counts[s] == 1 else f"{s}-{hashlib.sha1(str(f).encode()).hexdigest()[:8]}"
        for s, f in zip(stems, files, strict=True)
    ]


def clean_file(
    path: Path,
    doc_id: str,
    docs_dir: Path,
    args: argparse.Namespace,
    advance: Callable[[int], None] = lambda _n: None,
) -> list[DocResult]:
    """Clean one input file into one or more documents; never raises on bad input.
    ``advance(characters)`` as its text is fixed."""
    separator = re.compile(args.doc_separator)
    results = []
    try:
        for did, text, n_in, repairs in iter_documents(path, doc_id, args.format, separator):
            books = args.format == "books"
            cleaned = clean_text(text, repairs, args.lowercase, gutenberg=books, advance=advance)
            if cleaned:
                atomic_write_text(docs_dir / f"{did}.txt", cleaned)
            skipped = None if cleaned else "empty after cleaning"
            results.append(DocResult(did, str(path), n_in, len(cleaned.encode("utf-8")), repairs, skipped))
    except (OSError, EOFError, ValueError, lzma.LZMAError) as e:
        # unreadable, corrupt archive, binary: the file is skipped, the run goes on
        reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        size = path.stat().st_size if path.is_file() else 0
        results.append(DocResult(doc_id, str(path), size, skipped=reason))
    return results


def required_splits(val_fraction: float, test_fraction: float) -> list[str]:
    """The splits that must get a document: train, and val and test unless their fraction is 0."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    return ["train"] + [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]


def assign_splits(doc_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Split by a hash of each document id; each requested split gets at least one document."""
    required = required_splits(val_fraction, test_fraction)
    position = {
        d: int.from_bytes(hashlib.sha256(f"{seed}:{d}".encode()).digest()[:8], "big") / 2**64 for d in doc_ids
    }
    bounds = (0, test_fraction, test_fraction + val_fraction, 1.0)
    ranges = {s: bounds[i : i + 2] for i, s in enumerate(("test", "val", "train"))}
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for d in sorted(doc_ids):
        p = position[d]
        splits["test" if p < bounds[1] else "val" if p < bounds[2] else "train"].append(d)
    if len(doc_ids) < len(required):
        raise ValueError(f"{len(doc_ids)} documents cannot fill {', '.join(required)} with one each")
    for split in required:
        if not splits[split]:  # take the nearest document from the largest split that can spare one
            donor = max((s for s in SPLITS if len(splits[s]) >= 2), key=lambda s: (len(splits[s]), s))
            middle = sum(ranges[split]) / 2
            moved = min(splits[donor], key=lambda d: (abs(position[d] - middle), d))
            splits[donor].remove(moved)
            splits[split].append(moved)
    return {s: sorted(v) for s, v in splits.items()}


def run(args: argparse.Namespace, comm: Comm) -> dict | None:
    """Clean the inputs, ranks taking disjoint files; rank 0 then writes the outputs and gets the report."""
    out = Path(args.out) / "clean"
    files = expand_inputs(args.input)
    if not files:
        raise FileNotFoundError(f"no input files under {args.input}")
    required = required_splits(args.val_fraction, args.test_fraction)
    if args.format == "books" and len(files) < len(required):  # one document per file: known before cleaning
        raise ValueError(
            f"{len(files)} input file(s) cannot fill {', '.join(required)} with one document each: "
            "give more books, or turn a split off with --val-fraction 0 / --test-fraction 0"
        )
    ids = doc_ids_for(files)
    sizes = [f.stat().st_size if f.is_file() else 0 for f in files]
    mine = balance(sizes, comm.size)[comm.rank]
    if comm.is_root:
        (out / "docs").mkdir(parents=True, exist_ok=True)
    comm.barrier()
    results: list[DocResult] = []
    bar = progress(sum(sizes[i] for i in mine), "clean", comm, args.quiet)
    for i in mine:
        left = sizes[i]  # the bar in bytes of input, moved by characters fixed, never past the file

        def advance(n: int) -> None:
            nonlocal left
            bar.update(min(n, left))
            left -= min(n, left)

        results.extend(clean_file(files[i], ids[i], out / "docs", args, advance))
        bar.update(left)
    bar.close()
    for r in results:
        if r.skipped:
            log.warning("skipped %s: %s", r.source, r.skipped)
    gathered = comm.gather(results)
    if not comm.is_root:
        return None
    every = sorted((r for part in gathered for r in part), key=lambda r: r.doc_id)
    return write_outputs(out, len(files), every, args)


def write_outputs(out: Path, n_files: int, every: list[DocResult], args: argparse.Namespace) -> dict:
    """Rank 0: split the kept documents, drop stale ones, write ``splits.json`` and ``report.json``."""
    kept = [r for r in every if not r.skipped]
    if not kept:
        reasons = Counter(r.skipped for r in every)
        raise ValueError(
            f"no documents: every one of the {n_files} input file(s) was skipped "
            f"({', '.join(f'{n} {why}' for why, n in reasons.most_common())}): give text files"
        )
    splits = assign_splits([r.doc_id for r in kept], args.val_fraction, args.test_fraction, args.split_seed)
    remove_stale(out / "docs", "*.txt", {f"{r.doc_id}.txt" for r in kept})  # from a run with other inputs
    settings = {k: getattr(args, k) for k in SETTINGS}
    docs = {r.doc_id: {"source": r.source, "bytes": r.bytes_out} for r in kept}
    index = {"format_version": FORMAT_VERSION, "settings": settings, "splits": splits, "docs": docs}
    atomic_write_text(out / SPLITS_NAME, json.dumps(index, indent=1))
    repairs = Counter(rep for r in kept for rep in set(r.repairs))
    report = {
        "files": n_files,
        "documents": len(kept),
        "bytes_in": sum(r.bytes_in for r in every),
        "bytes_out": sum(r.bytes_out for r in kept),
        "repaired": dict(sorted(repairs.items())),
        "skipped": [{"file": r.source, "reason": r.skipped} for r in every if r.skipped],
        "splits": {s: len(v) for s, v in splits.items()},
        "settings": settings,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    log.info(
        "clean: %d files → %d documents (%s), %.1f MB in → %.1f MB out, repaired %s, skipped %d",
        n_files,
        len(kept),
        ", ".join(f"{s} {n}" for s, n in report["splits"].items()),
        report["bytes_in"] / 1e6,
        report["bytes_out"] / 1e6,
        report["repaired"] or "none",
        len(report["skipped"]),
    )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="files, directories, globs")
    parser.add_argument("--out", required=True, help="dataset directory; writes OUT/clean/")
    parser.add_argument(
        "--format",
        choices=["books", "bookscorpus"],
        default="books",
        help="books: one document per file; bookscorpus: one sentence per line, "
        "books separated by --doc-separator lines",
    )
    parser.add_argument(
        "--doc-separator",
        default=r"\s*",
        help="regex a whole line matches between books (bookscorpus format)",
    )
    parser.add_argument("--lowercase", action="store_true", help="lower-case the text (GPT-1 did)")
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.01,
        help="share of the documents in the val split (0: none)",
    )
    parser.add_argument(
        "--test-fraction",
        type=fraction,
        default=0.01,
        help="share of the documents in the test split (0: none)",
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="seed of the hash that assigns each document its split"
    )


def main(argv: list[str] | None = None) -> None:
    parser = step_parser("data_prep.clean", __doc__, add_arguments)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    run(*launch(parser, argv))


if __name__ == "__main__":
    sys.exit(run_command(main))
