"""Fine-tuning data: the four GPT-1 task framings, their readers, batches and metrics.

Every example becomes K token sequences (K = 1, 2 for similarity, the number of
choices for multiple choice), framed with the tokenizer's control tokens:

    classification    <start> text <extract>
    entailment        <start> premise <delim> hypothesis <extract>
    similarity        <start> a <delim> b <extract>  and  <start> b <delim> a <extract>
    multiple choice   <start> context <delim> choice_i <extract>   for each i

The task head reads the last layer's state at ``<extract>``. A framed sequence longer than the model's
context is cut so that each segment keeps its beginning (``TRUNCATIONS``): by default as GPT-1's code
cut it, each segment to its own fixed share of the room left after the control tokens; or with one
budget for the whole sequence, a short segment giving what it does not need to the longer ones
(docs/FIDELITY.md).
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt1_ds.env import REPO
from gpt1_ds.model import IGNORE_INDEX
from gpt1_ds.paper_tasks import PAPER_TASKS

log = logging.getLogger(__name__)

GLUE = REPO / "data" / "glue"
"""The embedded SST-2 and RTE files (``data/glue/README.md``)."""
SST2_WORDS = ("negative", "positive")  # GPT-1's zero-shot SST-2 words: label 0, label 1

KINDS = ("classification", "entailment", "similarity", "multiple_choice")
TASKS = {**{name: spec.kind for name, spec in PAPER_TASKS.items()}, **{k: k for k in KINDS}}
"""Task name → framing: the paper's tasks read from their official files (``gpt1_ds.paper_tasks``),
and the four framings over generic jsonl or tsv files."""
DEFAULT_FIELDS = {
    "classification": ["text"],
    "entailment": ["premise", "hypothesis"],
    "similarity": ["sentence1", "sentence2"],
    "multiple_choice": ["context", "choices"],
}
FIXED_LABELS = {name: spec.labels for name, spec in PAPER_TASKS.items() if spec.labels is not None}


class DataError(ValueError):
    """A malformed row or an unknown label, named by file and line."""


@dataclass(frozen=True)
class Example:
    """One labelled example: its text segments and its label (a class index, or a score)."""

    texts: tuple[Any, ...]  # (text,); entailment, similarity: (a, b); multiple choice: (context, choices)
    label: float
    where: str  # ``file:line`` for messages


@dataclass
class TaskData:
    """How a task's files are read: format, fields and the label set."""

    task: str  # a paper task (``PAPER_TASKS``: sst2, rte, mnli, …) or a framing (classification, …)
    fields: list[str] | None = None  # text fields of a jsonl/tsv row (default per framing: DEFAULT_FIELDS)
    label_field: str = "label"
    labels: list[str] | None = None  # class names in head order; None: the sorted labels of the training file
    similarity: str = "regression"  # the head: regression (one score, MSE) or binary (two classes)
    on_error: str = "raise"  # malformed rows: raise (error naming file and line) or skip (counted, logged)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be raise or skip, got {self.on_error!r}")
        if self.similarity not in ("regression", "binary"):
            raise ValueError(f"similarity must be regression or binary, got {self.similarity!r}")
        if self.task in PAPER_TASKS and self.kind == "similarity":
            self.similarity = PAPER_TASKS[self.task].similarity  # the task's head: MRPC and QQP binary
        if self.labels is None and self.task in FIXED_LABELS:
            self.labels = list(FIXED_LABELS[self.task])
        elif self.labels is not None:
            if any(isinstance(x, bool) for x in self.labels):
                raise ValueError(f"labels {self.labels}: YAML read yes/no as booleans; quote them")
            self.labels = [str(x) for x in self.labels]  # labels=[0,1] as in the files' text
        self.fields = self.fields or list(DEFAULT_FIELDS[self.kind])
        self.skipped = self.dropped = 0

    @property
    def kind(self) -> str:
        return TASKS[self.task]

    @property
    def regression(self) -> bool:
        return self.kind == "similarity" and self.similarity == "regression"

    @property
    def num_outputs(self) -> int:
        """Width of the head: classes, 1 for a regression score, 1 per choice for multiple choice."""
        if self.kind == "multiple_choice" or self.regression:
            return 1
        if self.kind == "similarity":
            return 2
        assert self.labels is not None
        return len(self.labels)

    def read(self, path: str | Path, train: bool = False) -> list[Example]:
        """Examples of one file. The training file fixes the label set when none was given."""
        path = Path(path)
        raw = list(self._rows(path))
        if train and self.labels is None and self.kind in ("classification", "entailment"):
            # the labels of the rows that are whole (a skipped row must not add a class)
            self.labels = sorted({str(row[self.label_field]) for _, row in raw if self._whole(row)})
            log.info("labels from %s: %s", path, self.labels)
        out, dropped = [], []
        for line, row in raw:
            where = f"{path}/{line}" if isinstance(line, str) else f"{path}:{line}"
            if "__dropped__" in row:
                dropped.append(row["__dropped__"])
                continue
            try:
                example = self._example(row, where)
                if out and self.kind == "multiple_choice" and len(example.texts[1]) != len(out[0].texts[1]):
                    raise DataError(
                        f"{where}: {len(example.texts[1])} choices, but {out[0].where} has "
                        f"{len(out[0].texts[1])}; every example needs the same number"
                    )
                out.append(example)
            except DataError as e:
                if self.on_error == "raise":
                    raise
                self.skipped += 1
                log.warning("skipping %s", e)
        if dropped:
            self.dropped += len(dropped)
            log.info("%s: %d rows left out, as the task is scored (%s)", path, len(dropped), dropped[0])
        if not out:
            raise DataError(f"{path}: no examples")
        return out

    def _whole(self, row: dict[str, Any]) -> bool:
        """Not malformed, every field present and every text non-empty."""
        present = "__error__" not in row and all(f in row for f in [*self.fields, self.label_field])
        return present and all(isinstance(row[f], str) and row[f].strip() for f in self.fields)

    def _rows(self, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, row) pairs; format from the task or the file name."""
        if self.task in PAPER_TASKS:
            yield from PAPER_TASKS[self.task].read(path)
            return
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        opener = gzip.open if path.suffix == ".gz" else open
        name = path.name.removesuffix(".gz")
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            lines = list(enumerate(f, start=1))
        nonblank = [(n, text) for n, text in lines if text.strip()]
        if name.endswith(".jsonl") or name.endswith(".json"):
            for n, text in nonblank:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    row = {"__error__": f"invalid JSON ({e.msg})"}
                yield n, row if isinstance(row, dict) else {"__error__": "a row must be a JSON object"}
        else:  # tsv with a header row (GLUE); quotes are text, not quoting
            rows = csv.reader((t for _, t in lines), delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(rows, None)
            if header is None:
                raise DataError(f"{path}: empty file")
            for (n, _), cells in zip(lines[1:], rows, strict=True):
                if not cells:
                    continue
                if len(cells) != len(header):
                    yield n, {"__error__": f"{len(cells)} columns, the header has {len(header)}"}
                    continue
                yield n, dict(zip(header, cells, strict=True))

    def _example(self, row: dict[str, Any], where: str) -> Example:
        if "__error__" in row:
            raise DataError(f"{where}: malformed row: {row['__error__']}")
        missing = [f for f in [*self.fields, self.label_field] if f not in row]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; the row has {sorted(row)}")
        texts = tuple(row[f] for f in self.fields)
        raw_label = row[self.label_field]
        if self.kind == "multiple_choice":
            context, choices = texts
            strings = isinstance(choices, list) and all(isinstance(c, str) for c in choices)
            if not strings or len(choices) < 2:
                raise DataError(f"{where}: {self.fields[1]} must be a list of at least two strings")
            if not isinstance(raw_label, int) or not 0 <= raw_label < len(choices):
                raise DataError(f"{where}: label {raw_label!r} is not an index into {len(choices)} choices")
            return Example((str(context), tuple(choices)), float(raw_label), where)
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise DataError(f"{where}: empty or non-text field among {self.fields}")
        if self.regression:
            try:
                return Example(texts, float(raw_label), where)
            except (TypeError, ValueError):
                raise DataError(f"{where}: similarity score {raw_label!r} is not a number") from None
        if self.kind == "similarity":  # binary
            if str(raw_label) not in ("0", "1"):
                raise DataError(f"{where}: binary similarity label {raw_label!r} is not 0 or 1")
            return Example(texts, float(raw_label), where)
        assert self.labels is not None
        if str(raw_label) not in self.labels:
            raise DataError(f"{where}: unknown label {raw_label!r}; the label set is {self.labels}")
        return Example(texts, float(self.labels.index(str(raw_label))), where)


TRUNCATIONS = ("gpt1", "shared")
"""How a framed sequence longer than the context is cut: ``gpt1`` (each segment to a fixed share,
``segment_budget``) or ``shared`` (one budget for all the segments, ``fit_segments``)."""


def segment_budget(n_segments: int, n_ctx: int) -> int:
    """GPT-1's fixed budget of each segment: the context less the control tokens, divided equally.
    For two segments and an even ``n_ctx`` this is the original's ``n_ctx // 2 - 2`` (254 of 512); for an
    odd ``n_ctx`` one more, which still fits (the original leaves two positions unused)."""
    return (n_ctx - n_segments - 1) // n_segments


def fit_segments(lengths: list[int], budget: int) -> list[int]:
    """How many tokens each segment keeps so that they sum to at most ``budget``: short
    segments stay whole, the longer ones share the rest equally."""
    if sum(lengths) <= budget:
        return list(lengths)
    keep, left, n = [0] * len(lengths), budget, len(lengths)
    for done, i in enumerate(sorted(range(n), key=lambda i: lengths[i])):  # the shortest first
        keep[i] = min(lengths[i], left // (n - done))
        left -= keep[i]
    return keep


def frame(
    segments: list[list[int]], start: int, delim: int, extract: int, n_ctx: int, truncation: str = "gpt1"
) -> list[int]:
    """``<start> s0 <delim> s1 ... <extract>``, cut to ``n_ctx`` tokens by the rule ``truncation``
    (``TRUNCATIONS``); each segment keeps its start."""
    budget = n_ctx - len(segments) - 1
    if budget < len(segments):
        raise ValueError(f"a context of {n_ctx} tokens cannot hold {len(segments)} framed segments")
    lengths = [len(s) for s in segments]
    if truncation == "gpt1":
        keep = [min(n, segment_budget(len(segments), n_ctx)) for n in lengths]
    elif truncation == "shared":
        keep = fit_segments(lengths, budget)
    else:
        raise ValueError(f"truncation must be {' or '.join(TRUNCATIONS)}, got {truncation!r}")
    ids = [start]
    for i, (seg, k) in enumerate(zip(segments, keep, strict=True)):
        ids += [delim, *seg[:k]] if i else seg[:k]
    return [*ids, extract]


@dataclass
class Encoded:
    """An example as token sequences: K framed sequences and the label."""

    sequences: list[list[int]]
    label: float


def encode(
    examples: list[Example], data: TaskData, tok: Any, n_ctx: int, truncation: str = "gpt1"
) -> list[Encoded]:
    """Tokenize and frame every example (``tok``: ``gpt1_ds.tokenizer.Tokenizer``), cut to ``n_ctx``
    tokens by the rule ``truncation`` (``TRUNCATIONS``)."""
    # Texts recur (both orders of a pair, the context of every choice); each is prepared as the
    # tokenizer's training text was (ftfy, lower-casing if the corpus was) before it is encoded.
    ids = functools.cache(lambda text: tok.encode(tok.normalize(text)))

    def framed(*texts: str) -> list[int]:
        return frame([ids(t) for t in texts], tok.start_id, tok.delim_id, tok.extract_id, n_ctx, truncation)

    def sequences(texts: tuple[Any, ...]) -> list[list[int]]:
        if data.kind == "classification":
            return [framed(texts[0])]
        if data.kind == "entailment":
            return [framed(texts[0], texts[1])]
        if data.kind == "similarity":
            return [framed(texts[0], texts[1]), framed(texts[1], texts[0])]
        return [framed(texts[0], choice) for choice in texts[1]]  # multiple choice

    return [Encoded(sequences(ex.texts), ex.label) for ex in examples]


def collate(items: list[Encoded], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    """A padded batch: ``input_ids`` [B, K, T], ``extract_pos`` [B, K] (last real token),
    ``lm_targets`` [B, K, T] (next token, IGNORE_INDEX past the end), ``labels`` [B]."""
    K = len(items[0].sequences)
    if any(len(it.sequences) != K for it in items):
        raise ValueError("every example of a batch needs the same number of sequences (choices)")
    B, T = len(items), max(len(s) for it in items for s in it.sequences)
    input_ids = torch.full((B, K, T), pad_id, dtype=torch.long)
    lm_targets = torch.full((B, K, T), IGNORE_INDEX, dtype=torch.long)
    extract_pos = torch.zeros(B, K, dtype=torch.long)
    for b, it in enumerate(items):
        for k, seq in enumerate(it.sequences):
            n = len(seq)
            input_ids[b, k, :n] = torch.tensor(seq)
            lm_targets[b, k, : n - 1] = torch.tensor(seq[1:])
            extract_pos[b, k] = n - 1
    labels = torch.tensor([it.label for it in items], dtype=torch.float32 if regression else torch.long)
    return {"input_ids": input_ids, "extract_pos": extract_pos, "lm_targets": lm_targets, "labels": labels}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1 with ties averaged (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]][: len(x)]  # where each run of equal values starts
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(first) - 1]
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc**2).sum() * (yc**2).sum()))
    return float((xc * yc).sum() / denom) if denom else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


def scores(predictions: np.ndarray, labels: np.ndarray, data: TaskData) -> dict[str, float]:
    """accuracy (+ F1 of class 1 for two classes, and Matthews's correlation where it is the task's
    metric); Pearson and Spearman for regression."""
    if data.regression:
        return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}
    predictions, labels = predictions.astype(np.int64), labels.astype(np.int64)
    out = {"accuracy": float((predictions == labels).mean())}
    if data.kind != "multiple_choice" and data.num_outputs == 2:
        tp = float(((predictions == 1) & (labels == 1)).sum())
        fp = float(((predictions == 1) & (labels == 0)).sum())
        fn = float(((predictions == 0) & (labels == 1)).sum())
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if main_metric(data) == "matthews":
            out["matthews"] = matthews(predictions, labels)
    return out


def main_metric(data: TaskData) -> str:
    """The metric that picks the best checkpoint: the paper's for its tasks."""
    if data.task in PAPER_TASKS:
        return PAPER_TASKS[data.task].metric
    return "pearson" if data.regression else "accuracy"


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation of two classes (0 where a class is never predicted or never true)."""
    p, y = predictions.astype(bool), labels.astype(bool)
    tp, tn, fp, fn = (float((a & b).sum()) for a, b in ((p, y), (~p, ~y), (p, ~y), (~p, y)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0
