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
import bz2
import glob
import gzip
import hashlib
import json
import logging
import lzma
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ftfy
from tqdm import tqdm

from data_prep.common import Comm, balance, get_comm
from gpt1_ds.env import setup_logging
from gpt1_ds.files import atomic_write_text

log = logging.getLogger("data_prep.clean")

FORMAT_VERSION = 1
SPLITS_NAME = "splits.json"
"""``DATASET/clean/splits.json``: the settings, each split's document ids, each document's size."""
SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.bz2", ".txt.xz")
_OPENERS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}

_FTFY = ftfy.TextFixerConfig(explain=False)
# ftfy's uncurl_quotes mapping; a paragraph that is ASCII once uncurled (and holds no
# HTML entity) is left unchanged by every other ftfy fix, so it skips the slow path.
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls but \t and \n (\r is gone by then)
_C1 = re.compile(r"[\x80-\x9f]")
_BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_SPACES = re.compile(r"[ \t\n]+")
_PG_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_TRAILER = re.compile(r"end of (?:the )?project gutenberg", re.I)
_TEXT_BYTES = bytes(sorted({*range(0x20, 0x7F), 0x09, 0x0A, 0x0C, 0x0D, *range(0x80, 0x100)}))


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
            matches = [Path(m) for m in glob.glob(item, recursive=True)]
            if not matches:
                raise FileNotFoundError(f"input {item!r} matches no file or directory")
            for m in matches:
                found.update(expand_inputs([str(m)]) if m.is_dir() else [m])
    return sorted(found)


def doc_ids_for(files: list[Path]) -> list[str]:
    """One id per file: its name without the text/compression suffixes, made
    filename-safe; a clash gets a short hash of the path."""
    stems = []
    for f in files:
        name = f.name
        for suffix in (".gz", ".bz2", ".xz", ".txt"):
            name = name.removesuffix(suffix)
        stems.append(re.sub(r"[^A-Za-z0-9._-]", "_", name) or "doc")
    counts = Counter(stems)
    return [
        s if counts[s] == 1 else f"{s}-{hashlib.sha1(str(f).encode()).hexdigest()[:8]}"
        for s, f in zip(stems, files, strict=True)
    ]


def read_raw(path: Path) -> bytes:
    """The file's bytes, decompressed by suffix."""
    data = path.read_bytes()
    opener = _OPENERS.get(path.suffix)
    return opener(data) if opener else data


def looks_binary(raw: bytes) -> bool:
    """Many NUL or control bytes that text never holds in the first 64 KiB: more than 5%
    (random bytes have about 11%), or 30% of a file shorter than 256 bytes."""
    head = raw[:65536]
    bad = len(head.translate(None, _TEXT_BYTES))  # what is left once text bytes are deleted
    return bad > (0.05 if len(head) >= 256 else 0.30) * len(head)


def decode(raw: bytes, repairs: list[str]) -> str:
    """UTF-8 (BOM dropped); lines that are not UTF-8 fall back to cp1252, then latin-1."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        repairs.append("bom")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    repairs.append("encoding_fallback")
    lines = []
    for line in raw.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            try:
                lines.append(line.decode("cp1252"))
            except UnicodeDecodeError:
                lines.append(line.decode("latin-1"))
    return "\n".join(lines)


def strip_gutenberg(text: str, repairs: list[str]) -> str:
    """Keep what lies between the START and END marker lines, when they are there."""
    start, end = _PG_START.search(text), _PG_END.search(text)
    if start and end and end.start() < start.end():
        end = _PG_END.search(text, start.end())
    if start or end:
        repairs.append("gutenberg")
    return text[start.end() if start else 0 : end.start() if end else len(text)]


def fix_paragraph(paragraph: str) -> str:
    """``ftfy.fix_text`` with its default settings, skipping the work where it can change nothing."""
    if paragraph.isascii():
        return paragraph if "&" not in paragraph else ftfy.fix_text(paragraph, _FTFY)
    uncurled = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", paragraph))
    if uncurled.isascii() and "&" not in uncurled:
        return uncurled
    return _C1.sub("", ftfy.fix_text(paragraph, _FTFY))


def clean_text(text: str, repairs: list[str], lowercase: bool = False, gutenberg: bool = True) -> str:
    """Decoded text → cleaned document: one paragraph per line."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        repairs.append("crlf")
    if "\x00" in text:
        repairs.append("nul")
    text, n = _CONTROL.subn("", text)
    if n:
        repairs.append("control")
    if gutenberg:
        text = strip_gutenberg(text, repairs)
    paragraphs = []
    for block in _BLANK_LINES.split(text):
        para = _SPACES.sub(" ", block).strip()
        if para:
            paragraphs.append(para)
    if paragraphs and "gutenberg" in repairs:
        if paragraphs[0].startswith("Produced by"):
            paragraphs.pop(0)
        if paragraphs and _PG_TRAILER.match(paragraphs[-1]):
            paragraphs.pop()
    out = []
    for para in paragraphs:
        para = fix_paragraph(para).strip()
        if para:
            out.append(para.lower() if lowercase else para)
    return "\n".join(out)


def iter_documents(
    path: Path, doc_id: str, fmt: str, separator: re.Pattern[str]
) -> Iterator[tuple[str, str, int, list[str]]]:
    """(doc_id, decoded text, bytes in, repairs) for each document of one input file."""
    raw = read_raw(path)
    if looks_binary(raw):
        raise ValueError("binary file")
    repairs: list[str] = []
    text = decode(raw, repairs)
    if fmt == "books":
        yield doc_id, text, len(raw), repairs
        return
    # bookscorpus: sentences one a line, books separated by separator lines
    book: list[str] = []
    index = 0
    for line in [*text.splitlines(), None]:
        if line is None or separator.fullmatch(line):
            if book:
                body = "\n\n".join(book)  # each sentence line its own paragraph
                yield f"{doc_id}-{index:06d}", body, len(body.encode()), list(repairs)
                index += 1
                book = []
        else:
            book.append(line)


def clean_file(path: Path, doc_id: str, docs_dir: Path, args: argparse.Namespace) -> list[DocResult]:
    """Clean one input file into one or more documents; never raises on bad input."""
    separator = re.compile(args.doc_separator)
    results = []
    try:
        for did, text, n_in, repairs in iter_documents(path, doc_id, args.format, separator):
            result = DocResult(did, str(path), n_in, repairs=repairs)
            cleaned = clean_text(text, repairs, args.lowercase, gutenberg=args.format == "books")
            if not cleaned:
                result.skipped = "empty after cleaning"
            else:
                data = cleaned.encode("utf-8")
                atomic_write_text(docs_dir / f"{did}.txt", cleaned)
                result.bytes_out = len(data)
            results.append(result)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as e:
        # unreadable, corrupt archive, binary: the file is skipped, the run goes on
        reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        size = path.stat().st_size if path.is_file() else 0
        results.append(DocResult(doc_id, str(path), size, skipped=reason))
    return results


def assign_splits(doc_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Split by a hash of each document id; each requested split gets at least one document."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    position = {
        d: int.from_bytes(hashlib.sha256(f"{seed}:{d}".encode()).digest()[:8], "big") / 2**64 for d in doc_ids
    }
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for d in sorted(doc_ids):
        p = position[d]
        split = "test" if p < test_fraction else "val" if p < test_fraction + val_fraction else "train"
        splits[split].append(d)
    ranges = {
        "test": (0, test_fraction),
        "val": (test_fraction, test_fraction + val_fraction),
        "train": (test_fraction + val_fraction, 1.0),
    }
    required = ["train"] + [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]
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
    out = Path(args.out) / "clean"
    docs_dir = out / "docs"
    files = expand_inputs(args.input)
    if not files:
        raise FileNotFoundError(f"no input files under {args.input}")
    ids = doc_ids_for(files)
    sizes = [f.stat().st_size if f.is_file() else 0 for f in files]
    mine = balance(sizes, comm.size)[comm.rank]
    if comm.is_root:
        docs_dir.mkdir(parents=True, exist_ok=True)
    comm.barrier()

    results: list[DocResult] = []
    bar = tqdm(
        total=sum(sizes[i] for i in mine),
        unit="B",
        unit_scale=True,
        desc="clean",
        disable=not comm.is_root or args.quiet,
    )
    for i in mine:
        results.extend(clean_file(files[i], ids[i], docs_dir, args))
        bar.update(sizes[i])
    bar.close()
    for r in results:
        if r.skipped:
            log.warning("skipped %s: %s", r.source, r.skipped)

    gathered = comm.gather([asdict(r) for r in results])
    if not comm.is_root:
        return None
    every = sorted((DocResult(**r) for part in gathered for r in part), key=lambda r: r.doc_id)
    kept = [r for r in every if not r.skipped]
    splits = assign_splits([r.doc_id for r in kept], args.val_fraction, args.test_fraction, args.split_seed)
    listed = {f"{r.doc_id}.txt" for r in kept}
    for stale in docs_dir.glob("*.txt"):  # from an earlier run with other inputs
        if stale.name not in listed:
            stale.unlink()
    settings = {
        "format": args.format,
        "lowercase": args.lowercase,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "split_seed": args.split_seed,
    }
    atomic_write_text(
        out / SPLITS_NAME,
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "settings": settings,
                "splits": splits,
                "docs": {r.doc_id: {"source": r.source, "bytes": r.bytes_out} for r in kept},
            },
            indent=1,
        ),
    )
    repairs = Counter(rep for r in kept for rep in set(r.repairs))
    report = {
        "files": len(files),
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
        len(files),
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
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--test-fraction", type=float, default=0.01)
    parser.add_argument("--split-seed", type=int, default=0)


def read_splits(dataset_dir: str | Path) -> dict:
    """``clean/splits.json`` of a dataset directory."""
    path = Path(dataset_dir) / "clean" / SPLITS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run data_prep.clean first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.clean",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    comm = get_comm()
    setup_logging(comm.rank, comm.size)
    run(args, comm)


if __name__ == "__main__":
    main()
