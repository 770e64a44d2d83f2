"""GPT-1's own tokenizer: OpenAI's BPE over ftfy, text standardisation and spaCy words.

    python -m gpt1_ds.openai_bpe learn --input FILE [FILE ...] --merges N --out DIR
    python -m gpt1_ds.openai_bpe compare DIR FILE [FILE ...]

``OpenAIBPETokenizer`` reads the ``openai-gpt`` files (``vocab.json``: piece → id, word-final
pieces ending in ``</w>``; ``merges.txt``: a ``#version`` line, then one ``a b`` merge a line, in
rank order) and encodes as the original ``text_utils.TextEncoder`` did: ``ftfy.fix_text`` →
``text_standardize`` → spaCy's English tokenizer → each word lower-cased → BPE with ``</w>`` on the
word's last symbol → ids. The three fine-tuning tokens ``_start_``, ``_delimiter_`` and
``_classify_`` are appended after the vocabulary (ids ``base_size`` … ``base_size + 2``), as the
original fine-tuning code appends them, so ``vocab_size = base_size + 3``.

Choices where the original has no special token:

- unknown pieces map to ``<unk>`` when the vocabulary has it (a vocabulary that reserves it means
  it, and transformers' tokenizer uses it), else to id 0 as the original's ``encoder.get(t, 0)``
  does; ``unk_id`` is that id, and ``pad_id`` is it too (padding is masked everywhere);
- a newline is one word: spaCy yields the whitespace token ``"\\n "`` for the `` \\n `` that
  standardisation leaves, and the original turns its BPE into ``"\\n</w>"``; ``newline_id`` is
  that piece's id where the vocabulary has it, else the unknown id (as the original looks it up);
- GPT-1 has no end-of-document token: ``eod_id`` is the newline id, and ``end_id`` (what ends a
  generated text) is None.

Words are split by the installed spaCy (3.x); the released model was encoded with a 2018 spaCy
whose English rules differ on a few rare strings, so ids can differ there.

``learn_bpe`` learns a vocabulary of this layout (Sennrich's BPE on the same words) and
``write_openai_files`` writes it; ``compare`` cross-checks the encoding against
``transformers.OpenAIGPTTokenizer`` (whose words come from BERT's pre-tokenizer, not spaCy).
"""

from __future__ import annotations

import argparse
import bz2
import difflib
import gzip
import hashlib
import heapq
import json
import logging
import lzma
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from gpt1_ds.files import atomic_write_text

log = logging.getLogger("gpt1_ds.openai_bpe")

VOCAB_NAME = "vocab.json"
MERGES_NAME = "merges.txt"
MERGES_HEADER = "#version: 0.2"
END_OF_WORD = "</w>"
UNK = "<unk>"
NEWLINE_PIECE = "\n" + END_OF_WORD
TASK_TOKENS = ("_start_", "_delimiter_", "_classify_")
"""Appended after the vocabulary at fine-tuning, in this order: ``start_id``, ``delim_id``, ``extract_id``."""
INSTALL_HINT = "pip install 'gpt1-ds[gpt1]'"

# The original's pattern is a plain (not raw) string, in which its ``\\+`` reads as ``\+``: a second
# ``+``, not runs of backslashes. Its effect is kept: backslashes are not spaced (transformers' old
# copy, a raw string, spaces them).
_PUNCT_RUNS = re.compile(r"""(-+|~+|!+|"+|;+|\?+|\++|,+|\)+|\(+|\+|\/+|\*+|\[+|\]+|}+|{+|\|+|_+)""")
_NEWLINES = re.compile(r"\s*\n\s*")
_SPACES = re.compile(r"[^\S\n]+")


def text_standardize(text: str) -> str:
    """The original's clean-up before spaCy: dashes and ellipses to ASCII, spaces around runs of
    ``- ~ ! " ; ? + , ) ( / * [ ] } { | _``, each newline (with the space around it) to
    `` \\n ``, other runs of whitespace to one space, stripped."""
    text = text.replace("—", "-").replace("–", "-").replace("―", "-")
    text = text.replace("…", "...").replace("´", "'")
    text = _PUNCT_RUNS.sub(r" \1 ", text)
    text = _NEWLINES.sub(" \n ", text)
    text = _SPACES.sub(" ", text)
    return text.strip()


@cache
def _pipeline() -> tuple[Any, Any]:
    """``ftfy.fix_text`` and spaCy's blank English tokenizer (no model download)."""
    try:
        import ftfy
        import spacy
    except ImportError as e:
        raise ImportError(f"GPT-1's BPE tokenizer needs spaCy and ftfy ({e}): {INSTALL_HINT}") from None
    return ftfy.fix_text, spacy.blank("en").tokenizer


def pre_tokenize(text: str) -> list[str]:
    """The words BPE sees: ftfy, ``text_standardize``, spaCy, each word lower-cased. A newline is
    the word ``"\\n "`` (spaCy's whitespace token)."""
    fix_text, tokenizer = _pipeline()
    return [t.text.lower() for t in tokenizer(text_standardize(fix_text(text)))]


def _symbols(word: str) -> tuple[str, ...]:
    """A word as BPE starts from it: its characters, ``</w>`` on the last (a newline word: one symbol)."""
    if word.strip(" ") == "\n":
        return (NEWLINE_PIECE,)
    return (*word[:-1], word[-1] + END_OF_WORD)


def _merge(word: tuple[str, ...], first: str, second: str) -> tuple[str, ...]:
    """``word`` with each ``first second`` (left to right, not overlapping) joined."""
    out: list[str] = []
    i, n = 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == first and word[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def bpe(token: str, ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """The original ``TextEncoder.bpe``: merge the adjacent pair of lowest rank until none is
    ranked. Its one special case is kept: a newline word whose pieces are ``"\\n"`` and ``" </w>"``
    becomes ``"\\n</w>"``."""
    word = (*token[:-1], token[-1] + END_OF_WORD)
    while len(word) > 1:
        pairs = set(pairwise(word))
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        word = _merge(word, *best)
    joined = " ".join(word)  # the original joins the pieces with spaces and splits them again
    return (NEWLINE_PIECE,) if joined == "\n  " + END_OF_WORD else tuple(joined.split(" "))


def is_openai_dir(folder: str | Path) -> bool:
    """Whether ``folder`` holds the ``openai-gpt`` tokenizer files (``vocab.json`` and ``merges.txt``)."""
    folder = Path(folder)
    return (folder / VOCAB_NAME).is_file() and (folder / MERGES_NAME).is_file()


def read_vocab(path: Path) -> dict[str, int]:
    """``vocab.json``: piece → id, every id from 0 to the highest one used (a piece may share an
    id with another, as an added ``<unk>`` can)."""
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{path}: not a JSON object of piece → id")
    bad = next((k for k, v in vocab.items() if type(v) is not int), None)
    if bad is not None:
        raise ValueError(f"{path}: the id of {bad!r} is not an integer")
    used = set(vocab.values())
    top = max(used)
    if min(used) < 0 or len(used) != top + 1:
        hole = min(set(range(top + 1)) - used) if min(used) >= 0 else min(used)
        raise ValueError(f"{path}: the ids are not 0 … {top} without gaps (id {hole})")
    return vocab


def read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """``merges.txt``: a ``#version`` first line (skipped; a first line without ``#`` is a merge),
    then ``a b`` pairs in rank order; empty lines at the end are ignored. Each merge's result must
    be a piece of ``vocab``."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if number == 1 and line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: a merge is two symbols separated by a space, got {line!r}")
        if parts[0] + parts[1] not in vocab:
            raise ValueError(
                f"{path}:{number}: the merge {line!r} makes {parts[0] + parts[1]!r}, not in {VOCAB_NAME}"
            )
        merges.append((parts[0], parts[1]))
    return merges


class OpenAIBPETokenizer:
    """GPT-1's tokenizer from an ``openai-gpt`` folder (``vocab.json``, ``merges.txt``).

    ``base_size`` is the vocabulary's size, its highest id + 1 (the rows of a released model's token
    table); ``appended`` the ids of the three task tokens after it; ``vocab_size = base_size + 3``.
    Text is lower-cased and re-spaced on the way in, so ``decode`` gives the words separated by
    spaces, not the original text."""

    kind = "openai-bpe"

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        missing = [name for name in (VOCAB_NAME, MERGES_NAME) if not (self.path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.path}: no {' and no '.join(missing)} (an openai-gpt tokenizer folder)"
            )
        vocab_file, merges_file = self.path / VOCAB_NAME, self.path / MERGES_NAME
        self.encoder = read_vocab(vocab_file)
        self.merges = read_merges(merges_file, self.encoder)
        _pipeline()  # spaCy and ftfy are there, before any text
        # Ranks as the original builds them (dict(zip(merges, range))): a repeated merge keeps its last rank.
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.sha256 = hashlib.sha256(vocab_file.read_bytes() + merges_file.read_bytes()).hexdigest()
        self.base_size = max(self.encoder.values()) + 1
        self.vocab_size = self.base_size + len(TASK_TOKENS)
        self.appended = tuple(range(self.base_size, self.vocab_size))
        self.start_id, self.delim_id, self.extract_id = self.appended
        self.decoder: dict[int, str] = {}
        for piece, i in self.encoder.items():
            self.decoder.setdefault(i, piece)
        self.decoder.update(zip(self.appended, TASK_TOKENS, strict=True))
        self.unk_id = self.encoder.get(UNK, 0)
        self.pad_id = self.unk_id
        self.newline_id = self.encoder.get(NEWLINE_PIECE, self.unk_id)
        self.eod_id = self.newline_id
        self.end_id = None  # nothing ends a generated text but its length
        self._cache: dict[str, list[int]] = {}

    def normalize(self, text: str) -> str:
        """``text`` unchanged: ``encode`` applies the whole pipeline (ftfy, standardisation, lower case)."""
        return text

    def special_ids(self) -> dict[str, int]:
        names = ("pad", "unk", "eod", "start", "delim", "extract", "newline")
        ids = (self.pad_id, self.unk_id, self.eod_id, self.start_id, self.delim_id, self.extract_id)
        return dict(zip(names, (*ids, self.newline_id), strict=True))

    def pieces(self, text: str) -> list[str]:
        """The BPE pieces of ``text`` (before the id lookup; unknown ones included)."""
        return [p for word in pre_tokenize(text) for p in bpe(word, self.ranks)]

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = [self.encoder.get(p, self.unk_id) for p in bpe(word, self.ranks)]
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; pieces not in the vocabulary get ``unk_id``."""
        return [i for word in pre_tokenize(text) for i in self._word_ids(word)]

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Ids of each text as a uint32 array. spaCy's tokenizer runs in this thread: ``num_threads``
        is accepted for the interface and unused."""
        return [np.asarray(self.encode(text), dtype=np.uint32) for text in texts]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """The pieces of ``ids`` joined, each ``</w>`` a space, trailing spaces stripped; the appended
        task ids are dropped. Case and the original spacing are not recoverable."""
        pieces = []
        for i in map(int, ids):
            if i in self.appended:
                continue
            piece = self.decoder.get(i)
            if piece is None:
                raise ValueError(f"id {i} is outside the vocabulary ({self.vocab_size} ids)")
            pieces.append(piece)
        return "".join(pieces).replace(END_OF_WORD, " ").rstrip(" ")


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each word (``pre_tokenize``) occurs in ``texts``; newline words count as ``"\\n"``."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update("\n" if w.strip(" ") == "\n" else w for w in pre_tokenize(text))
    return counts


def learn_bpe(
    texts: Iterable[str], num_merges: int, min_frequency: int = 2
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Sennrich's BPE on the words of ``texts`` (ftfy, standardisation, spaCy, lower case), ``</w>``
    on each word's last symbol: up to ``num_merges`` merges, each of the most frequent adjacent pair
    (ties: the smallest pair in string order), stopping early below ``min_frequency``.

    The vocabulary, in the original's order: the base symbols (every character, by frequency,
    then each with ``</w>``), the merges' results, then ``<unk>`` as Hugging Face's file has it."""
    counts = word_counts(texts)
    words = [list(_symbols(w)) for w in sorted(counts)]
    freqs = [counts[w] for w in sorted(counts)]
    chars: Counter[str] = Counter()
    for word, n in counts.items():
        for c in word:
            chars[c] += n
    stats: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (word, n) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            stats[pair] += n
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in stats.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        neg, pair = heapq.heappop(heap)
        if stats.get(pair) != -neg:
            continue  # stale: the count changed since this entry was pushed
        if -neg < min_frequency:
            break
        merges.append(pair)
        changed: dict[tuple[str, str], int] = defaultdict(int)
        for i in where.pop(pair):
            old, n = words[i], freqs[i]
            new = list(_merge(tuple(old), *pair))
            for p in pairwise(old):
                changed[p] -= n
            for p in pairwise(new):
                changed[p] += n
                where[p].add(i)
            words[i] = new
        del stats[pair]
        for p, delta in changed.items():
            if delta and p != pair:
                stats[p] += delta
                if stats[p] > 0:
                    heapq.heappush(heap, (-stats[p], p))
                else:
                    del stats[p]
    base = sorted(chars, key=lambda c: (-chars[c], c))
    pieces = [*base, *(c + END_OF_WORD for c in base), *(a + b for a, b in merges), UNK]
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    return vocab, merges


def write_openai_files(folder: str | Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (with the ``#version`` header) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / VOCAB_NAME, json.dumps(vocab, ensure_ascii=False))
    lines = [MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]
    atomic_write_text(folder / MERGES_NAME, "\n".join(lines) + "\n")


def read_text(path: str | Path) -> str:
    """A text file (``.gz``, ``.bz2`` and ``.xz`` decompressed), UTF-8 with bad bytes replaced."""
    path = Path(path)
    openers = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}
    data = path.read_bytes()
    opener = openers.get(path.suffix)
    return (opener(data) if opener else data).decode("utf-8", errors="replace")


# The kinds of text on which spaCy's words and BERT's pre-tokenizer (transformers' OpenAIGPTTokenizer)
# part ways, tried in this order on each differing stretch of words.
CAUSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("non-ascii", re.compile(r"[^\x00-\x7f]")),
    ("contraction/apostrophe", re.compile(r"['`]")),
    ("backslash", re.compile(r"\\")),  # not spaced by the original's standardisation
    ("dashes", re.compile(r"-")),
    ("repeated punctuation", re.compile(r"([^\w\s])\1")),
    ("digits", re.compile(r"\d")),
    ("abbreviation/period", re.compile(r"\.")),
    ("other punctuation", re.compile(r"[^\w\s]")),
)
WORD_SPLIT = "spaCy word split"
"""A stretch of letters split differently: spaCy's special cases (``cannot`` → ``can not``)."""
BPE_CAUSE = "bpe"
"""Same words, different ids: the two BPE implementations disagree (never seen: a bug)."""


@dataclass
class CauseStats:
    lines: int = 0
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    """(ours, theirs, line): our words, theirs, and the line, for the first few lines."""


@dataclass
class ParityReport:
    """``compare``'s figures: lines and tokens compared, lines whose ids differ, and why."""

    lines: int = 0
    tokens_ours: int = 0
    tokens_theirs: int = 0
    tokens_differing: int = 0
    lines_differing: int = 0
    causes: dict[str, CauseStats] = field(default_factory=dict)
    differing: list[tuple[str, int, tuple[str, ...]]] = field(default_factory=list)
    """(file, line number, causes) of each line whose ids differ."""


def classify(ours: list[str], theirs: list[str]) -> list[tuple[str, str, str]]:
    """(cause, our stretch, their stretch) of each stretch where two word lists differ."""
    out = []
    matcher = difflib.SequenceMatcher(None, ours, theirs, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        a, b = " ".join(ours[i1:i2]), " ".join(theirs[j1:j2])
        cause = next((name for name, pattern in CAUSES if pattern.search(a + " " + b)), WORD_SPLIT)
        out.append((cause, a, b))
    return out


def compare(folder: str | Path, files: list[str | Path], examples: int = 3) -> ParityReport:
    """Encode each non-empty line of ``files`` with ``OpenAIBPETokenizer(folder)`` and with
    ``transformers.OpenAIGPTTokenizer`` built from the same vocabulary and merges, and say where
    and why they differ. Each differing line is classified by the stretches where the two word
    lists differ (``CAUSES``). transformers needs ``<unk>`` in the vocabulary for unknown pieces."""
    from transformers import OpenAIGPTTokenizer

    ours = OpenAIBPETokenizer(folder)
    # transformers 5 builds it from the vocabulary and merges themselves (vocab_file= is not read).
    hf = OpenAIGPTTokenizer(vocab=dict(ours.encoder), merges=list(ours.merges))
    backend = hf.backend_tokenizer
    report = ParityReport()
    for file in files:
        for number, line in enumerate(read_text(file).split("\n"), 1):
            if not line.strip():
                continue
            a = ours.encode(line)
            b = hf.encode(line, add_special_tokens=False)
            report.lines += 1
            report.tokens_ours += len(a)
            report.tokens_theirs += len(b)
            if a == b:
                continue
            report.lines_differing += 1
            matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
            report.tokens_differing += sum(
                max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal"
            )
            theirs_words = [
                w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line))
            ]
            ours_words = [w.strip(" ") or w for w in pre_tokenize(line)]
            stretches = classify(ours_words, theirs_words) or [(BPE_CAUSE, " ".join(ours_words), "")]
            first: dict[str, tuple[str, str]] = {}  # each cause's first stretch in the line
            for cause, x, y in stretches:
                first.setdefault(cause, (x, y))
            report.differing.append((str(file), number, tuple(first)))
            for cause, (x, y) in first.items():
                stats = report.causes.setdefault(cause, CauseStats())
                stats.lines += 1
                if len(stats.examples) < examples and all(e[:2] != (x, y) for e in stats.examples):
                    stats.examples.append((x, y, line[:200]))
    return report


def log_report(report: ParityReport) -> None:
    """``report`` in a few lines of log."""
    log.info(
        "lines compared %d, tokens compared %d (ours) / %d (transformers), lines differing %d (%.1f%%), "
        "tokens differing %d",
        report.lines,
        report.tokens_ours,
        report.tokens_theirs,
        report.lines_differing,
        100 * report.lines_differing / max(report.lines, 1),
        report.tokens_differing,
    )
    for cause, stats in sorted(report.causes.items(), key=lambda kv: -kv[1].lines):
        log.info("  %s: %d lines", cause, stats.lines)
        for x, y, _ in stats.examples:
            log.info("      ours %r  transformers %r", x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpt1_ds.openai_bpe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    learn = sub.add_parser("learn", help="learn a GPT-1-style vocabulary (vocab.json, merges.txt)")
    learn.add_argument("--input", nargs="+", required=True, help="text files (.gz/.bz2/.xz read too)")
    learn.add_argument("--merges", type=int, required=True, help="number of merges (GPT-1: 40000)")
    learn.add_argument("--min-frequency", type=int, default=2, help="stop at a pair seen less often")
    learn.add_argument("--out", type=Path, required=True, help="folder to write vocab.json and merges.txt")
    cmp = sub.add_parser("compare", help="cross-check the encoding against transformers' OpenAIGPTTokenizer")
    cmp.add_argument("folder", type=Path, help="folder with vocab.json and merges.txt")
    cmp.add_argument("files", nargs="+", help="text files; each non-empty line is compared")
    cmp.add_argument("--examples", type=int, default=3, help="examples shown for each cause")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "learn":
            vocab, merges = learn_bpe((read_text(f) for f in args.input), args.merges, args.min_frequency)
            write_openai_files(args.out, vocab, merges)
            log.info("%s: %d merges, %d pieces", args.out, len(merges), len(vocab))
        else:
            log_report(compare(args.folder, args.files, args.examples))
    except (FileNotFoundError, ValueError, ImportError) as e:
        log.error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
