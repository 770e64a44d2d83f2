"""gpt1_ds.tasks: readers, GPT-1's framings, truncation, batches and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from gpt1_ds.model import IGNORE_INDEX
from gpt1_ds.tasks import (
    TRUNCATIONS,
    DataError,
    TaskData,
    collate,
    encode,
    fit_segments,
    frame,
    pearson,
    scores,
    segment_budget,
    spearman,
)
from gpt1_ds.tokenizer import MODEL_NAME, Tokenizer, load_tokenizer

GLUE = REPO / "data" / "glue"


@pytest.fixture(scope="module")
def tok(prepared) -> Tokenizer:
    return load_tokenizer(prepared / MODEL_NAME)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_sst2_reader_reads_the_embedded_files():
    data = TaskData("sst2")
    train = data.read(GLUE / "sst2" / "stsa.binary.train", train=True)
    dev = data.read(GLUE / "sst2" / "stsa.binary.dev")
    assert (len(train), len(dev)) == (6920, 872)
    assert data.labels == ["0", "1"] and data.num_outputs == 2
    assert sum(e.label for e in dev) == 444  # positives in the GLUE dev set
    assert dev[0].texts == ("one long string of cliches .",) and dev[0].label == 0
    assert dev[0].where.endswith("stsa.binary.dev:1")


def test_rte_reader_reads_the_embedded_files():
    data = TaskData("rte")
    train = data.read(GLUE / "rte" / "train.tsv", train=True)
    dev = data.read(GLUE / "rte" / "dev.tsv")
    assert (len(train), len(dev)) == (2490, 277)
    assert data.labels == ["entailment", "not_entailment"]
    assert sum(e.label == 0 for e in dev) == 146
    assert train[0].texts[1] == "Weapons of Mass Destruction Found in Iraq."
    assert train[0].label == 1  # not_entailment


def test_frame_layouts(tok, tmp_path):
    s, d, e = tok.start_id, tok.delim_id, tok.extract_id
    assert len({s, d, e, tok.pad_id}) == 4
    a, b = tok.encode("the ship sailed"), tok.encode("it was late")
    assert frame([a], s, d, e, 64) == [s, *a, e]
    assert frame([a, b], s, d, e, 64) == [s, *a, d, *b, e]
    single = TaskData("classification")
    (enc,) = encode(
        single.read(write(tmp_path / "c.tsv", "text\tlabel\nthe ship sailed\tx\n"), train=True),
        single,
        tok,
        64,
    )
    assert enc.sequences == [[s, *a, e]]
    sim = TaskData("similarity")
    row = {"sentence1": "the ship sailed", "sentence2": "it was late", "label": 3.5}
    (enc,) = encode(sim.read(write(tmp_path / "s.jsonl", json.dumps(row) + "\n")), sim, tok, 64)
    assert enc.sequences == [[s, *a, d, *b, e], [s, *b, d, *a, e]]  # both orders
    assert enc.label == 3.5
    mc = TaskData("multiple_choice")
    row = {"context": "the ship sailed", "choices": ["it was late", "no"], "label": 1}
    (enc,) = encode(mc.read(write(tmp_path / "m.jsonl", json.dumps(row) + "\n")), mc, tok, 64)
    assert enc.sequences == [[s, *a, d, *b, e], [s, *a, d, *tok.encode("no"), e]]
    assert enc.label == 1


def test_shared_truncation_keeps_beginnings_and_fits_the_context():
    assert fit_segments([3, 4], 10) == [3, 4]
    assert fit_segments([100, 5], 20) == [15, 5]  # the short segment stays whole
    assert fit_segments([100, 100], 20) == [10, 10]
    assert sum(fit_segments([7, 50, 9], 30)) <= 30
    ids = frame([list(range(10, 110)), list(range(200, 205))], 1, 2, 3, 24, truncation="shared")
    assert len(ids) == 24
    assert ids[:3] == [1, 10, 11] and ids[-7:] == [2, 200, 201, 202, 203, 204, 3]
    for truncation in TRUNCATIONS:
        with pytest.raises(ValueError, match="cannot hold"):
            frame([[5], [6]], 1, 2, 3, 4, truncation)


def test_gpt1_truncation_cuts_each_segment_to_a_fixed_share_as_the_original():
    # openai/finetune-transformer-lm train.py: max_len = n_ctx // 2 - 2, then
    # [start] + x1[:max_len] + [delimiter] + x2[:max_len] + [clf_token]
    x1, x2 = list(range(1000, 1600)), list(range(2000, 2600))
    for n_ctx in (512, 64, 24):
        max_len = n_ctx // 2 - 2
        assert segment_budget(2, n_ctx) == max_len
        assert frame([x1, x2], 1, 2, 3, n_ctx) == [1, *x1[:max_len], 2, *x2[:max_len], 3]
    assert frame([x1, x2], 1, 2, 3, 25) == [1, *x1[:11], 2, *x2[:11], 3]  # odd: one more than 25 // 2 - 2
    long, short = list(range(10, 110)), list(range(200, 205))
    gpt1 = frame([long, short], 1, 2, 3, 24)  # each segment (24 - 3) // 2 = 10 tokens at most
    shared = frame([long, short], 1, 2, 3, 24, truncation="shared")
    assert gpt1 == [1, *long[:10], 2, *short, 3]  # the short one's unused room stays unused
    assert shared == [1, *long[:16], 2, *short, 3]  # ... or goes to the long one
    for truncation in TRUNCATIONS:
        assert frame([long], 1, 2, 3, 24, truncation) == [1, *long[:22], 3]  # one segment: all the room
        for n_ctx in (7, 24, 100):
            for lengths in ([0, 90], [3, 40, 2], [50, 50, 50], [1, 1], [200]):
                segments = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)]
                assert len(frame(segments, 1, 2, 3, n_ctx, truncation)) <= n_ctx, (lengths, n_ctx)
    with pytest.raises(ValueError, match="truncation must be gpt1 or shared, got 'half'"):
        frame([long], 1, 2, 3, 24, truncation="half")


def test_encode_frames_by_the_rule_it_is_given(tok, tmp_path):
    data = TaskData("entailment")
    premise = " ".join(["the ship sailed out of the harbour at dawn"] * 4)
    path = write(tmp_path / "e.tsv", f"premise\thypothesis\tlabel\n{premise}\tit was late\tyes\n")
    examples = data.read(path, train=True)
    hypothesis = tok.encode("it was late")
    (gpt1,) = encode(examples, data, tok, 24)
    (shared,) = encode(examples, data, tok, 24, truncation="shared")
    assert gpt1.sequences[0][-len(hypothesis) - 2 :] == [tok.delim_id, *hypothesis, tok.extract_id]
    assert shared.sequences[0][-len(hypothesis) - 2 :] == [tok.delim_id, *hypothesis, tok.extract_id]
    assert len(gpt1.sequences[0]) == 1 + 10 + 1 + len(hypothesis) + 1  # the premise cut to (24 - 3) // 2
    assert len(shared.sequences[0]) == 24  # the premise takes the hypothesis' unused room


def test_collate_pads_and_points_at_the_extract_token(tok, tmp_path):
    data = TaskData("entailment")
    path = write(tmp_path / "e.tsv", "premise\thypothesis\tlabel\na b c d e f\tg\tyes\nshort\tx\tno\n")
    enc = encode(data.read(path, train=True), data, tok, 64)
    batch = collate(enc, tok.pad_id, regression=False)
    B, K, T = batch["input_ids"].shape
    assert (B, K) == (2, 1) and max(len(e.sequences[0]) for e in enc) == T
    for b, e in enumerate(enc):
        n = len(e.sequences[0])
        assert batch["extract_pos"][b, 0] == n - 1
        assert batch["input_ids"][b, 0, n - 1] == tok.extract_id
        assert (batch["input_ids"][b, 0, n:] == tok.pad_id).all()
        assert batch["lm_targets"][b, 0, : n - 1].tolist() == e.sequences[0][1:]
        assert (batch["lm_targets"][b, 0, n - 1 :] == IGNORE_INDEX).all()
    assert batch["labels"].tolist() == [data.labels.index("yes"), data.labels.index("no")]


def test_malformed_rows_name_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.tsv", "premise\thypothesis\tlabel\nok\tfine\tyes\nonly two\tcolumns\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3: malformed row: 2 columns"):
        TaskData("entailment").read(bad, train=True)
    skipping = TaskData("entailment", on_error="skip")
    assert len(skipping.read(bad, train=True)) == 1 and skipping.skipped == 1
    js = write(tmp_path / "x.jsonl", '{"text": "good", "label": "a"}\n{"text": "oops\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: malformed row: invalid JSON"):
        TaskData("classification").read(js, train=True)
    missing = write(tmp_path / "m.jsonl", '{"txt": "good", "label": "a"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:1: missing field\(s\) \['text'\]"):
        TaskData("classification").read(missing, train=True)
    mc = write(tmp_path / "mc.jsonl", '{"context": "c", "choices": ["a", "b"], "label": 2}\n')
    with pytest.raises(DataError, match=r"mc\.jsonl:1: label 2 is not an index into 2 choices"):
        TaskData("multiple_choice").read(mc)
    score = write(tmp_path / "s.jsonl", '{"sentence1": "a", "sentence2": "b", "label": "high"}\n')
    with pytest.raises(DataError, match="is not a number"):
        TaskData("similarity").read(score)


def test_unknown_label_lists_the_label_set(tmp_path):
    sst = write(tmp_path / "dev", "1 good film .\n2 what ?\n")
    with pytest.raises(DataError, match=r"dev:2: unknown label '2'; the label set is \['0', '1'\]"):
        TaskData("sst2").read(sst)
    data = TaskData("classification")
    data.read(write(tmp_path / "train.tsv", "text\tlabel\na\tpos\nb\tneg\n"), train=True)
    with pytest.raises(DataError, match=r"unknown label 'neutral'; the label set is \['neg', 'pos'\]"):
        data.read(write(tmp_path / "dev.tsv", "text\tlabel\nc\tneutral\n"))


def test_metrics():
    data = TaskData("sst2")
    m = scores(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 1]), data)
    assert m["accuracy"] == 0.5 and m["f1"] == pytest.approx(0.5)
    assert scores(np.array([1, 1]), np.array([1, 1]), data)["f1"] == 1.0
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert spearman(x, x**3) == pytest.approx(1.0) and pearson(x, x**3) < 0.99
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 4])) == pytest.approx(0.9486833)
    sim = scores(x, -x, TaskData("similarity"))
    assert sim == {"pearson": pytest.approx(-1.0), "spearman": pytest.approx(-1.0)}
    mc = scores(np.array([0, 2, 1]), np.array([0, 2, 2]), TaskData("multiple_choice"))
    assert mc == {"accuracy": pytest.approx(2 / 3)}


def test_label_settings_are_text_and_skipped_rows_add_no_class(tmp_path):
    assert TaskData("classification", labels=[0, 1]).labels == ["0", "1"]
    with pytest.raises(ValueError, match="booleans; quote them"):
        TaskData("classification", labels=[True, False])
    data = TaskData("classification", on_error="skip")
    rows = "text\tlabel\ngood\tpos\n\tneg\nbad\tneutral\nfine\tpos\n"  # line 3: no text
    examples = data.read(write(tmp_path / "t.tsv", rows), train=True)
    assert data.labels == ["neutral", "pos"] and len(examples) == 3 and data.skipped == 1


def test_multiple_choice_needs_the_same_number_of_choices(tmp_path):
    rows = [
        {"context": "c", "choices": ["a", "b"], "label": 0},
        {"context": "d", "choices": ["a", "b", "e"], "label": 2},
    ]
    path = write(tmp_path / "mc.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"mc\.jsonl:2: 3 choices, but \S+mc\.jsonl:1 has 2"):
        TaskData("multiple_choice").read(path)
