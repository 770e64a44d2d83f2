"""gpt1_ds.evaluate: sliding windows, bits per byte, zero-shot SST-2, the harness, every checkpoint."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SAMPLE_BOOKS, scalars, train
from test_paper_tasks import write

from data_prep.tokenizer import train as train_tokenizer
from gpt1_ds.evaluate import main, read_text, sequence_nats, windows
from gpt1_ds.hf import export_hf, export_hf_tokenizer
from gpt1_ds.manifest import train_docs
from gpt1_ds.model import GPT, GPTConfig
from gpt1_ds.plot import plot
from gpt1_ds.tasks import GLUE
from gpt1_ds.tokenizer import MODEL_NAME, copy_tokenizer, load_tokenizer

SST2_DEV = GLUE / "sst2" / "stsa.binary.dev"
SNARK = SAMPLE_BOOKS[1]


def tiny_gpt(vocab_size: int, n_positions: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2, n_inner=128
    )
    return GPT(config).eval()


@pytest.mark.parametrize("n", [2, 5, 16, 17, 18, 40, 101])
@pytest.mark.parametrize(("n_ctx", "stride"), [(16, 16), (16, 8), (16, 1), (16, 5)])
def test_windows_score_every_token_once_with_enough_context(n, n_ctx, stride):
    scored = []
    for begin, end, first in windows(n, n_ctx, stride):
        assert end - 1 - begin <= n_ctx and begin < first < end
        context = first - 1 - begin  # tokens before the first new target in this window
        assert begin == 0 or context >= n_ctx - stride
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_sliding_window_nats_equal_the_sum_of_per_token_losses():
    model = tiny_gpt(50)
    ids = torch.randint(0, 50, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        # stride 1: every token sees the longest context the model has; computed one by one here
        expected = 0.0
        for t in range(1, len(ids)):
            context = torch.tensor([ids[max(0, t - 16) : t]])
            expected -= F.log_softmax(model(context)[0, -1], -1)[ids[t]].item()
        whole = F.cross_entropy(model(torch.tensor([ids[:16]]))[0], torch.tensor(ids[1:17]), reduction="sum")
    assert sequence_nats(model, ids, stride=1, batch_size=7) == pytest.approx(expected, rel=1e-5)
    assert sequence_nats(model, ids[:17], stride=8) == pytest.approx(whole.item(), rel=1e-5)
    assert sequence_nats(model, ids, stride=16) > sequence_nats(model, ids, stride=1) * 0.9  # sane scale


def test_text_is_cleaned_as_pretraining_text_and_bad_files_are_named(tmp_path):
    text = read_text(SNARK)
    assert "Project Gutenberg" not in text[:2000] and "\n\n" not in text  # markers gone, one paragraph a line
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \n")
    for path, message in ((binary, "not a readable text file"), (empty, "no text after cleaning")):
        with pytest.raises(ValueError, match=f"{path}: {message}"):
            read_text(path)


def test_cli_errors_name_the_file_and_write_nothing(prepared, tmp_path, caplog):
    model_dir = tmp_path / "hf"
    export_hf(tiny_gpt(1000, n_positions=64), model_dir)  # a table smaller than the tokenizer
    out = tmp_path / "results.json"
    tokenizer = prepared / MODEL_NAME
    assert (
        main([str(model_dir), "--zero-shot", "sst2", "--tokenizer", str(tokenizer), "--out", str(out)]) == 1
    )
    assert (
        f"{tokenizer}: the tokenizer (sentencepiece) has 2,000 ids, but the model's token table has 1,000"
        in (caplog.text)
    )
    assert main([str(model_dir), "--zero-shot", "sst2", "--out", str(out)]) == 1
    assert f"{model_dir}: no tokenizer.model found" in caplog.text
    bad = tmp_path / "tasks" / "SST-2" / "dev.tsv"
    bad.parent.mkdir(parents=True)
    bad.write_text("sentence\tlabel\na good film\t1\nmaybe a bad row\n")
    (bad.parent / "train.tsv").write_text(bad.read_text())
    export_hf(tiny_gpt(2000, n_positions=64), model_dir)
    args = [
        str(model_dir),
        "--tokenizer",
        str(tokenizer),
        "--zero-shot",
        "sst2",
        "--task-files",
        str(bad.parents[1]),
    ]
    assert main([*args, "--out", str(out)]) == 1
    assert f"{bad}:3" in caplog.text
    assert main([*args[:-3], "race", "--task-files", str(tmp_path), "--out", str(out)]) == 1
    assert (
        f"--task-files {tmp_path}: no race files (expected e.g. {tmp_path / 'RACE' / 'dev'})" in caplog.text
    )
    assert not out.exists()


@pytest.fixture(scope="module")
def export(prepared, tmp_path_factory) -> Path:
    """An HF export of a small random model with the prepared dataset's tokenizer."""
    out = tmp_path_factory.mktemp("eval_export")
    tok = load_tokenizer(prepared / MODEL_NAME)
    export_hf(tiny_gpt(tok.vocab_size, n_positions=64), out)
    export_hf_tokenizer(tok, out, 64)
    copy_tokenizer(tok.path, out)
    return out


@pytest.mark.slow
def test_the_harness_runs_our_tasks_and_agrees_on_bits_per_byte(export, tmp_path):
    pytest.importorskip("lm_eval")
    book = tmp_path / "snark.txt"
    book.write_text(gzip.decompress(SNARK.read_bytes()).decode("utf-8"))
    out = tmp_path / "results.json"
    args = f"--text {book} --stride 64 --zero-shot sst2 --tasks gpt1_sst2 gpt1_rte gpt1_text --limit 24"
    cmd = [sys.executable, "-m", "gpt1_ds.evaluate", str(export), *args.split(), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    ours = results["text"][str(book)]
    assert ours["bits_per_byte"] == pytest.approx(ours["nats"] / math.log(2) / ours["bytes"])
    assert ours["bytes"] == len(read_text(book).encode())
    harness = results["harness"]
    # Disjoint windows after <eod> (stride = context): the harness's rolling windows, the same score.
    assert harness["gpt1_text"]["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-4)
    for task in ("gpt1_sst2", "gpt1_rte"):
        assert harness[task]["sample_len"] == 24 and 0 <= harness[task]["acc,none"] <= 1
    assert results["zero_shot"]["sst2"]["examples"] == 24  # --limit applies to it too
    assert "zero-shot sst2: accuracy" in done.stderr and "harness gpt1_text" in done.stderr


@pytest.mark.slow
def test_every_checkpoint_is_evaluated_and_plotted_against_its_step(prepared, tmp_path):
    run = tmp_path / "run"
    train(prepared, run, "max_steps=4", "checkpoint_interval=2", "keep_checkpoints=3", launcher="python")
    out = tmp_path / "all.json"
    tasks = tmp_path / "tasks"  # the embedded SST-2 and a CoLA in its release's layout
    shutil.copytree(GLUE / "sst2", tasks / "sst2")
    cola = write(tasks, "cola")
    (cola.parent / "train.tsv").write_text(cola.read_text())
    args = [str(run), "--all-checkpoints", "--zero-shot", "sst2", "cola", "--task-files", str(tasks)]
    assert main([*args, "--limit", "40", "--text", str(SNARK), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["step"] for r in results] == [2, 4]
    accuracy = scalars(run, "zero_shot/sst2_acc")
    assert accuracy == pytest.approx({r["step"]: r["zero_shot"]["sst2"]["accuracy"] for r in results})
    matthews = scalars(run, "zero_shot/cola_matthews")
    assert matthews == pytest.approx({r["step"]: r["zero_shot"]["cola"]["matthews"] for r in results})
    bits = scalars(run, "text/bits_per_byte")
    assert bits == pytest.approx({r["step"]: r["text"]["all"]["bits_per_byte"] for r in results})
    assert bits[4] < bits[2]  # the model learns between its two checkpoints
    figure = plot([run], tmp_path / "curves.png").figure
    titled = {ax.get_title(): ax for ax in figure.axes}
    assert list(titled)[:4] == ["loss", "perplexity", "learning rate", "throughput"]
    lines = {line.get_label(): line for line in titled["zero-shot (GPT-1 §5)"].get_lines()}
    assert set(lines) == {"run (sst2_acc)", "run (cola_matthews)"}
    assert all(list(line.get_xdata()) == [2, 4] for line in lines.values())
    (line,) = titled["held-out text"].get_lines()
    assert list(line.get_ydata()) == pytest.approx([bits[2], bits[4]])


@pytest.mark.slow
def test_held_out_split_with_its_baselines(export, prepared, tmp_path):
    out = tmp_path / "held_out.json"
    args = [str(export), "--held-out", str(prepared), "--unigram", str(prepared), "--random-init"]
    assert main([*args, "--out", str(out)]) == 0
    text = json.loads(out.read_text())["text"]
    test_docs = json.loads((prepared / "clean" / "splits.json").read_text())["splits"]["test"]
    assert set(text) == {f"{prepared}:test/{d}" for d in test_docs} | {"all"}
    total = text["all"]
    assert total["tokens"] == sum(r["tokens"] for name, r in text.items() if name != "all")
    # An untrained model predicts nearly uniformly: ln(V) nats a token.
    uniform = math.log2(2000) * total["tokens"] / total["bytes"]
    assert total["random_init_bits_per_byte"] == pytest.approx(uniform, rel=0.02)
    assert total["unigram_bits_per_byte"] < 0.9 * uniform  # word frequencies carry information
    missing = tmp_path / "no_test"
    shutil.copytree(prepared / "clean", missing / "clean")
    splits = json.loads((missing / "clean" / "splits.json").read_text())
    splits["splits"]["test"] = []
    (missing / "clean" / "splits.json").write_text(json.dumps(splits))
    assert main([str(export), "--held-out", str(missing)]) == 1


def test_a_tokenizer_other_than_the_recorded_one_is_refused(export, prepared, tmp_path, caplog):
    docs, _ = train_docs(prepared)
    other = train_tokenizer(docs, tmp_path / "other", vocab_size=600, seed=5)  # fits the table, wrong one
    assert main([str(export), "--zero-shot", "sst2", "--limit", "4", "--tokenizer", str(other.path)]) == 1
    assert (
        f"{other.path}: sha256 {other.sha256[:12]}, but the model was trained with the tokenizer"
        in caplog.text
    )
    assert f"{export / 'tokenizer_info.json'} records" in caplog.text
    assert (
        main([str(export), "--zero-shot", "sst2", "--limit", "4", "--tokenizer", str(prepared / MODEL_NAME)])
        == 0
    )
