"""GPT-1's zero-shot heuristics (paper §5, Figure 2 right): a pretrained language model scored on
tasks it was never fine-tuned for, from its log-probabilities alone.

    sst2        each sentence followed by " very"; " positive" against " negative", the likelier one
                is the prediction (accuracy)
    cola        a sentence's average token log-probability above a threshold: acceptable (Matthews
                correlation); the paper does not say how it set the threshold: here the one that
                maximises the correlation on the task's training file (docs/FIDELITY.md)
    race        the answer with the highest average token log-probability after the article and the
                question (accuracy)
    storycloze  the same for the two endings after the four sentences (accuracy; not among the
                paper's §5 tasks, the same heuristic as RACE's)

The paper's fourth heuristic, DPRD's Winograd schemas, has no reader here. Every figure is on the
task's dev file (``paths["dev"]``), the examples read as fine-tuning reads them (``tasks.TaskData``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt1_ds.model import GPT
from gpt1_ds.tasks import SST2_WORDS, Example, TaskData, matthews
from gpt1_ds.tokenizer import SentencePieceTokenizer


@torch.no_grad()
def continuation_logprobs(
    model: GPT, tok: SentencePieceTokenizer, pairs: list[tuple[str, str]], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Per (context, continuation): log p(" " + continuation | <eod> context) summed over the
    continuation's tokens, and their count. Our pieces never cross a word start, so
    ids(context + " " + continuation) = ids(context) + ids(continuation). A sequence longer than the
    model's context keeps its end (the continuation, then as much context as fits)."""
    device = next(model.parameters()).device
    n_ctx = model.config.n_positions
    encode = lambda text: tok.encode(tok.normalize(text))  # noqa: E731 (prepared as training text was)
    rows = [([tok.eod_id, *encode(ctx)], encode(cont)) for ctx, cont in pairs]
    sums, counts = [], []
    for i in range(0, len(rows), batch_size):
        group = [(ctx + cont)[-(n_ctx + 1) :] for ctx, cont in rows[i : i + batch_size]]
        lengths = [
            min(len(cont), len(seq) - 1)
            for (_, cont), seq in zip(rows[i : i + batch_size], group, strict=True)
        ]
        width = max(len(g) for g in group) - 1
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -100, dtype=torch.long)
        for r, (seq, n) in enumerate(zip(group, lengths, strict=True)):
            x[r, : len(seq) - 1] = torch.tensor(seq[:-1])
            y[r, len(seq) - 1 - n : len(seq) - 1] = torch.tensor(seq[len(seq) - n :])
        logp = model(x.to(device)).float().log_softmax(-1)  # [B, T, V]
        picked = logp.gather(-1, y.clamp(min=0).to(device)[..., None])[..., 0]
        sums += picked.masked_fill(y.to(device) < 0, 0).sum(-1).tolist()
        counts += lengths
    return np.asarray(sums), np.asarray(counts)


def choice_logprobs(
    model: GPT,
    tok: SentencePieceTokenizer,
    contexts: list[str],
    choices: tuple[str, ...],
    batch_size: int = 32,
) -> np.ndarray:
    """[N, C]: log p(" " + choice | <eod> context) summed over the choice's tokens, the same
    ``choices`` after every context."""
    pairs = [(ctx, c) for ctx in contexts for c in choices]
    sums, _ = continuation_logprobs(model, tok, pairs, batch_size)
    return sums.reshape(len(contexts), len(choices))


def _examples(task: str, path: Path, limit: int | None) -> tuple[list[Example], np.ndarray]:
    examples = TaskData(task).read(path)[:limit]
    return examples, np.array([int(e.label) for e in examples])


def sst2(model: GPT, tok: SentencePieceTokenizer, paths: dict[str, Path], limit: int | None) -> dict:
    """Accuracy of " very" → " positive" / " negative"; the majority class's and the share predicted
    positive beside it."""
    examples, labels = _examples("sst2", paths["dev"], limit)
    scores = choice_logprobs(model, tok, [f"{e.texts[0]} very" for e in examples], SST2_WORDS)
    predicted = scores.argmax(1)
    return dict(
        metric="accuracy",
        accuracy=float(np.mean(predicted == labels)),
        majority=float(max(np.mean(labels), 1 - np.mean(labels))),
        predicted_positive=float(np.mean(predicted == 1)),
        examples=len(examples),
    )


def multiple_choice(task: str) -> Callable[..., dict]:
    """The RACE heuristic for ``task``: the choice of highest average token log-probability."""

    def score(model: GPT, tok: SentencePieceTokenizer, paths: dict[str, Path], limit: int | None) -> dict:
        examples, labels = _examples(task, paths["dev"], limit)
        pairs = [(e.texts[0], choice) for e in examples for choice in e.texts[1]]
        sums, counts = continuation_logprobs(model, tok, pairs)
        average, start, predicted = sums / np.maximum(counts, 1), 0, []
        for e in examples:
            predicted.append(int(np.argmax(average[start : start + len(e.texts[1])])))
            start += len(e.texts[1])
        chance = float(np.mean([1 / len(e.texts[1]) for e in examples]))
        accuracy = float(np.mean(np.array(predicted) == labels))
        return dict(metric="accuracy", accuracy=accuracy, chance=chance, examples=len(examples))

    return score


TRAIN_EXAMPLES_FOR_THRESHOLD = 2000
"""CoLA: the training examples (the file's first) the threshold is chosen on."""


def cola(model: GPT, tok: SentencePieceTokenizer, paths: dict[str, Path], limit: int | None) -> dict:
    """Matthews correlation of "average token log-probability > threshold", the threshold chosen on
    the training file."""
    train, train_labels = _examples("cola", paths["train"], TRAIN_EXAMPLES_FOR_THRESHOLD)
    dev, labels = _examples("cola", paths["dev"], limit)
    average = lambda ex: np.divide(*continuation_logprobs(model, tok, [("", e.texts[0]) for e in ex]))  # noqa: E731
    fitted = average(train)
    candidates = np.unique(fitted)
    threshold = max(candidates, key=lambda t: matthews((fitted >= t).astype(int), train_labels))
    predicted = (average(dev) >= threshold).astype(int)
    return dict(
        metric="matthews",
        matthews=float(matthews(predicted, labels)),
        threshold=float(threshold),
        threshold_examples=len(train),
        examples=len(dev),
    )


HEURISTICS: dict[str, Callable[..., dict[str, Any]]] = {
    "sst2": sst2,
    "cola": cola,
    "race": multiple_choice("race"),
    "storycloze": multiple_choice("storycloze"),
}
"""The paper's tasks with a zero-shot heuristic: task → scorer(model, tokenizer, paths, limit)."""


def score(
    task: str, model: GPT, tok: SentencePieceTokenizer, paths: dict[str, Path], limit: int | None = None
) -> dict[str, Any]:
    """One task's zero-shot figures: ``metric``, that metric's value under its name, ``examples``,
    and the task's baselines (``majority``, ``chance``) or fitted ``threshold``."""
    model.eval()
    return {"task": task, **HEURISTICS[task](model, tok, paths, limit), "file": str(paths["dev"])}
