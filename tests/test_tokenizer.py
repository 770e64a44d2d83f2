"""data_prep.tokenizer: special ids, exact round trips, byte fallback, determinism."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_prepare

from data_prep.tokenizer import _chunks, ensure_tokenizer, text_settings, train
from gpt1_ds.manifest import train_docs
from gpt1_ds.tasks import TaskData, encode
from gpt1_ds.text import LONG_LINE
from gpt1_ds.tokenizer import (
    INFO_NAME,
    LEGACY_INFO_NAME,
    MODEL_NAME,
    info_file,
    load_tokenizer,
)


def test_special_ids_and_info(prepared):
    tok = load_tokenizer(prepared / MODEL_NAME)
    info = json.loads((prepared / INFO_NAME).read_text())
    assert info["sha256"] == tok.sha256 and info["vocab_size"] == tok.vocab_size == 2000
    assert info["special_ids"] == tok.special_ids()
    assert (tok.pad_id, tok.eod_id) == (0, 2)
    assert len({tok.start_id, tok.delim_id, tok.extract_id, tok.newline_id, tok.pad_id, tok.eod_id}) == 6


def test_round_trip_is_exact_on_a_whole_book(prepared):
    tok = load_tokenizer(prepared / MODEL_NAME)
    docs, _ = train_docs(prepared)
    text = docs[0].read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # BPE merges: well under one token per 2.5 characters
    assert ids.count(tok.newline_id) == text.count("\n")


def test_a_book_on_one_line_is_encoded_in_pieces_to_the_ids_of_the_whole_line(prepared):
    tok = load_tokenizer(prepared / MODEL_NAME)
    docs, _ = train_docs(prepared)
    words = docs[0].read_text(encoding="utf-8").split()
    # Double spaces, a leading space, non-ASCII and emoji (byte fallback) at the places cut.
    line = " " + " ".join(w if i % 97 else f"{w}  caf\u00e9 \U0001f600" for i, w in enumerate(words))
    assert len(line) > 4 * LONG_LINE
    text = line + "\n\n" + line[: LONG_LINE + 5]
    whole = [tok.sp.encode(part) for part in text.split("\n")]  # sentencepiece on each whole line
    expected = [*whole[0], tok.newline_id, *whole[1], tok.newline_id, *whole[2]]
    assert tok.encode(text) == expected
    assert tok.decode(expected) == text


def test_training_pieces_of_a_long_paragraph_are_bounded_and_keep_its_words():
    para = " ".join(f"w{i}" for i in range(5000)) + " " + "x" * 3000
    chunks = _chunks(para, limit=100)
    assert all(len(c) <= 100 for c in chunks)
    assert " ".join(chunks).replace(" ", "") == para.replace(" ", "")
    assert _chunks("", limit=5) == [] and _chunks("ab", limit=5) == ["ab"]


def test_byte_fallback_never_gives_unknown(prepared):
    tok = load_tokenizer(prepared / MODEL_NAME)
    text = "Snow \u2603, kanji \u6f22\u5b57, emoji \U0001f600, tabs\tand  double  spaces\n\nend"
    ids = tok.encode(text)
    assert tok.special_ids()["unk"] not in ids
    assert tok.decode(ids) == text


def test_control_tokens_are_never_produced_from_text(prepared):
    tok = load_tokenizer(prepared / MODEL_NAME)
    ids = tok.encode("<start> <delim> <extract> <eod> <pad>")
    assert not {tok.start_id, tok.delim_id, tok.extract_id, tok.eod_id, tok.pad_id} & set(ids)


def test_training_is_deterministic_and_reused_when_up_to_date(prepared, tmp_path):
    docs, _ = train_docs(prepared)
    a = train(docs, tmp_path / "a", vocab_size=600, seed=3)
    b = train(docs, tmp_path / "b", vocab_size=600, seed=3)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a" / MODEL_NAME).read_bytes() == (tmp_path / "b" / MODEL_NAME).read_bytes()
    # ensure_tokenizer keeps an up-to-date model and retrains on other settings.
    settings = json.loads((prepared / INFO_NAME).read_text())["settings"]
    kept = ensure_tokenizer(
        prepared,
        vocab_size=settings["vocab_size"],
        seed=settings["seed"],
        max_sentences=settings["max_sentences"],
        sample_bytes=settings["sample_bytes"],
    )
    assert kept.sha256 == load_tokenizer(prepared / MODEL_NAME).sha256


def test_a_file_that_is_not_a_tokenizer_is_an_error_naming_it(prepared, tmp_path):
    bad = tmp_path / MODEL_NAME
    bad.write_bytes((prepared / MODEL_NAME).read_bytes()[:300])  # cut short
    with pytest.raises(ValueError, match=rf"{bad}: not a sentencepiece model"):
        load_tokenizer(bad)


def test_a_dataset_with_the_older_metadata_name_keeps_its_tokenizer(prepared, tmp_path):
    """Datasets prepared before the HF tokenizer export kept the metadata as tokenizer.json."""
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    (old / INFO_NAME).rename(old / LEGACY_INFO_NAME)
    assert info_file(old) == old / LEGACY_INFO_NAME
    model_bytes = (old / MODEL_NAME).read_bytes()
    settings = json.loads((old / LEGACY_INFO_NAME).read_text())["settings"]
    keys = ("vocab_size", "seed", "max_sentences", "sample_bytes")
    kept = ensure_tokenizer(old, **{k: settings[k] for k in keys})
    assert (old / MODEL_NAME).read_bytes() == model_bytes and not (old / INFO_NAME).exists()  # not retrained
    assert kept.sha256 == load_tokenizer(prepared / MODEL_NAME).sha256
    # An HF tokenizers file under that name is not ours.
    (old / LEGACY_INFO_NAME).write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    assert info_file(old) is None


def test_text_for_fine_tuning_is_prepared_as_the_tokenizer_training_text_was(prepared, tmp_path):
    """The tokenizer records how its text was cleaned (ftfy, lower-casing); fine-tuning examples,
    which skip data prep, are prepared the same way before they are encoded."""
    cased = load_tokenizer(prepared / MODEL_NAME)
    assert json.loads((prepared / INFO_NAME).read_text())["text"] == text_settings(False)
    assert cased.normalize("It\u2019s \u201cfine\u201d &amp; Fun") == 'It\'s "fine" & Fun'
    lower_dir = tmp_path / "lower"
    run_prepare(lower_dir, extra=["--lowercase"])
    lower = load_tokenizer(lower_dir / MODEL_NAME)
    assert lower.text == text_settings(True)
    assert lower.normalize("The Ship\nSAILED") == "the ship\nsailed"
    data = TaskData("classification", labels=["x"])
    examples = data.read(_tsv(tmp_path / "c.tsv", "The Ship Sailed"), train=True)
    (enc,) = encode(examples, data, lower, 64)
    assert enc.sequences[0][1:-1] == lower.encode("the ship sailed")
    (enc,) = encode(examples, data, cased, 64)
    assert enc.sequences[0][1:-1] == cased.encode("The Ship Sailed")


def test_a_tokenizer_without_the_record_leaves_text_as_it_is_until_data_prep_adds_it(prepared, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    info = json.loads((old / INFO_NAME).read_text())
    del info["text"]
    (old / INFO_NAME).write_text(json.dumps(info))
    assert load_tokenizer(old / MODEL_NAME).normalize("It\u2019s") == "It\u2019s"
    model_bytes = (old / MODEL_NAME).read_bytes()
    keys = ("vocab_size", "seed", "max_sentences", "sample_bytes")
    kept = ensure_tokenizer(old, **{k: info["settings"][k] for k in keys})
    assert (old / MODEL_NAME).read_bytes() == model_bytes  # not retrained, the record added
    assert kept.text == text_settings(False) and kept.normalize("It\u2019s") == "It's"


def _tsv(path, text):
    path.write_text(f"text\tlabel\n{text}\tx\n")
    return path
