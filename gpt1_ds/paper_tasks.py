"""GPT-1's twelve fine-tuning tasks (the paper's Tables 2-4) read from the files their publishers ship.

For each task: its framing (``tasks.KINDS``), its labels in head order, its main metric, where its
splits lie under the folder its release unpacks to, and the paper's figures. A reader yields
``(line, row)`` with the framing's fields (``tasks.DEFAULT_FIELDS``) and ``label``; a malformed row is
``{"__error__": why}`` (raised or skipped by ``TaskData``), a row the task leaves out by design (SNLI's
gold label ``-``) is ``{"__dropped__": why}`` (counted); a file of another layout is a ``LayoutError``
naming the file, the line and what was expected, before any compute.

GLUE's TSVs hold bare double quotes inside fields (MRPC, QQP): a line is split at tabs only, quotes
are text. CoLA's files have no header. RACE is a folder of JSON files, one article and its questions
each; a question becomes one example, its context the article and the question.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt1_ds.files import atomic_write_text

Rows = Iterator[tuple[int | str, dict[str, Any]]]

NLI = ["entailment", "neutral", "contradiction"]
"""MNLI's and SNLI's three classes, in the files' words."""


class LayoutError(ValueError):
    """A file that is not in its task's official layout, named with its line and what was expected."""


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    return path.read_text(encoding="utf-8-sig").replace("\r\n", "\n").split("\n")  # MRPC has a BOM


def tsv(columns: dict[str, str | int], header: bool = True) -> Callable[[Path], Rows]:
    """A tab-separated file, quotes as text: ``columns`` maps each field to its header name (or,
    without a header, its position)."""

    def read(path: Path) -> Rows:
        lines = _lines(path)
        first = lines[0].split("\t") if lines else []
        if header:
            missing = [c for c in columns.values() if c not in first]
            if missing:
                raise LayoutError(
                    f"{path}:1: expected a header naming {list(columns.values())}; it has {first[:10]} "
                    f"(missing {missing})"
                )
            index, width, body = {f: first.index(str(c)) for f, c in columns.items()}, len(first), 2
        else:
            index, body = {f: int(c) for f, c in columns.items()}, 1
            width = max(index.values()) + 1
            if len(first) < width:
                raise LayoutError(f"{path}:1: expected {width} tab-separated columns and no header")
        for n, line in enumerate(lines[body - 1 :], start=body):
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) < width:
                yield n, {"__error__": f"{len(cells)} columns, expected {width}"}
                continue
            yield n, {f: cells[i] for f, i in index.items()}

    return read


def snli(path: Path) -> Rows:
    """SNLI's ``.jsonl``: ``sentence1``, ``sentence2``, ``gold_label`` (``-``: no consensus, dropped)."""
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == 1:
                raise LayoutError(f"{path}:1: expected SNLI's JSON lines ({e.msg})") from None
            yield n, {"__error__": f"invalid JSON ({e.msg})"}
            continue
        if not isinstance(row, dict) or "gold_label" not in row:
            yield n, {"__error__": "expected an object with sentence1, sentence2 and gold_label"}
        elif row["gold_label"] == "-":
            yield n, {"__dropped__": "no gold label (-)"}
        else:
            yield (
                n,
                {
                    "premise": row.get("sentence1"),
                    "hypothesis": row.get("sentence2"),
                    "label": row["gold_label"],
                },
            )


def race(path: Path) -> Rows:
    """A RACE split (``RACE/dev``) or one level of it (``RACE/dev/middle``): JSON files of an
    ``article`` and its ``questions``, ``options`` (four each) and ``answers`` (A-D)."""
    if not path.is_dir():
        raise LayoutError(f"{path}: expected a RACE folder (RACE/train, RACE/dev/high, …) of .txt files")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise LayoutError(f"{path}: no RACE .txt files under it (middle/*.txt, high/*.txt)")
    for file in files:
        name = file.relative_to(path).as_posix()
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
            questions, options, answers = doc["questions"], doc["options"], doc["answers"]
            article = doc["article"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            yield name, {"__error__": f"not a RACE article ({type(e).__name__}: {e})"}
            continue
        for q, (question, choices, answer) in enumerate(zip(questions, options, answers, strict=False)):
            label = "ABCD".find(answer) if isinstance(answer, str) and len(answer) == 1 else -1
            where = f"{name} question {q + 1}"
            if label < 0 or label >= len(choices):
                yield where, {"__error__": f"answer {answer!r} is not one of A-{'ABCD'[len(choices) - 1]}"}
                continue
            yield where, {"context": f"{article} {question}", "choices": list(choices), "label": label}


STORY_COLUMNS = [f"InputSentence{i}" for i in range(1, 5)] + [
    "RandomFifthSentenceQuiz1",
    "RandomFifthSentenceQuiz2",
    "AnswerRightEnding",
]


def storycloze(path: Path) -> Rows:
    """The Story Cloze Test's 2016 CSV (real CSV quoting): four sentences, two endings, the right one."""
    with open(path, encoding="utf-8", newline="") as f:  # a missing file: FileNotFoundError, named
        rows = csv.reader(f)
        header = next(rows, [])
        missing = [c for c in STORY_COLUMNS if c not in header]
        if missing:
            raise LayoutError(f"{path}:1: expected the Story Cloze header {STORY_COLUMNS}; missing {missing}")
        index = {c: header.index(c) for c in STORY_COLUMNS}
        for n, cells in enumerate(rows, start=2):
            if not cells:
                continue
            if len(cells) < len(header):
                yield n, {"__error__": f"{len(cells)} columns, expected {len(header)}"}
                continue
            story = " ".join(cells[index[f"InputSentence{i}"]] for i in range(1, 5))
            endings = [cells[index["RandomFifthSentenceQuiz1"]], cells[index["RandomFifthSentenceQuiz2"]]]
            right = cells[index["AnswerRightEnding"]]
            label = int(right) - 1 if right in ("1", "2") else right
            yield n, {"context": story, "choices": endings, "label": label}


def sst2(path: Path) -> Rows:
    """GLUE's ``sentence<TAB>label`` TSV, or the embedded ``LABEL SENTENCE`` lines."""
    lines = _lines(path)
    if lines and lines[0].split("\t")[:2] == ["sentence", "label"]:
        yield from tsv({"text": "sentence", "label": "label"})(path)
        return
    for n, line in enumerate(lines, start=1):
        if line.strip():
            label, _, sentence = line.partition(" ")
            yield n, {"label": label, "text": sentence}


@dataclass(frozen=True)
class Spec:
    """One of the paper's tasks."""

    kind: str
    """Its framing (``tasks.KINDS``)."""
    read: Callable[[Path], Rows]
    """Its reader (a file, or RACE's folder)."""
    labels: list[str] | None
    """Class names in head order, as the files spell them (None: a regression score or choices)."""
    metric: str
    """The metric the paper reports (and the best checkpoint is chosen by)."""
    splits: dict[str, str]
    """Split → path under the task's folder (``--tasks-dir``: the folders the releases unpack to)."""
    paper: dict[str, float] = field(default_factory=dict)
    """The paper's figures: split (``test``; MNLI ``matched``/``mismatched``; RACE ``middle``/``high``/
    ``all``) → value."""
    similarity: str = "regression"
    """A similarity task's head: ``binary`` (two classes) or ``regression`` (one score)."""
    embedded: dict[str, str] = field(default_factory=dict)
    """The splits as gpt1-ds embeds them (``data/glue``: SST-2 and RTE), found where the release's are not."""


ENTAIL = ["entailment", "not_entailment"]

PAPER_TASKS: dict[str, Spec] = {
    "snli": Spec(
        "entailment",
        snli,
        NLI,
        "accuracy",
        {
            "train": "snli_1.0/snli_1.0_train.jsonl",
            "dev": "snli_1.0/snli_1.0_dev.jsonl",
            "test": "snli_1.0/snli_1.0_test.jsonl",
        },
        {"test": 89.9},
    ),
    "mnli": Spec(
        "entailment",
        tsv({"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}),
        NLI,
        "accuracy",
        {
            "train": "MNLI/train.tsv",
            "dev": "MNLI/dev_matched.tsv",
            "dev_mismatched": "MNLI/dev_mismatched.tsv",
        },
        {"matched": 82.1, "mismatched": 81.4},
    ),
    "qnli": Spec(
        "entailment",
        tsv({"premise": "question", "hypothesis": "sentence", "label": "label"}),
        ENTAIL,
        "accuracy",
        {"train": "QNLI/train.tsv", "dev": "QNLI/dev.tsv"},
        {"test": 88.1},
    ),
    "scitail": Spec(
        "entailment",
        tsv({"premise": 0, "hypothesis": 1, "label": 2}, header=False),
        ["entails", "neutral"],
        "accuracy",
        {
            "train": "SciTailV1.1/tsv_format/scitail_1.0_train.tsv",
            "dev": "SciTailV1.1/tsv_format/scitail_1.0_dev.tsv",
            "test": "SciTailV1.1/tsv_format/scitail_1.0_test.tsv",
        },
        {"test": 88.3},
    ),
    "rte": Spec(
        "entailment",
        tsv({"premise": "sentence1", "hypothesis": "sentence2", "label": "label"}),
        ENTAIL,
        "accuracy",
        {"train": "RTE/train.tsv", "dev": "RTE/dev.tsv"},
        {"test": 56.0},
        embedded={"train": "rte/train.tsv", "dev": "rte/dev.tsv"},
    ),
    "storycloze": Spec(
        "multiple_choice",
        storycloze,
        None,
        "accuracy",
        {
            "train": "StoryCloze/cloze_test_val__spring2016 - cloze_test_ALL_val.csv",
            "test": "StoryCloze/cloze_test_test__spring2016 - cloze_test_ALL_test.csv",
        },
        {"test": 86.5},
    ),
    "race": Spec(
        "multiple_choice",
        race,
        None,
        "accuracy",
        {"train": "RACE/train", "dev": "RACE/dev", "test": "RACE/test"},
        {"middle": 62.9, "high": 57.4, "all": 59.0},
    ),
    "cola": Spec(
        "classification",
        tsv({"text": 3, "label": 1}, header=False),
        ["0", "1"],
        "matthews",
        {"train": "CoLA/train.tsv", "dev": "CoLA/dev.tsv"},
        {"test": 45.4},
    ),
    "sst2": Spec(
        "classification",
        sst2,
        ["0", "1"],
        "accuracy",
        {"train": "SST-2/train.tsv", "dev": "SST-2/dev.tsv"},
        {"test": 91.3},
        embedded={"train": "sst2/stsa.binary.train", "dev": "sst2/stsa.binary.dev"},
    ),
    "mrpc": Spec(
        "similarity",
        tsv({"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
        None,
        "f1",
        {"train": "MRPC/train.tsv", "dev": "MRPC/dev.tsv"},
        {"test": 82.3},
        similarity="binary",
    ),
    "stsb": Spec(
        "similarity",
        tsv({"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
        None,
        "pearson",
        {"train": "STS-B/train.tsv", "dev": "STS-B/dev.tsv"},
        {"test": 82.0},
    ),
    "qqp": Spec(
        "similarity",
        tsv({"sentence1": "question1", "sentence2": "question2", "label": "is_duplicate"}),
        None,
        "f1",
        {"train": "QQP/train.tsv", "dev": "QQP/dev.tsv"},
        {"test": 70.3},
        similarity="binary",
    ),
}
"""The paper's twelve tasks (RACE's middle and high levels scored apart), in its tables' order."""

STORY_SPLIT_SEED = 1234
"""The seed of the Story Cloze validation file's 90/10 split into train and dev."""


def find(tasks_dir: Path, task: str) -> dict[str, Path] | None:
    """The task's splits under ``tasks_dir`` (or its ``glue_data``), in the release's layout or as
    gpt1-ds embeds them; None when its training or dev file is missing."""
    spec = PAPER_TASKS[task]
    needed = ("train",) if task == "storycloze" else ("train", "dev")
    for root in (tasks_dir, tasks_dir / "glue_data"):
        for layout in (spec.splits, spec.embedded):
            paths = {split: root / rel for split, rel in layout.items()}
            if layout and all(split in paths and paths[split].exists() for split in needed):
                return {split: path for split, path in paths.items() if path.exists()}
    return None


def story_split(val_csv: Path, out: Path) -> dict[str, Path]:
    """The Story Cloze validation file cut into train (90%) and dev (10%) by ``STORY_SPLIT_SEED``."""
    lines = val_csv.read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = lines[0], [r for r in lines[1:] if r.strip()]
    order = list(range(len(rows)))
    random.Random(STORY_SPLIT_SEED).shuffle(order)
    cut = max(1, len(rows) // 10)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.csv", "dev": out / "dev.csv"}
    atomic_write_text(paths["dev"], header + "".join(rows[i] for i in sorted(order[:cut])))
    atomic_write_text(paths["train"], header + "".join(rows[i] for i in sorted(order[cut:])))
    return paths
