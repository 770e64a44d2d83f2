"""gpt1_ds.suite: the paper's tasks found in a folder, fine-tuned one after another, one table;
a stopped suite resumes without running a finished task again."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, mpirun
from test_evaluate import tiny_gpt
from test_paper_tasks import FILES, write, write_race

from gpt1_ds import zero_shot
from gpt1_ds.env import free_port
from gpt1_ds.hf import export_hf
from gpt1_ds.paper_tasks import PAPER_TASKS, find, story_split
from gpt1_ds.suite import launch_world
from gpt1_ds.tasks import GLUE, TaskData
from gpt1_ds.tokenizer import MODEL_NAME, copy_tokenizer, load_tokenizer


def test_tasks_are_found_in_the_release_layouts_glue_data_or_as_embedded(tmp_path):
    shutil.copytree(GLUE / "sst2", tmp_path / "sst2")  # the embedded layout
    glue = tmp_path / "glue_data"
    for task in ("mrpc", "qnli"):
        dev = write(glue, task)
        (dev.parent / "train.tsv").write_text(dev.read_text())
    write(tmp_path, "cola")  # a dev file without its train file: not found
    assert find(tmp_path, "sst2") == {
        "train": tmp_path / "sst2" / "stsa.binary.train",
        "dev": tmp_path / "sst2" / "stsa.binary.dev",
    }
    assert find(tmp_path, "mrpc")["dev"] == glue / "MRPC" / "dev.tsv"
    assert find(tmp_path, "cola") is None and find(tmp_path, "race") is None
    assert find(GLUE, "rte") == {"train": GLUE / "rte" / "train.tsv", "dev": GLUE / "rte" / "dev.tsv"}


def test_the_story_cloze_validation_file_is_split_by_a_fixed_seed(tmp_path):
    val = write(tmp_path, "storycloze")
    rows = val.read_text().splitlines()
    stories = [rows[1 + i % 2].replace("a1,", f"s{i},") for i in range(40)]
    val.write_text("\n".join([rows[0], *stories]) + "\n")
    once = story_split(val, tmp_path / "one")
    again = story_split(val, tmp_path / "two")
    assert once["train"].read_text() == again["train"].read_text()
    train, dev = (TaskData("storycloze").read(once[k]) for k in ("train", "dev"))
    assert (len(train), len(dev)) == (36, 4)


@pytest.mark.slow
def test_the_suite_fine_tunes_each_task_found_writes_the_table_and_resumes(prepared, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(GLUE / "sst2", tasks / "sst2")
    dev = write(tasks, "mrpc")
    rows = FILES["mrpc"][1].splitlines()
    (dev.parent / "train.tsv").write_text("\n".join([rows[0], *rows[1:] * 4, rows[1]]) + "\n")  # 9 pairs
    race_dev = write_race(tasks)
    shutil.copytree(race_dev, tasks / "RACE" / "train")
    out = tmp_path / "out"
    pretrained = tmp_path / "pretrained"  # a small random model of ours, with the dataset's tokenizer
    tok = load_tokenizer(prepared / MODEL_NAME)
    model = tiny_gpt(tok.vocab_size, n_positions=64)
    export_hf(model, pretrained)
    copy_tokenizer(tok.path, pretrained)
    settings = [
        f"--init={pretrained}",
        "max_train_examples=16",
        "epochs=1",
        "ds.bf16.enabled=false",
    ]
    launcher = shlex.join([*mpirun(free_port()), sys.executable])
    cmd = [sys.executable, "-m", "gpt1_ds.suite", "--tasks-dir", str(tasks), "--out", str(out), *settings]
    cmd += ["--launcher", launcher]  # each framing (multiple choice, classification, similarity) on 2 ranks
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "suite: 3 tasks found" in done.stderr
    assert (
        "mrpc: 9 training examples, fewer than the batch of 32: the batch cut to 8 (a multiple of the 2"
        in done.stderr
    )
    assert done.stderr.count("2 ranks (cpu, gloo)") == 3
    table = json.loads((out / "suite.json").read_text())
    assert [r["task"] for r in table] == ["race", "sst2", "mrpc"]  # the paper's order
    for row in table:
        spec = PAPER_TASKS[row["task"]]
        assert row["metric"] == spec.metric and row["paper"] == spec.paper
        assert 0 <= row["last"] <= 1 and row["best"] >= row["last"] and row["steps"] > 0
    race = table[0]
    assert set(race["extra"]) == {"middle/accuracy", "high/accuracy"} and race["dev_examples"] == 6
    assert table[2]["train_examples"] == 9 and table[2]["steps"] == 1  # the batch cut to 8 of them
    # The pretrained model's zero-shot figures, where the paper has a heuristic (RACE, SST-2; not MRPC).
    for row in table[:2]:
        expected = zero_shot.score(row["task"], model, tok, find(tasks, row["task"]))
        assert row["zero_shot"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert table[2]["zero_shot"] is None
    markdown = (out / "suite.md").read_text()
    assert "| mrpc | f1 |" in markdown and "Average of the 3 tasks run" in markdown
    assert "zero-shot (dev)" in markdown and f"| {100 * table[1]['zero_shot']['accuracy']:.1f} |" in markdown
    # A second run finds every result and runs nothing.
    before = {r["task"]: (out / r["task"] / "suite_result.json").stat().st_mtime_ns for r in table}
    (out / "suite.md").unlink()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("not run again") == 3
    assert before == {t: (out / t / "suite_result.json").stat().st_mtime_ns for t in before}
    assert (out / "suite.md").read_text() == markdown  # the table of the results found


def test_the_ranks_of_a_launcher_are_counted_for_the_batch_cut(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert launch_world("torchrun --nproc_per_node 2 --master_port 1234") == 2
    assert launch_world("torchrun --nnodes=2 --nproc-per-node=4") == 8
    assert launch_world("deepspeed --num_gpus 8 --num_nodes 2") == 16
    assert launch_world("mpirun -np 3") == 3 and launch_world("") == 1
    monkeypatch.setenv("SLURM_NTASKS", "4")  # the suite under srun: each task a rank
    assert launch_world("") == 4


@pytest.mark.slow
def test_a_folder_without_the_tasks_asked_for_is_refused_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "gpt1_ds.suite", "--init=none", "--tasks-dir", str(tmp_path)]
    cmd += ["--out", str(tmp_path / "o"), "--tasks", "mnli"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no training or dev file of ['mnli'] (expected e.g. {'mnli': 'MNLI/train.tsv'})" in done.stderr
