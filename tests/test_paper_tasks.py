"""gpt1_ds.paper_tasks: the paper's tasks from files in their publishers' layouts (written here, a few
rows each with the awkward cases), their labels and framings, and their metrics against references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from gpt1_ds.paper_tasks import PAPER_TASKS, LayoutError
from gpt1_ds.tasks import DataError, TaskData, main_metric, scores

MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)


def mnli_row(i: int, a: str, b: str, label: str) -> str:
    return f"{i}\t1\t{i}n\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}\t{label}\t{label}"


FILES = {
    "mnli": (
        "MNLI/dev_matched.tsv",
        "\n".join(
            [
                MNLI_HEADER,
                mnli_row(0, 'He said "stop.', "He spoke.", "entailment"),  # a bare quote: text
                mnli_row(1, "The cat sat.", "No cat sat.", "contradiction"),
                mnli_row(2, "It rained.", "It was cold.", "neutral"),
            ]
        )
        + "\n",
    ),
    "qnli": (
        "QNLI/dev.tsv",
        "index\tquestion\tsentence\tlabel\n0\tWho won?\tThe team won.\tentailment\n"
        "1\tWhen?\tIt was red.\tnot_entailment\n",
    ),
    "rte": (
        "RTE/dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\tA dog ran.\tAn animal ran.\tentailment\n"
        "1\tA dog ran.\tA cat slept.\tnot_entailment\n",
    ),
    "mrpc": (
        "MRPC/dev.tsv",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t11\t12\tHe said "we will win.\tHe said they would win.\n'
        "0\t13\t14\tStocks fell.\tThe weather was fine.\n",
    ),
    "qqp": (
        "QQP/dev.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        '0\t1\t2\tHow do I learn "Python?\tWhat is the way to learn Python?\t1\n'
        "1\t3\t4\tWhy is the sky blue?\tHow tall is Everest?\t0\n",
    ),
    "stsb": (
        "STS-B/dev.tsv",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man plays.\tA man is playing.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA cat eats.\tA car drives.\t0.250\n",
    ),
    "cola": (
        "CoLA/dev.tsv",  # no header; the third column is empty or the original's mark
        "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
    ),
    "sst2": ("SST-2/dev.tsv", "sentence\tlabel\nit 's a charming journey . \t1\na dull , \"flat film \t0\n"),
    "scitail": (
        "SciTailV1.1/tsv_format/scitail_1.0_dev.tsv",
        "Plants make food.\tPlants produce food.\tentails\nRocks are hard.\tWater is wet.\tneutral\n",
    ),
    "snli": (
        "snli_1.0/snli_1.0_dev.jsonl",
        "\n".join(
            json.dumps({"gold_label": g, "sentence1": a, "sentence2": b, "annotator_labels": [g]})
            for g, a, b in (
                ("neutral", "A man walks.", "A man walks home."),
                ("-", "Two dogs play.", "Animals play."),  # no consensus: dropped, counted
                ("entailment", "A girl sings.", "Someone sings."),
            )
        )
        + "\n",
    ),
    "storycloze": (
        "StoryCloze/cloze_test_val__spring2016 - cloze_test_ALL_val.csv",
        "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
        "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
        'a1,Tom woke up.,"He was late, again.",He ran.,He missed the bus.,He was sad.,He flew.,1\n'
        "a2,Ann baked.,She iced it.,She cut it.,She served it.,It sang.,They ate it.,2\n",
    ),
}


def write(root: Path, task: str) -> Path:
    rel, text = FILES[task]
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_race(root: Path) -> Path:
    for level, n in (("middle", 2), ("high", 1)):
        folder = root / "RACE" / "dev" / level
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            doc = {
                "id": f"{level}{i}.txt",
                "article": f"The {level} story {i}.",
                "questions": ["What happened?", "Who?"],
                "options": [["a", "b", "c", "d"], ["w", "x", "y", "z"]],
                "answers": ["B", "D"],
            }
            (folder / f"{i}.txt").write_text(json.dumps(doc))
    return root / "RACE" / "dev"


@pytest.mark.parametrize("task", sorted(FILES))
def test_each_task_reads_its_official_layout_with_its_labels_and_framing(task, tmp_path):
    path = write(tmp_path, task)
    assert path.relative_to(tmp_path).as_posix() in PAPER_TASKS[task].splits.values()
    data = TaskData(task)
    examples = data.read(path)
    assert len(examples) == (3 if task == "mnli" else 2) and data.kind == PAPER_TASKS[task].kind
    first = examples[0]
    if data.kind == "multiple_choice":
        assert first.texts[0].startswith("Tom woke up. He was late, again.")  # CSV quoting honoured
        assert [e.label for e in examples] == [0.0, 1.0]
    elif data.regression:
        assert [e.label for e in examples] == [5.0, 0.25]
    else:
        assert all(0 <= e.label < data.num_outputs for e in examples)
    if task in ("mnli", "mrpc", "qqp"):
        assert '"' in first.texts[0]  # GLUE's bare quotes are text, not CSV quoting
    assert data.dropped == (1 if task == "snli" else 0)


def test_race_levels_are_folders_of_articles_each_question_an_example(tmp_path):
    dev = write_race(tmp_path)
    data = TaskData("race")
    both = data.read(dev)
    assert len(both) == 6 and len(data.read(dev / "middle")) == 4 and len(data.read(dev / "high")) == 2
    assert both[0].texts == ("The high story 0. What happened?", ("a", "b", "c", "d"))
    assert [e.label for e in both[:2]] == [1.0, 3.0]
    assert both[0].where == f"{dev}/high/0.txt question 1"


@pytest.mark.parametrize(
    ("task", "wrong", "message"),
    [
        ("qnli", "mrpc", r"MRPC/dev.tsv:1: expected a header naming \['question', 'sentence', 'label'\]"),
        ("mnli", "rte", r"RTE/dev.tsv:1: expected a header naming .*missing \['gold_label'\]"),
        ("storycloze", "rte", r"RTE/dev.tsv:1: expected the Story Cloze header"),
        ("snli", "rte", r"RTE/dev.tsv:1: expected SNLI's JSON lines"),
    ],
)
def test_a_file_of_another_layout_is_named_with_its_line_and_what_is_expected(task, wrong, message, tmp_path):
    path = write(tmp_path, wrong)
    with pytest.raises(LayoutError, match=message):
        TaskData(task).read(path)


def test_glue_test_files_without_labels_and_missing_files_are_named(tmp_path):
    cola_test = tmp_path / "CoLA" / "test.tsv"
    cola_test.parent.mkdir()
    cola_test.write_text("index\tsentence\n0\tBill left.\n")
    with pytest.raises(LayoutError, match=r"CoLA/test.tsv:1: expected 4 tab-separated columns and no header"):
        TaskData("cola").read(cola_test)
    with pytest.raises(FileNotFoundError, match=r"QNLI/train.tsv: no such data file"):
        TaskData("qnli").read(tmp_path / "QNLI" / "train.tsv")
    with pytest.raises(LayoutError, match="expected a RACE folder"):
        TaskData("race").read(tmp_path / "CoLA" / "test.tsv")


def test_a_short_row_is_an_error_naming_its_line_or_skipped_and_counted(tmp_path):
    path = tmp_path / "QNLI" / "dev.tsv"
    path.parent.mkdir()
    path.write_text("index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n1\tWhen?\n")
    with pytest.raises(DataError, match=r"QNLI/dev.tsv:3: malformed row: 2 columns, expected 4"):
        TaskData("qnli").read(path)
    data = TaskData("qnli", on_error="skip")
    assert len(data.read(path)) == 1 and data.skipped == 1


def test_each_tasks_metric_agrees_with_the_reference_implementation():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    cola, mrpc = TaskData("cola"), TaskData("mrpc")
    assert main_metric(cola) == "matthews" and main_metric(mrpc) == main_metric(TaskData("qqp")) == "f1"
    assert scores(p, y, cola)["matthews"] == pytest.approx(matthews_corrcoef(y, p))
    assert scores(p, y, mrpc)["f1"] == pytest.approx(f1_score(y, p))
    assert scores(p, y, mrpc)["accuracy"] == pytest.approx((p == y).mean())
    assert scores(np.ones(4), np.array([1, 0, 1, 0]), cola)["matthews"] == 0.0  # one class predicted
    stsb = TaskData("stsb")
    x, t = rng.normal(size=50), rng.normal(size=50)
    t[:5] = t[0]  # ties
    out = scores(x, t, stsb)
    assert main_metric(stsb) == "pearson" and stsb.regression
    assert out["pearson"] == pytest.approx(stats.pearsonr(x, t)[0])
    assert out["spearman"] == pytest.approx(stats.spearmanr(x, t)[0])
    assert main_metric(TaskData("race")) == main_metric(TaskData("mnli")) == "accuracy"


def test_every_task_of_the_paper_is_there_with_its_figures():
    assert list(PAPER_TASKS) == [
        "snli", "mnli", "qnli", "scitail", "rte", "storycloze", "race", "cola", "sst2", "mrpc", "stsb", "qqp",
    ]  # fmt: skip
    assert PAPER_TASKS["mnli"].paper == {"matched": 82.1, "mismatched": 81.4}
    assert PAPER_TASKS["race"].paper == {"middle": 62.9, "high": 57.4, "all": 59.0}
    assert sum(len(s.paper) for s in PAPER_TASKS.values()) == 15
