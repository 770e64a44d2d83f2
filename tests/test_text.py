"""gpt1_ds.text: ftfy's repairs and their shortcut, long lines in pieces."""

from __future__ import annotations

import gzip

import ftfy
import pytest
from conftest import SAMPLE_BOOKS

from gpt1_ds.text import LONG_LINE, cut_at_spaces, fix_paragraph


def test_ftfy_shortcut_gives_what_ftfy_gives_on_real_books():
    checked = 0
    for path in SAMPLE_BOOKS:
        book = gzip.decompress(path.read_bytes()).decode("utf-8").replace("\r\n", "\n")
        for para in book.split("\n\n"):
            para = " ".join(para.split("\n"))
            assert fix_paragraph(para) == ftfy.fix_text(para), para[:80]
            checked += 1
    assert checked > 1000


def test_ftfy_repairs_mojibake():
    assert fix_paragraph("The caf\u00c3\u00a9 is \u00e2\u20ac\u0153open\u00e2\u20ac\ufffd.") != ""
    assert fix_paragraph("It\u00e2\u20ac\u2122s here") == "It's here"


def test_a_book_that_is_one_long_line_is_fixed_in_pieces_as_its_paragraphs_would_be():
    book = gzip.decompress(SAMPLE_BOOKS[0].read_bytes()).decode("utf-8").replace("\r\n", "\n")
    paragraphs = [" ".join(p.split()) for p in book.split("\n\n") if p.strip()]
    line = " ".join(paragraphs) + " It\u00e2\u20ac\u2122s here"  # mojibake past the first piece
    assert len(line) > 3 * LONG_LINE
    moves: list[int] = []  # what a progress bar is moved by, piece after piece
    fixed = fix_paragraph(line, moves.append)
    assert len(moves) >= 3 and sum(moves) == len(line) + 1  # the bar moves inside the one line
    assert fixed.endswith(" It's here")
    assert fixed == " ".join(fix_paragraph(p) for p in cut_at_spaces(line))
    assert len(fixed.split()) == len(line.split())


@pytest.mark.parametrize("limit", [1, 3, 8])
def test_cut_at_spaces_cuts_only_single_spaces_and_joins_back(limit):
    for line in ["", "a", "ab cd  ef gh", " a b ", "abcdefghij k", "a  b  c", "x y" * 20]:
        pieces = cut_at_spaces(line, limit)
        assert " ".join(pieces) == line
        assert all(len(p) >= limit for p in pieces[:-1])
        for p in pieces[1:]:  # a cut never leaves a space beside it
            assert not p.startswith(" ")
        for p in pieces[:-1]:
            assert not p.endswith(" ")
    assert cut_at_spaces("a b c d", LONG_LINE) == ["a b c d"]
