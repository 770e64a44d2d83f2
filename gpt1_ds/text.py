"""Text as gpt1-ds reads it: raw bytes → decoded, repaired, one paragraph a line.

The library half of data prep's cleaning step (``data_prep.clean`` runs it over the inputs), and
what prepares any later text the same way: fine-tuning examples, prompts and zero-shot sentences
(``Tokenizer.normalize``), held-out books scored for bits per byte (``gpt1_ds.evaluate``).
Decode: UTF-8 (BOM dropped), falling back line by line to cp1252, then latin-1; CRLF and CR → LF;
NUL and other control characters dropped; what lies between the Project Gutenberg markers kept;
hard-wrapped lines unwrapped into paragraphs; ``ftfy.fix_text`` on every paragraph.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import re
from collections.abc import Callable, Iterator
from itertools import groupby
from pathlib import Path

import ftfy

LONG_LINE = 1 << 14
"""Characters past which a line is worked on in pieces (``cut_at_spaces``): a book that is one
long line costs what the same text in paragraphs does."""
SINGLE_SPACE = re.compile(r"(?<=[^ \n]) (?=[^ \n])")
"""A space between two characters that are neither spaces nor newlines: where a text may be cut."""


def cut_at_spaces(line: str, limit: int = LONG_LINE) -> list[str]:
    """``line`` cut at single spaces (a space between two non-spaces, which is dropped) into
    pieces of about ``limit`` characters or more: ``" ".join`` of the pieces is ``line``. Time
    linear in its length; a line of ``limit`` characters or fewer is its only piece."""
    pieces, start = [], 0
    while (cut := SINGLE_SPACE.search(line, start + limit)) is not None:
        pieces.append(line[start : cut.start()])
        start = cut.end()
    return [*pieces, line[start:]]


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
    with contextlib.suppress(UnicodeDecodeError):
        return raw.decode("utf-8")
    repairs.append("encoding_fallback")
    return "\n".join(_decode_line(line) for line in raw.split(b"\n"))


def _decode_line(line: bytes) -> str:
    for encoding in ("utf-8", "cp1252"):
        with contextlib.suppress(UnicodeDecodeError):
            return line.decode(encoding)
    return line.decode("latin-1")


def strip_gutenberg(text: str, repairs: list[str]) -> str:
    """Keep what lies between the START and END marker lines, when they are there."""
    start, end = _PG_START.search(text), _PG_END.search(text)
    if start and end and end.start() < start.end():
        end = _PG_END.search(text, start.end())
    if start or end:
        repairs.append("gutenberg")
    return text[start.end() if start else 0 : end.start() if end else len(text)]


def fix_paragraph(paragraph: str, advance: Callable[[int], None] = lambda _n: None) -> str:
    """``ftfy.fix_text`` with its default settings, skipping the work where it can change nothing;
    a paragraph longer than ``LONG_LINE`` fixed in pieces cut at spaces, as if it were paragraphs.
    ``advance(characters)`` is called as each piece is done (a progress bar's update)."""
    if len(paragraph) > LONG_LINE:
        pieces = []
        for piece in cut_at_spaces(paragraph):
            pieces.append(_fix_piece(piece))
            advance(len(piece) + 1)
        return " ".join(pieces)
    advance(len(paragraph))
    return _fix_piece(paragraph)


def _fix_piece(paragraph: str) -> str:
    if paragraph.isascii():
        return paragraph if "&" not in paragraph else ftfy.fix_text(paragraph, _FTFY)
    uncurled = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", paragraph))
    if uncurled.isascii() and "&" not in uncurled:
        return uncurled
    return _C1.sub("", ftfy.fix_text(paragraph, _FTFY))


def normalize(text: str, lowercase: bool) -> str:
    """A short text (a fine-tuning example, a prompt) as the documents' paragraphs are cleaned:
    each line fixed (``fix_paragraph``: ftfy, quotes uncurled), lower-cased when the corpus was."""
    lines = (fix_paragraph(line) for line in text.split("\n"))
    return "\n".join(line.lower() if lowercase else line for line in lines)


def clean_text(
    text: str,
    repairs: list[str],
    lowercase: bool = False,
    gutenberg: bool = True,
    advance: Callable[[int], None] = lambda _n: None,
) -> str:
    """Decoded text → cleaned document: one paragraph per line; ``advance(characters)`` as the
    paragraphs are fixed (the slow part: a progress bar moves inside a long book)."""
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
    paragraphs = [p for p in (_SPACES.sub(" ", b).strip() for b in _BLANK_LINES.split(text)) if p]
    if paragraphs and "gutenberg" in repairs:
        if paragraphs[0].startswith("Produced by"):
            paragraphs.pop(0)
        if paragraphs and _PG_TRAILER.match(paragraphs[-1]):
            paragraphs.pop()
    fixed = [p for p in (fix_paragraph(p, advance).strip() for p in paragraphs) if p]
    return "\n".join(p.lower() if lowercase else p for p in fixed)


def iter_documents(
    path: Path, doc_id: str, fmt: str, separator: re.Pattern[str]
) -> Iterator[tuple[str, str, int, list[str]]]:
    """(doc_id, decoded text, bytes in, repairs) for each document of one input file."""
    opener = _OPENERS.get(path.suffix)  # decompress by suffix
    raw = opener(path.read_bytes()) if opener else path.read_bytes()
    if looks_binary(raw):
        raise ValueError("binary file")
    repairs: list[str] = []
    text = decode(raw, repairs)
    if fmt == "books":
        yield doc_id, text, len(raw), repairs
        return
    # bookscorpus: sentences one a line, books separated by separator lines
    runs = groupby(text.splitlines(), key=lambda line: separator.fullmatch(line) is not None)
    for index, book in enumerate(list(lines) for is_separator, lines in runs if not is_separator):
        body = "\n\n".join(book)  # each sentence line its own paragraph
        yield f"{doc_id}-{index:06d}", body, len(body.encode()), list(repairs)
