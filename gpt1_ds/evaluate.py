"""Evaluate a language model: bits per byte on raw text, GPT-1's zero-shot SST-2, harness tasks.

    python -m gpt1_ds.evaluate MODEL --text FILE [FILE ...] [--unigram DATASET]
    python -m gpt1_ds.evaluate MODEL --zero-shot sst2
    python -m gpt1_ds.evaluate MODEL --tasks gpt1_sst2 gpt1_rte [gpt1_text] [--limit N]
    python -m gpt1_ds.evaluate RUN --all-checkpoints --zero-shot sst2 [--text FILE ...]

MODEL is an HF export, our safetensors export, or a run's checkpoints (``gpt1_ds.loading``), with
the tokenizer found beside it (or ``--tokenizer``).

``--text``: each file (plain or .gz/.bz2/.xz) is cleaned as pretraining text is (``data_prep.clean``:
Gutenberg markers, unwrapped paragraphs, ftfy; ``--lowercase`` as the dataset was), encoded after an
``<eod>`` (a document's start, as in the shards) and scored with a sliding window: every token once,
each with at least ``n_positions - stride`` tokens of context once the first window is full. Reported:
loss per token (nats), perplexity, and bits per UTF-8 byte of the cleaned text (total nats / ln 2 /
bytes), which compares models whose tokenizers differ. ``--held-out DATASET`` adds the cleaned test
documents of a prepared dataset. Baselines: ``--unigram DATASET``, a unigram model of that dataset's
train split (add-one counts), the floor any LM should beat; ``--random-init``, an untrained model of
the same shape (what pretraining starts from).

``--zero-shot sst2 [cola race storycloze]`` (GPT-1 §5, Figure 2 right; ``gpt1_ds.zero_shot``): each
task's dev file scored by the paper's heuristic (SST-2: each sentence followed by " very", then " negative"
against " positive"), the files found under ``--task-files`` as ``gpt1_ds.suite`` finds them (default:
the embedded SST-2).

``--tasks`` runs lm-evaluation-harness (the ``eval`` extra; ``gpt1_ds.harness``) through its ``hf``
model on an HF directory of the model, over task definitions written to ``--tasks-dir`` from local
files only: ``gpt1_sst2``, ``gpt1_rte`` (zero-shot multiple choice) and ``gpt1_text`` (rolling
log-likelihood of the ``--text`` files); the harness's own task names work where their data is on disk.

``--all-checkpoints`` evaluates every complete checkpoint of a run and writes the figures as
TensorBoard scalars (``zero_shot/*``, ``text/*``) at each checkpoint's step, which ``gpt1_ds.plot``
draws against pretraining steps. ``--out FILE`` writes all results as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gpt1_ds import harness, zero_shot
from gpt1_ds.checkpoint import RunDir, complete_tags
from gpt1_ds.files import atomic_write_text
from gpt1_ds.loading import find_tokenizer, fit_vocab, load_model, model_from_checkpoint, resolve_tag
from gpt1_ds.manifest import read_splits, train_docs
from gpt1_ds.metrics import Monitor
from gpt1_ds.model import GPT
from gpt1_ds.paper_tasks import PAPER_TASKS, find, story_split
from gpt1_ds.tasks import GLUE
from gpt1_ds.text import clean_text, iter_documents
from gpt1_ds.tokenizer import MODEL_NAME, SentencePieceTokenizer, info_file, load_tokenizer

log = logging.getLogger("gpt1_ds.evaluate")


class EvalError(ValueError):
    """Bad input to an evaluation, naming the file."""


# --- Text: loss, perplexity, bits per byte ---------------------------------------------------


@dataclass
class TextScore:
    """The score of one text (or of several, summed)."""

    name: str
    tokens: int
    bytes: int
    nats: float  # summed negative log-likelihood of every token

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "loss": self.loss,
            "ppl": math.exp(min(self.loss, 50.0)),
            "bits_per_byte": self.nats / math.log(2) / max(self.bytes, 1),
        }


def read_text(path: Path, lowercase: bool = False) -> str:
    """A raw text file cleaned as pretraining text is; binary, unreadable or empty is an error."""
    try:
        ((_, text, _, repairs),) = iter_documents(path, path.stem, "books", re.compile(""))
    except (OSError, EOFError, ValueError) as e:
        raise EvalError(f"{path}: not a readable text file ({e})") from None
    cleaned = clean_text(text, repairs, lowercase=lowercase)
    if not cleaned:
        raise EvalError(f"{path}: no text after cleaning")
    return cleaned


def windows(n: int, n_ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a sequence of ``n`` tokens whose first is context only: (begin, end,
    first scored) with inputs ``[begin, end - 1)`` (≤ n_ctx), targets ``[begin + 1, end)`` and the
    targets from ``first scored`` on new. Every target of 1..n-1 is scored exactly once."""
    if not 0 < stride <= n_ctx:
        raise ValueError(f"stride must lie in 1..{n_ctx}, got {stride}")
    out, scored = [], 1
    while scored < n:
        end = min(scored + (n_ctx if scored == 1 else stride), n)
        begin = max(0, end - 1 - n_ctx)
        out.append((begin, end, scored))
        scored = end
    return out


@torch.no_grad()
def sequence_nats(model: GPT, ids: list[int], stride: int, batch_size: int = 8) -> float:
    """Summed -log p of ``ids[1:]`` given what precedes, by sliding windows (``windows``)."""
    device = next(model.parameters()).device
    n_ctx = model.config.n_positions
    total = 0.0
    spans = windows(len(ids), n_ctx, stride)
    for i in range(0, len(spans), batch_size):
        group = spans[i : i + batch_size]
        width = max(end - 1 - begin for begin, end, _ in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (begin, end, first) in enumerate(group):
            seq = torch.tensor(ids[begin:end])
            x[row, : len(seq) - 1] = seq[:-1]
            keep = first - begin - 1  # targets before this were scored by an earlier window
            y[row, keep : len(seq) - 1] = seq[1 + keep :]
        logits = model(x.to(device)).float()  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum")
        total += float(loss)
    return total


def score_text(model: GPT, tok: SentencePieceTokenizer, name: str, text: str, stride: int) -> TextScore:
    ids = tok.encode(text)
    nats = sequence_nats(model, [tok.eod_id, *ids], stride)
    return TextScore(name, len(ids), len(text.encode("utf-8")), nats)


def held_out_texts(dataset: Path) -> dict[str, str]:
    """The cleaned documents of a dataset's test split (as data prep wrote them), by name."""
    docs = read_splits(dataset)["splits"].get("test", [])
    if not docs:
        raise EvalError(f"{dataset}: the dataset has no test split (prepared with --test-fraction 0)")
    return {
        f"{dataset}:test/{d}": (dataset / "clean" / "docs" / f"{d}.txt").read_text(encoding="utf-8")
        for d in docs
    }


def unigram_nats(tok: SentencePieceTokenizer, dataset: Path, texts: list[str]) -> list[float]:
    """For each text, its summed -log p under a unigram model of ``dataset``'s train split."""
    docs, _ = train_docs(dataset)
    counts = np.ones(tok.vocab_size, dtype=np.float64)  # add-one
    for ids in tok.encode_batch([d.read_text(encoding="utf-8") for d in docs]):
        counts += np.bincount(ids, minlength=tok.vocab_size)[: tok.vocab_size]
    counts[tok.eod_id] += len(docs)
    logp = np.log(counts / counts.sum())
    return [float(-logp[np.asarray(tok.encode(t), dtype=np.int64)].sum()) for t in texts]


# --- GPT-1's zero-shot heuristics --------------------------------------------------------------


def zero_shot_paths(tasks: list[str], task_files: Path, scratch: Path) -> dict[str, dict[str, Path]]:
    """Each zero-shot task's files under ``task_files`` (``paper_tasks.find``); the Story Cloze
    validation file split as the suite splits it (its dev part scored)."""
    paths = {}
    for task in tasks:
        found = find(task_files, task)
        if found is None:
            where = task_files / (PAPER_TASKS[task].splits.get("dev") or PAPER_TASKS[task].splits["train"])
            raise EvalError(f"--task-files {task_files}: no {task} files (expected e.g. {where})")
        paths[task] = story_split(found["train"], scratch / task) if task == "storycloze" else found
    return paths


# --- The command -----------------------------------------------------------------------------


def recorded_tokenizer(source: Path) -> tuple[Path, str] | None:
    """(file, sha256) of the tokenizer recorded with a model: the metadata beside an export, or in
    the run directory of ``RUN``, ``RUN/checkpoints`` or ``RUN/checkpoints/TAG``."""
    for folder in (source, source.parent, source.parent.parent):
        info = info_file(folder)
        if info is not None:
            return info, json.loads(info.read_text(encoding="utf-8"))["sha256"]
    return None


def check_tokenizer(source: Path, model: GPT, path: Path | None) -> SentencePieceTokenizer:
    """The tokenizer at ``path``; a missing one, one larger than the model's table, or one other
    than the tokenizer recorded with the model is an error."""
    if path is None:
        raise EvalError(f"{source}: no {MODEL_NAME} found with the model; pass --tokenizer")
    tok = load_tokenizer(path)
    recorded = recorded_tokenizer(Path(source))
    if recorded is not None and recorded[1] != tok.sha256:
        raise EvalError(
            f"{path}: sha256 {tok.sha256[:12]}, but the model was trained with the tokenizer that "
            f"{recorded[0]} records ({recorded[1][:12]}): they do not belong together"
        )
    try:
        fit_vocab(model, tok)
    except ValueError as e:
        raise EvalError(str(e)) from None
    return tok


def baselines(model: GPT, tok: SentencePieceTokenizer, args: argparse.Namespace, texts: list[str]) -> dict:
    """The summed nats of each text under the baselines asked for: ``unigram``, ``random_init``."""
    out = {}
    if args.unigram:
        out["unigram"] = unigram_nats(tok, args.unigram, texts)
    if args.random_init:
        torch.manual_seed(0)
        untrained = GPT(model.config).to(next(model.parameters()).device).eval()
        stride = args.stride or model.config.n_positions // 2
        out["random_init"] = [score_text(untrained, tok, "", text, stride).nats for text in texts]
    return out


def evaluate_model(
    model: GPT, tok: SentencePieceTokenizer, args: argparse.Namespace, texts: dict[str, str]
) -> dict:
    """Every evaluation the arguments ask for, on one model; results by kind, with their seconds."""
    results: dict[str, Any] = {}
    if texts:
        start = time.perf_counter()
        stride = args.stride or model.config.n_positions // 2
        scores = [score_text(model, tok, name, text, stride) for name, text in texts.items()]
        total = TextScore("all", *(sum(getattr(s, k) for s in scores) for k in ("tokens", "bytes", "nats")))
        results["text"] = {s.name: s.to_dict() for s in [*scores, total]}
        for kind, nats in baselines(model, tok, args, list(texts.values())).items():
            for score, n in zip([*scores, total], [*nats, sum(nats)], strict=True):
                results["text"][score.name][f"{kind}_bits_per_byte"] = n / math.log(2) / score.bytes
        results["text_seconds"] = time.perf_counter() - start
    if args.zero_shot:
        start = time.perf_counter()
        results["zero_shot"] = {
            task: zero_shot.score(task, model, tok, paths, args.limit)
            for task, paths in args.zero_shot_paths.items()
        }
        results["zero_shot_seconds"] = time.perf_counter() - start
    return results


def summary(results: dict) -> list[str]:
    """One log line per figure."""
    lines = []
    texts = results.get("text", {})
    for name, r in texts.items():
        if name == "all" and len(texts) == 2:
            continue  # one text: "all" is the same figures
        kinds = [k for k in ("random_init", "unigram") if f"{k}_bits_per_byte" in r]
        unigram = "".join(f", {k.replace('_', ' ')} {r[f'{k}_bits_per_byte']:.4f}" for k in kinds)
        lines.append(
            f"text {name}: {r['tokens']:,} tokens, {r['bytes']:,} bytes: loss {r['loss']:.4f}, "
            f"ppl {r['ppl']:.2f}, {r['bits_per_byte']:.4f} bits/byte{unigram}"
        )
    for name, r in results.get("zero_shot", {}).items():
        baseline = {k: r[k] for k in ("majority", "chance", "threshold") if k in r}
        lines.append(
            f"zero-shot {name}: {r['metric']} {r[r['metric']]:.4f} on {r['examples']} examples"
            + "".join(f", {k} {v:.4f}" for k, v in baseline.items())
        )
    for task, r in results.get("harness", {}).items():
        lines.append(f"harness {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(r.items())))
    return lines


def scalars(results: dict) -> dict[str, float]:
    """The TensorBoard scalars of one checkpoint's results."""
    out = {zero_shot_tag(k, r["metric"]): r[r["metric"]] for k, r in results.get("zero_shot", {}).items()}
    if "text" in results:
        out["text/bits_per_byte"] = results["text"]["all"]["bits_per_byte"]
    return out


def zero_shot_tag(task: str, metric: str) -> str:
    """The TensorBoard tag of a zero-shot figure: ``zero_shot/sst2_acc``, ``zero_shot/cola_matthews``."""
    return f"zero_shot/{task}_{'acc' if metric == 'accuracy' else metric}"


def every_checkpoint(args: argparse.Namespace, texts: dict[str, str]) -> list[dict]:
    """Evaluate each complete checkpoint of a run, oldest first; scalars into the run's TensorBoard."""
    ckpt_dir, _ = resolve_tag(args.model)
    run = RunDir(ckpt_dir.parent)
    monitor, out = Monitor(str(run.tensorboard)), []
    for tag in complete_tags(ckpt_dir):
        model, ckpt = model_from_checkpoint(ckpt_dir, tag)
        tok = check_tokenizer(ckpt.path, model, args.tokenizer or find_tokenizer(ckpt_dir, ckpt))
        results = evaluate_model(model.to(args.device), tok, args, texts)
        out.append({"tag": tag, "step": ckpt.state.step, **results})
        for line in summary(results):
            log.info("step %d: %s", ckpt.state.step, line)
        monitor.scalars(scalars(results), ckpt.state.step)
    monitor.close()
    log.info("wrote the scalars of %d checkpoints to %s", len(out), run.tensorboard)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt1_ds.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("model", type=Path, help="HF directory, safetensors export, RUN or RUN/checkpoints[/TAG]")
    add("--tag", help="checkpoint tag (default: the newest complete one)")
    add("--tokenizer", type=Path, help="tokenizer.model (default: the one found with MODEL)")
    add("--text", type=Path, nargs="+", default=[], help="raw text files: loss, perplexity, bits per byte")
    add("--lowercase", action="store_true", help="lower-case the text (for a dataset prepared with it)")
    add("--stride", type=int, help="sliding window step (default: half the context)")
    add(
        "--unigram",
        type=Path,
        metavar="DATASET",
        help="also a unigram baseline from this dataset's train split",
    )
    add(
        "--held-out",
        type=Path,
        metavar="DATASET",
        help="also score this dataset's test split (its cleaned docs)",
    )
    add(
        "--random-init",
        action="store_true",
        help="also score the texts with an untrained model of this shape",
    )
    add("--zero-shot", nargs="+", choices=list(zero_shot.HEURISTICS), help="GPT-1's zero-shot heuristics")
    add(
        "--task-files",
        type=Path,
        default=GLUE,
        help="where the tasks' releases are (as for gpt1_ds.suite --tasks-dir; default: the embedded SST-2)",
    )
    add(
        "--tasks",
        nargs="+",
        default=[],
        help="lm-evaluation-harness tasks (ours: gpt1_sst2, gpt1_rte, gpt1_text)",
    )
    add("--tasks-dir", type=Path, help="where the harness task files are written (default: a temporary one)")
    add("--limit", type=int, help="evaluate only the first N examples of each task")
    add("--all-checkpoints", action="store_true", help="every complete checkpoint of the run MODEL")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not (args.text or args.held_out or args.zero_shot or args.tasks):
        parser.error("nothing to evaluate: give --text, --held-out, --zero-shot and/or --tasks")
    if args.all_checkpoints and args.tasks:
        parser.error("--all-checkpoints runs --text and --zero-shot; run --tasks on one checkpoint")
    scratch = tempfile.TemporaryDirectory(prefix="gpt1_zero_shot_")
    try:
        args.zero_shot_paths = zero_shot_paths(args.zero_shot or [], args.task_files, Path(scratch.name))
        texts = {str(p): read_text(p, args.lowercase) for p in args.text}
        texts.update(held_out_texts(args.held_out) if args.held_out else {})
        results = every_checkpoint(args, texts) if args.all_checkpoints else one_model(args, texts)
    except (EvalError, FileNotFoundError, ValueError) as e:
        log.error("error: %s", e)
        return 1
    finally:
        scratch.cleanup()
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        log.info("wrote %s", args.out)
    return 0


def one_model(args: argparse.Namespace, texts: dict[str, str]) -> dict:
    """Every evaluation asked for, on MODEL (``--tag``)."""
    model, found = load_model(args.model, args.tag)
    tok = check_tokenizer(args.model, model, args.tokenizer or found)
    model = model.to(args.device)
    results = evaluate_model(model, tok, args, texts)
    if args.tasks:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gpt1_eval_") as scratch:
            include = harness.write_tasks(args.tasks_dir or Path(scratch) / "tasks", texts=texts)
            hf_dir = harness.hf_directory(args.model, model.cpu(), tok, Path(scratch) / "hf")
            results["harness"] = harness.run(hf_dir, args.tasks, include, args.limit, args.device)
        results["harness_seconds"] = time.perf_counter() - start
    for line in summary(results):
        log.info("%s", line)
    return results


if __name__ == "__main__":
    sys.exit(main())
