"""data_prep.clean: decoding, Gutenberg cut, unwrapping, bad input, splits."""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import os

import pytest

from data_prep import clean
from data_prep.common import Comm

GUTENBERG = (
    "The Project Gutenberg EBook of Test, by Nobody\r\n\r\n"
    "Character set encoding: ISO-8859-1\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK TEST ***\r\n\r\n\r\n"
    "Produced by Some Volunteers\r\nand the Online Team\r\n\r\n\r\n"
    "CHAPTER I\r\n\r\n"
    "It was a dark and stormy\r\nnight; the rain fell in\r\ntorrents.\r\n\r\n"
    "\u201cWell,\u201d said she, \u2018it\u2019s late.\u2019\r\n\r\n"
    "End of the Project Gutenberg EBook of Test, by Nobody\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK TEST ***\r\n\r\n"
    "***** This file should be named 1.txt *****\r\nSection 1. General Terms of Use\r\n"
)
EXPECTED = (
    "CHAPTER I\nIt was a dark and stormy night; the rain fell in torrents.\n\"Well,\" said she, 'it's late.'"
)


def args_for(tmp_path, inputs, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    clean.add_arguments(parser)
    args = parser.parse_args(["--input", *map(str, inputs), "--out", str(tmp_path / "out")])
    args.quiet = True
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def cleaned(tmp_path, doc_id: str) -> str:
    return (tmp_path / "out" / "clean" / "docs" / f"{doc_id}.txt").read_text(encoding="utf-8")


def test_gutenberg_book_with_bom_and_crlf(tmp_path):
    (tmp_path / "book.txt").write_bytes(b"\xef\xbb\xbf" + GUTENBERG.encode("utf-8"))
    (tmp_path / "other.txt").write_text("Another book.\n\nTwo paragraphs.\n")
    (tmp_path / "third.txt").write_text("A third one.\n")
    report = clean.run(
        args_for(tmp_path, [tmp_path / "book.txt", tmp_path / "other.txt", tmp_path / "third.txt"]), Comm()
    )
    text = cleaned(tmp_path, "book")
    assert text == EXPECTED
    assert "\r" not in text and "\ufeff" not in text
    assert "Gutenberg" not in text and "Produced by" not in text and "General Terms" not in text
    assert cleaned(tmp_path, "other") == "Another book.\nTwo paragraphs."
    assert report["documents"] == 3
    assert report["repaired"]["bom"] == 1 and report["repaired"]["crlf"] == 1
    assert report["repaired"]["gutenberg"] == 1


def test_bad_inputs_are_handled_and_counted(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "binary.txt").write_bytes(os.urandom(1000) + b"\x00" * 500)
    (src / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve.\n".encode("latin-1"))
    (src / "mixed.txt").write_bytes("Good \u00e9 line.\n".encode() + "Bad \u00e9 line.\n".encode("cp1252"))
    (src / "empty.txt").write_bytes(b"")
    (src / "blank.txt").write_bytes(b"\r\n  \r\n\t\n")
    (src / "nul.txt").write_bytes(b"Some\x00 text\x07 with\x1b controls.\n")
    (src / "long.txt").write_bytes(b"word " * 2_000_000)  # 10 MB, no newline
    (src / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (src / "dangling.txt").symlink_to(src / "does-not-exist.txt")
    (src / "ok.txt").write_text("Fine text.\n")
    report = clean.run(args_for(tmp_path, [src]), Comm())

    skipped = {os.path.basename(s["file"]): s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"binary.txt", "empty.txt", "blank.txt", "broken.txt.gz", "dangling.txt"}
    assert skipped["binary.txt"] == "binary file"
    assert skipped["empty.txt"] == skipped["blank.txt"] == "empty after cleaning"
    assert "EOFError" in skipped["broken.txt.gz"]  # a corrupt archive
    assert "FileNotFoundError" in skipped["dangling.txt"]  # unreadable
    assert report["documents"] == 5 and report["files"] == 10
    assert cleaned(tmp_path, "latin1") == "Caf\u00e9 cr\u00e8me, na\u00efve."
    assert cleaned(tmp_path, "mixed") == "Good \u00e9 line. Bad \u00e9 line."
    assert cleaned(tmp_path, "nul") == "Some text with controls."
    assert len(cleaned(tmp_path, "long")) == 10_000_000 - 1
    assert report["repaired"]["encoding_fallback"] == 2
    assert report["repaired"]["nul"] == 1 and report["repaired"]["control"] == 1
    on_disk = json.loads((tmp_path / "out" / "clean" / "report.json").read_text())
    assert on_disk["skipped"] == report["skipped"]


def test_compressed_inputs_directories_and_globs(tmp_path):
    src = tmp_path / "in" / "nested"
    src.mkdir(parents=True)
    (src / "a.txt.gz").write_bytes(gzip.compress(b"Alpha text.\n"))
    (src / "b.txt.bz2").write_bytes(bz2.compress(b"Beta text.\n"))
    (src / "c.txt.xz").write_bytes(lzma.compress(b"Gamma text.\n"))
    (src / "SHA256SUMS").write_text("not a book\n")
    files = clean.expand_inputs([str(tmp_path / "in")])
    assert [f.name for f in files] == ["a.txt.gz", "b.txt.bz2", "c.txt.xz"]
    assert clean.expand_inputs([str(tmp_path / "in" / "*" / "*.xz")]) == [src / "c.txt.xz"]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        clean.expand_inputs([str(tmp_path / "nothing-here*")])
    clean.run(args_for(tmp_path, [tmp_path / "in"]), Comm())
    assert [cleaned(tmp_path, x) for x in "abc"] == ["Alpha text.", "Beta text.", "Gamma text."]


def test_bookscorpus_format_splits_books_at_blank_lines(tmp_path):
    (tmp_path / "books_large.txt").write_text(
        "first book , sentence one .\nsentence two .\n\nsecond book starts .\n\n\nthird .\n"
    )
    clean.run(args_for(tmp_path, [tmp_path / "books_large.txt"], format="bookscorpus"), Comm())
    docs = sorted((tmp_path / "out" / "clean" / "docs").iterdir())
    assert [d.name for d in docs] == [f"books_large-{i:06d}.txt" for i in range(3)]
    assert docs[0].read_text() == "first book , sentence one .\nsentence two ."
    assert docs[2].read_text() == "third ."


def test_lowercase_option(tmp_path):
    (tmp_path / "x.txt").write_text("Hello World.\n")
    (tmp_path / "y.txt").write_text("Second.\n")
    (tmp_path / "z.txt").write_text("Third.\n")
    clean.run(args_for(tmp_path, [tmp_path], lowercase=True), Comm())
    assert cleaned(tmp_path, "x") == "hello world."


def test_splits_are_deterministic_by_document_and_never_empty():
    ids = [f"book{i}" for i in range(200)]
    a = clean.assign_splits(ids, 0.1, 0.05, seed=0)
    assert a == clean.assign_splits(list(reversed(ids)), 0.1, 0.05, seed=0)
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(ids)
    assert 8 <= len(a["val"]) <= 35 and 2 <= len(a["test"]) <= 20
    # A document keeps its split when others come and go.
    b = clean.assign_splits(ids[:150], 0.1, 0.05, seed=0)
    assert all(d in a[s] for s in b for d in b[s])
    # Three documents, tiny fractions: one each all the same.
    small = clean.assign_splits(["x", "y", "z"], 0.001, 0.001, seed=0)
    assert [len(small[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(ValueError, match="cannot fill"):
        clean.assign_splits(["x", "y"], 0.001, 0.001, seed=0)
    with pytest.raises(ValueError, match="fractions"):
        clean.assign_splits(ids, 0.6, 0.5, seed=0)
