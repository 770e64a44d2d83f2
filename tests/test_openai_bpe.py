"""gpt1_ds.openai_bpe: GPT-1's text pipeline, its BPE, the files it reads and learns, and the
cross-check against transformers' OpenAIGPTTokenizer."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE_BOOKS, SAMPLE_DIR

from gpt1_ds.openai_bpe import (
    BPE_CAUSE,
    MERGES_NAME,
    VOCAB_NAME,
    OpenAIBPETokenizer,
    _symbols,
    compare,
    is_openai_dir,
    learn_bpe,
    main,
    pre_tokenize,
    read_text,
    text_standardize,
    word_counts,
    write_openai_files,
)
from gpt1_ds.tokenizer import SentencePieceTokenizer, Tokenizer

SST2_DEV = REPO / "data" / "glue" / "sst2" / "stsa.binary.dev"
SNARK = SAMPLE_DIR / "pg00013_Lewis-Carroll_The-Hunting-of-the-Snark.txt.gz"
# A vocabulary small enough to work out its BPE by hand.
TINY_BASE = [
    "l",
    "o",
    "w",
    "e",
    "r",
    "n",
    "s",
    "t",
    "a",
    "w</w>",
    "r</w>",
    "t</w>",
    "s</w>",
    "a</w>",
    "o</w>",
]
TINY_MERGES = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("lo", "w"), ("n", "e"), ("ne", "w"), ("a", "a")]


def tiny_dir(folder: Path, extra: tuple[str, ...] = ("\n</w>", "<unk>")) -> Path:
    vocab = {p: i for i, p in enumerate([*TINY_BASE, *(a + b for a, b in TINY_MERGES), *extra])}
    write_openai_files(folder, vocab, TINY_MERGES)
    return folder


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a—b–c―d", "a - b - c - d"),  # em, en and horizontal-bar dashes
        ("wait… what", "wait... what"),
        ("´twas", "'twas"),
        ("hi!!! you?", "hi !!! you ?"),  # a run is one group
        ('say "so"', 'say " so "'),
        ("a(b)[c]{d}", "a ( b ) [ c ] { d }"),
        ("x/y|w_v*u+t~s;r,q", "x / y | w _ v * u + t ~ s ; r , q"),
        ("a\\b++c", "a\\b ++ c"),  # the original's pattern leaves backslashes alone
        ("well-known a--b", "well - known a -- b"),
        ("3.5% of a&b = c@d #1: 'x'.", "3.5% of a&b = c@d #1: 'x'."),  # not in the original's class
        ("  a \t b  \n\n  c  ", "a b \n c"),
        ("a\r\nb", "a \n b"),
        ("a\u00a0\u00a0b", "a b"),
    ],
)
def test_text_standardize_follows_the_original_rules(text, expected):
    assert text_standardize(text) == expected


def test_words_are_spacy_words_lower_cased():
    assert pre_tokenize("I don't know, I'm sure.") == ["i", "do", "n't", "know", ",", "i", "'m", "sure", "."]
    assert pre_tokenize("I can't — won’t!") == ["i", "ca", "n't", "-", "wo", "n't", "!"]  # ftfy uncurls
    assert pre_tokenize("It's Mr. Smith's") == ["it", "'s", "mr.", "smith", "'s"]
    assert pre_tokenize("In 1984 it cost $3.50, or 1,000 yen at 10:30.") == [
        *("in", "1984", "it", "cost", "$", "3.50", ",", "or", "1", ",", "000", "yen", "at", "10:30", "."),
    ]
    assert pre_tokenize("low\n\n  low") == ["low", "\n ", "low"]  # one newline word
    assert pre_tokenize("cafÃ©") == ["café"]  # ftfy repairs mojibake


def test_bpe_on_a_hand_made_vocabulary(tmp_path):
    tok = OpenAIBPETokenizer(tiny_dir(tmp_path))
    # low: l o w</w> → lo w</w> → low</w>. lower: lo w e r</w> → lo w er</w> (rank 2 before 3) → low er</w>.
    # newest: ne w e s t</w> → new e s t</w>. aaa: the leftmost pair first → aa a</w>.
    assert tok.pieces("Low lower NEWEST aaa") == [
        "low</w>",
        "low",
        "er</w>",
        "new",
        "e",
        "s",
        "t</w>",
        "aa",
        "a</w>",
    ]
    ids = tok.encode("low lower\nlox")
    v = tok.encoder
    assert ids == [v["low</w>"], v["low"], v["er</w>"], v["\n</w>"], v["lo"], v["<unk>"]]  # x</w> is unknown
    assert tok.decode(ids) == "low lower \n lo<unk>"
    assert (tok.unk_id, tok.pad_id, tok.newline_id, tok.eod_id) == (
        v["<unk>"],
        v["<unk>"],
        v["\n</w>"],
        v["\n</w>"],
    )


def test_without_unk_and_newline_pieces_unknown_is_id_0_as_in_the_original(tmp_path):
    tok = OpenAIBPETokenizer(tiny_dir(tmp_path, extra=()))
    assert tok.unk_id == tok.pad_id == tok.newline_id == tok.eod_id == 0
    assert tok.encode("low\nx") == [tok.encoder["low</w>"], 0, 0]


def test_a_piece_sharing_an_id_does_not_grow_the_table(tmp_path):
    folder = tiny_dir(tmp_path, extra=("\n</w>",))
    vocab = json.loads((folder / VOCAB_NAME).read_text(encoding="utf-8"))
    size = len(vocab)
    (folder / VOCAB_NAME).write_text(json.dumps({**vocab, "<unk>": 0}), encoding="utf-8")
    tok = OpenAIBPETokenizer(folder)
    assert tok.base_size == size and tok.appended == (size, size + 1, size + 2)
    assert tok.unk_id == 0 and tok.decode([0]) == "l"  # the first piece of the id


def test_appended_task_ids_and_interface(openai_dir):
    tok = OpenAIBPETokenizer(openai_dir)
    vocab = json.loads((openai_dir / VOCAB_NAME).read_text(encoding="utf-8"))
    base = len(vocab)
    assert tok.kind == "openai-bpe" and tok.base_size == base and tok.vocab_size == base + 3
    assert tok.appended == (tok.start_id, tok.delim_id, tok.extract_id) == (base, base + 1, base + 2)
    assert tok.special_ids() == {
        "pad": vocab["<unk>"],
        "unk": vocab["<unk>"],
        "eod": vocab["\n</w>"],
        "start": base,
        "delim": base + 1,
        "extract": base + 2,
        "newline": vocab["\n</w>"],
    }
    ids = tok.encode("_start_ _delimiter_ _classify_ <unk>")
    assert not set(tok.appended) & set(ids) and max(ids) < base
    assert tok.decode([tok.start_id, *tok.encode("the end"), tok.extract_id]) == "the end"
    with pytest.raises(ValueError, match=f"id {base + 3} is outside"):
        tok.decode([base + 3])
    data = (openai_dir / VOCAB_NAME).read_bytes() + (openai_dir / MERGES_NAME).read_bytes()
    assert tok.sha256 == hashlib.sha256(data).hexdigest()
    assert tok.normalize("Don't  CHANGE") == "Don't  CHANGE"
    batch = tok.encode_batch(["the end", "", "a\nb"])
    assert [b.dtype for b in batch] == [np.uint32] * 3
    assert [b.tolist() for b in batch] == [tok.encode("the end"), [], tok.encode("a\nb")]


def test_both_kinds_have_every_member_of_the_interface(openai_dir):
    sp = SentencePieceTokenizer(REPO / "tests" / "data" / "legacy" / "finetune_sst2" / "tokenizer.model")
    for tok in (OpenAIBPETokenizer(openai_dir), sp):
        missing = [name for name in Tokenizer.__annotations__ if not hasattr(tok, name)]
        assert not missing, (tok.kind, missing)
    assert (sp.kind, sp.appended, sp.base_size) == ("sentencepiece", (), sp.vocab_size)


def test_non_ascii(openai_dir):
    tok = OpenAIBPETokenizer(openai_dir)
    assert "é" in tok.encoder  # Persuasion has it
    assert tok.unk_id not in tok.encode("Café, CAFÉ.")
    assert tok.encode("café") == tok.encode("CAFÃ©")  # mojibake repaired, then lower-cased
    assert tok.encode("😀") == [tok.unk_id]
    assert tok.encode("漢字") == [tok.unk_id, tok.unk_id]  # one word, two unknown pieces
    assert tok.encode("digits 1984") == [tok.encoder[p] for p in tok.pieces("digits 1984")]
    assert tok.unk_id not in tok.encode("digits 1984, 3.50")


def test_learned_vocabulary_from_a_real_book(openai_dir):
    vocab = json.loads((openai_dir / VOCAB_NAME).read_text(encoding="utf-8"))
    lines = (openai_dir / MERGES_NAME).read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version") and lines[-1] == ""
    merges = [tuple(line.split(" ")) for line in lines[1:-1]]
    assert len(merges) == 1000
    assert all(a + b in vocab for a, b in merges)
    assert vocab["<unk>"] == len(vocab) - 1 and "\n</w>" in vocab and "\n" in vocab
    chars = [p for p in vocab if len(p) == 1]
    assert all(c + "</w>" in vocab for c in chars)
    assert len(vocab) == 2 * len(chars) + len({a + b for a, b in merges}) + 1
    # The first merge is the most frequent pair of symbols over the book's words.
    pairs: Counter[tuple[str, str]] = Counter()
    for word, n in word_counts([read_text(SAMPLE_BOOKS[0])]).items():
        symbols = _symbols(word)
        for pair in pairwise(symbols):
            pairs[pair] += n
    top = max(pairs.values())
    assert merges[0] == min(p for p, n in pairs.items() if n == top)  # ties: the smallest pair


def test_learning_is_deterministic_and_stops_below_min_frequency():
    text = read_text(SNARK)
    a = learn_bpe([text], 300)
    assert a == learn_bpe([text], 300)
    few, merges = learn_bpe(["the cat sat on the mat"], 100)
    # a t</w> thrice (cat sat mat); h e</w> and t h twice each (the: the smaller pair first), then
    # t he</w>; then no pair is seen twice.
    assert merges == [("a", "t</w>"), ("h", "e</w>"), ("t", "he</w>")]
    assert few["at</w>"] == len(few) - 4 and few["<unk>"] == len(few) - 1


def test_round_trip_of_known_words_on_a_real_book(openai_dir):
    tok = OpenAIBPETokenizer(openai_dir)
    text = read_text(SAMPLE_BOOKS[0])
    ids = tok.encode(text)
    assert len(ids) < len(text) / 2.5  # merges at work: well under one token per 2.5 characters
    assert ids.count(tok.newline_id) == pre_tokenize(text).count("\n ") > 1000
    known = 0
    for line in text.split("\n")[:3000]:
        ids = tok.encode(line)
        if ids and tok.unk_id not in ids:
            known += 1
            assert tok.decode(ids) == " ".join(pre_tokenize(line)), line
    assert known > 1000
    assert tok.decode(tok.encode("It was\n\nDone.")) == "it was \n done ."


def test_a_folder_without_the_files_is_an_error_naming_them(openai_dir, tmp_path):
    assert is_openai_dir(openai_dir) and not is_openai_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no vocab.json and no merges.txt"):
        OpenAIBPETokenizer(tmp_path)
    (tmp_path / VOCAB_NAME).write_bytes((openai_dir / VOCAB_NAME).read_bytes())
    assert not is_openai_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no merges.txt"):
        OpenAIBPETokenizer(tmp_path)


def test_bad_files_are_errors_naming_file_and_line(tmp_path):
    folder = tiny_dir(tmp_path)
    vocab, merges = folder / VOCAB_NAME, folder / MERGES_NAME
    good = merges.read_text(encoding="utf-8")
    merges.write_text(good.replace("e r</w>\n", "e r</w> x\n"), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{merges}:4: a merge is two symbols"):
        OpenAIBPETokenizer(folder)
    merges.write_text(good.replace("n e\n", "\nn e\n"), encoding="utf-8")  # an empty line inside
    with pytest.raises(ValueError, match=rf"{merges}:6: a merge is two symbols"):
        OpenAIBPETokenizer(folder)
    merges.write_text(good + "t s</w>\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=rf"{merges}:9: the merge 't s</w>' makes 'ts</w>', not in vocab.json"
    ):
        OpenAIBPETokenizer(folder)
    merges.write_text(good + "\n\n", encoding="utf-8")  # empty lines at the end are fine
    assert len(OpenAIBPETokenizer(folder).merges) == len(TINY_MERGES)
    merges.write_text(good.split("\n", 1)[1], encoding="utf-8")  # no header: the first line is a merge
    assert OpenAIBPETokenizer(folder).merges == TINY_MERGES
    text = vocab.read_text(encoding="utf-8")
    vocab.write_text(text[:-5], encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{vocab}: not valid JSON"):
        OpenAIBPETokenizer(folder)
    vocab.write_text(json.dumps({"a": 0, "b": 2}), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{vocab}: the ids are not 0 … 2 without gaps \(id 1\)"):
        OpenAIBPETokenizer(folder)
    vocab.write_text(json.dumps({"a": 0, "b": "1"}), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{vocab}: the id of 'b' is not an integer"):
        OpenAIBPETokenizer(folder)


def test_without_spacy_the_error_says_what_to_install(openai_dir):
    code = (
        "import sys; sys.modules['spacy'] = None\n"  # as if it were not installed
        "from gpt1_ds.openai_bpe import OpenAIBPETokenizer\n"
        f"OpenAIBPETokenizer({str(openai_dir)!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode != 0
    assert "ImportError: GPT-1's BPE tokenizer needs spaCy and ftfy" in result.stderr
    assert "pip install 'gpt1-ds[gpt1]'" in result.stderr


def test_parity_with_transformers_on_sst2_dev(openai_dir):
    report = compare(openai_dir, [SST2_DEV])
    lines = [line for line in SST2_DEV.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert report.lines == len(lines) and report.tokens_ours > report.lines and report.tokens_theirs > 0
    assert report.lines_differing == len(report.differing) < report.lines
    assert 0 < report.tokens_differing <= report.tokens_ours + report.tokens_theirs
    assert sum(stats.lines for stats in report.causes.values()) >= report.lines_differing
    assert all(causes for _, _, causes in report.differing)
    # Where both give the same words, both give the same ids: the two BPEs agree.
    assert BPE_CAUSE not in report.causes
    # Lines of plain words, commas and a final period are encoded alike.
    differing = {number for _, number, _ in report.differing}
    plain = [
        n
        for n, line in enumerate(SST2_DEV.read_text(encoding="utf-8").split("\n"), 1)
        if re.fullmatch(r"[0-9] [a-z ,]+( \.)?", line)
    ]
    assert len(plain) > 100 and not differing & set(plain)
    # spaCy splits contractions as "n't" and "'s"; BERT's pre-tokenizer at the apostrophe.
    examples = report.causes["contraction/apostrophe"].examples
    assert ("'s", "' s") in [e[:2] for e in examples]


def test_command_line_learns_and_compares(tmp_path, caplog):
    out = tmp_path / "bpe"
    assert main(["learn", "--input", str(SNARK), "--merges", "200", "--out", str(out)]) == 0
    assert is_openai_dir(out) and len(OpenAIBPETokenizer(out).merges) == 200
    sample = tmp_path / "sample.txt"
    sample.write_text("The Snark was a Boojum, you see.\n\nI don't know...\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="gpt1_ds.openai_bpe"):
        assert main(["compare", str(out), str(sample)]) == 0
    assert "lines compared 2," in caplog.text and "lines differing 1 " in caplog.text
    assert main(["compare", str(tmp_path), str(sample)]) == 1
