"""GPT-1's evaluation in one command: fine-tune and score every task of the paper found in a folder.

    python -m gpt1_ds.suite --init RUN/checkpoints --tasks-dir DATA --out OUT [--tasks mnli rte ...] \\
        [--launcher "deepspeed --num_gpus 8"] [key=value ...]

``--tasks-dir`` is the folder the releases unpacked into (``gpt1_ds.paper_tasks`` lists where each
task's files lie; GLUE's folders are found under ``DATA`` or ``DATA/glue_data``; SST-2 and RTE also as
gpt1-ds embeds them, ``data/glue``). Each task found is fine-tuned with the paper's recipe
(``ds_configs/finetune.json``: lr 6.25e-5, batch 32, 3 epochs, warm-up over 0.2%, λ = 0.5,
classifier dropout 0.1; ``key=value`` overrides every task's settings) in ``OUT/TASK``, one after
another, and scored on its dev sets after each epoch (MNLI matched and mismatched, RACE middle, high
and both). ``OUT/suite.json`` and ``OUT/suite.md`` hold, per task: the metric, the last epoch's
figure (the paper trains a fixed 3 epochs), the best epoch's, the pretrained model's zero-shot figure
where the paper has a heuristic for the task (``gpt1_ds.zero_shot``: SST-2, CoLA, RACE, and Story
Cloze with RACE's; ``--no-zero-shot`` skips them), the paper's (mostly test-set figures; these are
dev), examples, steps and minutes. A task whose ``OUT/TASK/suite_result.json`` exists is not
run again, so a stopped suite resumes. The Story Cloze Test has no training file: its validation
file is split 90/10 into train and dev by a fixed seed (``STORY_SPLIT_SEED``), written to
``OUT/storycloze/split/``. A task with fewer training examples than the batch runs with the batch cut
to its data (``global_batch_size``), with a warning.

Exit codes: 0 every task found ran; 1 a task failed (the others still ran; the table says which);
2 bad arguments or no task found.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gpt1_ds import zero_shot
from gpt1_ds.env import REPO, launched_rank, setup_logging
from gpt1_ds.evaluate import check_tokenizer
from gpt1_ds.files import atomic_write_text
from gpt1_ds.loading import load_model
from gpt1_ds.model import GPT
from gpt1_ds.paper_tasks import PAPER_TASKS, find, story_split
from gpt1_ds.runner import PREEMPTED_EXIT
from gpt1_ds.tasks import TaskData, main_metric
from gpt1_ds.tokenizer import SentencePieceTokenizer

log = logging.getLogger("gpt1_ds.suite")

RESULT_NAME = "suite_result.json"
PAPER_BATCH = 32
EXTRA_DEV = {"mnli": {"mismatched": "dev_mismatched"}, "race": {"middle": "dev/middle", "high": "dev/high"}}
"""Dev sets scored beside a task's ``dev``: name → a split of ``Spec.splits`` (or a sub-folder of dev)."""


def command(task: str, paths: dict[str, Path], run_dir: Path, args: argparse.Namespace) -> list[str]:
    """The fine-tuning command of one task: its files, the paper's recipe, the user's overrides."""
    launch = shlex.split(args.launcher)
    script = (
        [*launch, str(REPO / "gpt1_ds" / "finetune.py")]
        if launch
        else [sys.executable, "-m", "gpt1_ds.finetune"]
    )
    cmd = [*script, "--task", task, "--train", str(paths["train"]), "--dev", str(paths["dev"])]
    cmd += ["--init", args.init, "--run-dir", str(run_dir)]
    cmd += [*(["--deepspeed_config", args.deepspeed_config] if args.deepspeed_config else [])]
    cmd += [*(["--config", args.config] if args.config else [])]
    for name, split in EXTRA_DEV.get(task, {}).items():
        extra = paths.get(split) or paths["dev"] / split.removeprefix("dev/")
        if extra.exists():
            cmd.append(f"extra_dev.{name}={extra}")
    n = len(TaskData(task).read(paths["train"]))
    limits = [int(o.split("=", 1)[1]) for o in args.overrides if o.startswith("max_train_examples=")]
    n = min([n, *limits])
    batch_set = any(o.startswith(("global_batch_size=", "ds.train_batch_size=")) for o in args.overrides)
    if n < PAPER_BATCH and not batch_set:
        world = launch_world(args.launcher)
        cut = max(world, n - n % world)
        log.warning(
            "%s: %d training examples, fewer than the batch of %d: the batch cut to %d (a multiple of the %d "
            "ranks)",
            task,
            n,
            PAPER_BATCH,
            cut,
            world,
        )
        cmd.append(f"global_batch_size={cut}")
    return [*cmd, *args.overrides]


RANK_FLAGS = ("--nproc_per_node", "--nproc-per-node", "--num_gpus", "--num-gpus", "-np", "-n")
NODE_FLAGS = ("--nnodes", "--num_nodes", "--num-nodes")


def launch_world(launcher: str) -> int:
    """The ranks a task's fine-tuning runs on: the launcher's processes per node (torchrun, deepspeed,
    mpirun) times its nodes; without a launcher, SLURM's tasks (the suite runs under srun once per
    task, each its fine-tuning's rank) or 1."""
    words = shlex.split(launcher)
    if not words:
        return int(os.environ.get("SLURM_NTASKS", "1"))
    found = {}
    for i, word in enumerate(words):
        flag, _, value = word.partition("=")
        if flag in RANK_FLAGS + NODE_FLAGS:
            value = value or (words[i + 1] if i + 1 < len(words) else "")
            if value.isdigit():
                found["nodes" if flag in NODE_FLAGS else "ranks"] = int(value)
    return found.get("ranks", 1) * found.get("nodes", 1)


class Preempted(Exception):
    """A task's fine-tuning saved a checkpoint on a signal and exited with 75: the suite stops too."""


def run_forwarding_signals(cmd: list[str]) -> int:
    """``cmd``'s exit code; SIGUSR1 and SIGTERM that reach the suite (SLURM's preemption) are passed
    on to it, so that it saves a checkpoint and exits with 75."""
    child = subprocess.Popen(cmd, cwd=REPO)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_task(task: str, paths: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune and score one task; its row of the table (written to ``OUT/TASK/suite_result.json``)."""
    run_dir = args.out / task
    if task == "storycloze":
        paths = {**paths, **story_split(paths["train"], run_dir / "split")}
    unseen = zero_shot_figures(task, paths, args)
    cmd = command(task, paths, run_dir, args)
    log.info("%s: %s", task, shlex.join(cmd))
    start = time.perf_counter()
    code = run_forwarding_signals(cmd)
    minutes = (time.perf_counter() - start) / 60
    if code == PREEMPTED_EXIT:
        raise Preempted(task)
    results_file = run_dir / "results.json"
    if code != 0 or not results_file.is_file():
        return {"task": task, "error": f"exit {code} (log above; {run_dir})", "minutes": minutes}
    results = json.loads(results_file.read_text())
    metric, history = main_metric(TaskData(task)), results["history"]
    row = {
        "task": task,
        "metric": metric,
        "last": history[-1][metric],
        "best": max(h[metric] for h in history),
        "paper": PAPER_TASKS[task].paper,
        "extra": {k: v for k, v in history[-1].items() if "/" in k and k.endswith("/" + metric)},
        "zero_shot": unseen,
        "train_examples": results["train_examples"],
        "dev_examples": results["dev_examples"],
        "steps": history[-1]["step"],
        "minutes": minutes,
        "files": {k: str(v) for k, v in paths.items()},
    }
    if first_rank():
        atomic_write_text(run_dir / RESULT_NAME, json.dumps(row, indent=2) + "\n")
    return row


@functools.cache
def pretrained(init: str) -> tuple[GPT, SentencePieceTokenizer]:
    """The ``--init`` model (on the GPU where there is one) and its tokenizer, loaded once per suite."""
    model, found = load_model(init)
    tok = check_tokenizer(Path(init), model, found)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tok


def zero_shot_figures(task: str, paths: dict[str, Path], args: argparse.Namespace) -> dict[str, Any] | None:
    """The pretrained model's zero-shot figures on the task's dev file (``gpt1_ds.zero_shot``), where
    the task has a heuristic and ``--init`` is a model of ours; None otherwise, or when it cannot be
    scored (a warning: the table then has no zero-shot figure, the fine-tuning runs)."""
    if not (args.zero_shot and task in zero_shot.HEURISTICS and args.init != "none" and first_rank()):
        return None
    try:
        model, tok = pretrained(args.init)
        figures = zero_shot.score(task, model, tok, paths)
    except Exception as e:  # an auxiliary figure: GPT-1's own tokenizer, a missing file, …
        log.warning("%s: no zero-shot figure (%s: %s)", task, type(e).__name__, e)
        return None
    log.info("%s: zero-shot %s %.4f (%s)", task, figures["metric"], figures[figures["metric"]], args.init)
    return figures


def first_rank() -> bool:
    """Whether this process writes the results: under srun the suite runs once per SLURM task."""
    return launched_rank() == 0


def table(rows: list[dict[str, Any]]) -> str:
    """The suite as markdown: the user's dev figures beside the paper's (mostly test-set) ones."""
    lines = [
        "| task | metric | last epoch (dev) | best epoch (dev) | zero-shot (dev) | paper "
        "| train / dev examples | steps | minutes |",
        "|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    done = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | failed: {r['error']} | | | | | | | {r['minutes']:.1f} |")
            continue
        extra = "".join(f"; {k.split('/')[0]} {100 * v:.1f}" for k, v in r["extra"].items())
        paper = ", ".join(f"{k} {v}" for k, v in r["paper"].items())
        unseen = r.get("zero_shot")
        unseen = f"{100 * unseen[unseen['metric']]:.1f}" if unseen else "—"
        lines.append(
            f"| {r['task']} | {r['metric']} | {100 * r['last']:.1f}{extra} | {100 * r['best']:.1f} "
            f"| {unseen} | {paper} "
            f"| {r['train_examples']} / {r['dev_examples']} | {r['steps']} | {r['minutes']:.1f} |"
        )
    if done:
        mean = sum(100 * r["last"] for r in done) / len(done)
        lines.append(
            f"\nAverage of the {len(done)} tasks run (last epoch, dev): {mean:.1f}. The paper's GLUE score "
            "(72.8) includes WNLI, which is not run here, and its figures are mostly test-set results."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpt1_ds.suite", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--init", help="the pretrained model: RUN/checkpoints, a tag, an HF directory, or none")
    add("--tasks-dir", type=Path, required=True, help="where the releases were unpacked")
    add("--out", type=Path, required=True, help="one run directory per task, and the table")
    add("--tasks", nargs="+", choices=list(PAPER_TASKS), help="default: every task found")
    add("--launcher", default="", help='e.g. "deepspeed --num_gpus 8"; default: one process')
    add("--deepspeed_config", "--deepspeed-config", help="default: ds_configs/finetune.json (the paper's)")
    add("--config", help="a FinetuneConfig YAML for every task (configs/tiny-cpu-finetune.yaml)")
    add("--index", type=int, help="run only the N-th task found (0-based): a job array's element")
    add("--which", action="store_true", help="print the task of --index, or how many are found")
    add("--gather", action="store_true", help="only write the table of the results so far")
    add(
        "--zero-shot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score --init with GPT-1's zero-shot heuristic on SST-2, CoLA, RACE and Story Cloze first",
    )
    add("overrides", nargs="*", help="key=value for every task's fine-tuning (ds.key=value too)")
    args = parser.parse_intermixed_args(argv)
    if not args.tasks_dir.is_dir():
        parser.error(f"--tasks-dir {args.tasks_dir}: no such directory")
    if args.init is None and not (args.which or args.gather):
        parser.error("--init is required: a pretrained model (RUN/checkpoints, an HF directory) or none")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    found = {t: p for t in (args.tasks or PAPER_TASKS) if (p := find(args.tasks_dir, t)) is not None}
    missing = [t for t in (args.tasks or []) if t not in found]
    if missing:
        where = {t: PAPER_TASKS[t].splits["train"] for t in missing}
        log.error("%s: no training or dev file of %s (expected e.g. %s)", args.tasks_dir, missing, where)
        return 2
    if not found:
        log.error(
            "%s: no task of the paper found (gpt1_ds.paper_tasks lists where each lies)", args.tasks_dir
        )
        return 2
    names = list(found)
    if args.which:
        chosen = args.index is not None and 0 <= args.index < len(names)
        print(names[args.index] if chosen else ("" if args.index is not None else len(names)))
        return 0
    if args.gather:
        return gather_results(args.out, names)
    if args.index is not None:
        if not 0 <= args.index < len(names):
            log.info("suite: index %d of %d tasks found: nothing to run", args.index, len(names))
            return 0
        found = {names[args.index]: found[names[args.index]]}
    log.info("suite: %d tasks found under %s: %s", len(names), args.tasks_dir, ", ".join(names))
    rows = []
    for task, paths in found.items():
        kept = args.out / task / RESULT_NAME
        if kept.is_file():
            log.info("%s: done before (%s); not run again", task, kept)
            rows.append(json.loads(kept.read_text()))
            continue
        try:
            rows.append(run_task(task, paths, args))
        except Preempted:
            log.warning("%s: preempted; its checkpoint resumes when the suite runs again", task)
            return PREEMPTED_EXIT
        if first_rank() and args.index is None:  # the table so far, after each task
            gather(args.out, rows)
    if first_rank() and args.index is None:  # an array's elements leave the table to --gather
        gather(args.out, rows)  # with the tasks done before, after the last one run
    return 1 if any("error" in r for r in rows) else 0


def gather_results(out: Path, names: list[str]) -> int:
    """The table of every task found from their ``suite_result.json`` (a job array's last step);
    1 where one has none."""
    rows = []
    for task in names:
        kept = out / task / RESULT_NAME
        rows.append(
            json.loads(kept.read_text())
            if kept.is_file()
            else {"task": task, "error": "no result", "minutes": 0.0}
        )
    gather(out, rows)
    return 1 if any("error" in r for r in rows) else 0


def gather(out: Path, rows: list[dict[str, Any]]) -> None:
    """``OUT/suite.json`` and ``OUT/suite.md`` from the rows so far."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "suite.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "suite.md", table(rows))
    log.info("suite so far (%s):\n%s", out / "suite.md", table(rows))


if __name__ == "__main__":
    sys.exit(main())
