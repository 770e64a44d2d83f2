"""gpt1_ds.zero_shot: GPT-1's §5 heuristics, each against the model's log-probabilities computed one
sequence at a time, on files in each task's official layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_evaluate import tiny_gpt
from test_paper_tasks import FILES, write, write_race

from gpt1_ds import zero_shot
from gpt1_ds.paper_tasks import find, story_split
from gpt1_ds.tasks import GLUE, TaskData, matthews
from gpt1_ds.tokenizer import MODEL_NAME, load_tokenizer

SST2_DEV = GLUE / "sst2" / "stsa.binary.dev"


@pytest.fixture(scope="module")
def tok(prepared):
    return load_tokenizer(prepared / MODEL_NAME)


def one_by_one(model, tok, context: str, continuation: str) -> tuple[float, int]:
    """log p(continuation | <eod> context) from one unpadded forward pass, and its token count."""
    ctx = [tok.eod_id, *tok.encode(tok.normalize(context))]
    cont = tok.encode(tok.normalize(continuation))
    seq = (ctx + cont)[-(model.config.n_positions + 1) :]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0], -1)
    n = min(len(cont), len(seq) - 1)
    return sum(logp[len(seq) - 1 - n + i, w].item() for i, w in enumerate(seq[len(seq) - n :])), n


def test_continuations_are_scored_as_one_sequence_each_whatever_the_batch(tok):
    model = tiny_gpt(tok.vocab_size, n_positions=64)
    long = " ".join(["the ship sailed on"] * 40)  # longer than the context: its start is cut
    pairs = [
        ("a fine film very", "positive"),
        ("", "Our friends won't buy this."),
        (long, "and on"),
        ("x", ""),
    ]
    sums, counts = zero_shot.continuation_logprobs(model, tok, pairs, batch_size=3)
    for (ctx, cont), got, n in zip(pairs, sums, counts, strict=True):
        expected, expected_n = one_by_one(model, tok, ctx, cont)
        assert n == expected_n and got == pytest.approx(expected, rel=1e-5, abs=1e-6), (ctx[:20], cont)
    assert tok.encode("a fine film very positive") == [
        *tok.encode("a fine film very"),
        *tok.encode("positive"),
    ]
    scores = zero_shot.choice_logprobs(model, tok, ["a fine film very", "dull"], ("negative", "positive"))
    assert scores.shape == (2, 2) and scores[0, 1] == pytest.approx(sums[0], rel=1e-5)


def test_sst2_compares_positive_with_negative_after_very(tok):
    model = tiny_gpt(tok.vocab_size, n_positions=64)
    result = zero_shot.score("sst2", model, tok, {"dev": SST2_DEV}, limit=60)
    examples = TaskData("sst2").read(SST2_DEV)[:60]
    predicted = [
        int(
            one_by_one(model, tok, f"{e.texts[0]} very", "positive")[0]
            > one_by_one(model, tok, f"{e.texts[0]} very", "negative")[0]
        )
        for e in examples
    ]
    labels = [int(e.label) for e in examples]
    assert result["metric"] == "accuracy" and result["examples"] == 60
    assert result["accuracy"] == pytest.approx(np.mean(np.array(predicted) == labels))
    assert result["predicted_positive"] == pytest.approx(np.mean(predicted))
    assert result["majority"] == pytest.approx(max(np.mean(labels), 1 - np.mean(labels)))


@pytest.mark.parametrize("task", ["race", "storycloze"])
def test_multiple_choice_picks_the_highest_average_token_log_probability(task, tok, tmp_path):
    if task == "race":
        shutil.copytree(write_race(tmp_path), tmp_path / "RACE" / "train")
    else:
        val = write(tmp_path, "storycloze")
        rows = val.read_text().splitlines()
        val.write_text(
            "\n".join([rows[0], *(rows[1 + i % 2].replace("a1,", f"s{i},") for i in range(20))]) + "\n"
        )
    paths = find(tmp_path, task)
    if task == "storycloze":
        paths = story_split(paths["train"], tmp_path / "split")
    model = tiny_gpt(tok.vocab_size, n_positions=64, seed=3)
    result = zero_shot.score(task, model, tok, paths)
    examples = TaskData(task).read(paths["dev"])
    right = 0
    for e in examples:
        average = [np.divide(*one_by_one(model, tok, e.texts[0], choice)) for choice in e.texts[1]]
        right += int(np.argmax(average)) == int(e.label)
    assert result["metric"] == "accuracy" and result["examples"] == len(examples) > 0
    assert result["accuracy"] == pytest.approx(right / len(examples))
    assert result["chance"] == pytest.approx(np.mean([1 / len(e.texts[1]) for e in examples]))
    assert result["file"] == str(paths["dev"])


def test_cola_thresholds_the_average_log_probability_where_training_correlates_best(tok, tmp_path):
    dev = write(tmp_path, "cola")
    lines = FILES["cola"][1].splitlines()
    sentences = ["The cat sat.", "Sat cat the.", "It rained all day.", "Day all rained it.", "We left early."]
    extra = [f"x\t{1 - i % 2}\t\t{s}" for i, s in enumerate(sentences)]
    (dev.parent / "train.tsv").write_text("\n".join([*lines, *extra]) + "\n")
    paths = find(tmp_path, "cola")
    model = tiny_gpt(tok.vocab_size, n_positions=64, seed=1)
    result = zero_shot.score("cola", model, tok, paths)
    average = lambda ex: np.array([np.divide(*one_by_one(model, tok, "", e.texts[0])) for e in ex])  # noqa: E731
    train, test = TaskData("cola").read(paths["train"]), TaskData("cola").read(paths["dev"])
    fitted, y = average(train), np.array([int(e.label) for e in train])
    best = max(matthews((fitted >= t).astype(int), y) for t in fitted)
    assert matthews((fitted >= result["threshold"] - 1e-6).astype(int), y) == pytest.approx(best)
    predicted = (average(test) >= result["threshold"] - 1e-6).astype(int)
    assert result["matthews"] == pytest.approx(matthews(predicted, np.array([int(e.label) for e in test])))
    assert result["metric"] == "matthews" and result["examples"] == 2 and result["threshold_examples"] == 7
