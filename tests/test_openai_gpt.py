"""GPT-1 as OpenAI released it: an ``openai-gpt`` directory (config.json, model.safetensors,
vocab.json, merges.txt) fine-tuned, exported, reloaded and sampled by gpt1-ds.

The directory is built here: the tokenizer files learned from a real book (``openai_dir``), random
weights saved by transformers' ``OpenAIGPTLMHeadModel.save_pretrained`` (the real weights cannot be
downloaded in the tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import OPENAI_GPT_SHAPE as SHAPE
from conftest import REPO
from test_finetune import GLUE, finetune

from gpt1_ds.config import FinetuneConfig
from gpt1_ds.env import free_port
from gpt1_ds.finetune import load_backbone
from gpt1_ds.hf import import_hf
from gpt1_ds.loading import fit_vocab, init_from, load_model, model_from_checkpoint
from gpt1_ds.model import GPT, GPTConfig
from gpt1_ds.openai_bpe import MERGES_NAME, VOCAB_NAME
from gpt1_ds.tokenizer import MODEL_NAME, load_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("spacy")


@pytest.fixture(scope="module")
def released(openai_gpt_dir) -> Path:
    return openai_gpt_dir


def config(released: Path, **overrides) -> FinetuneConfig:
    return FinetuneConfig(task="sst2", init=str(released), **overrides)


def test_the_task_tokens_are_appended_as_new_rows_and_the_rest_is_the_released_model(released):
    torch.manual_seed(0)
    gpt, tok = load_backbone(config(released))
    hf = import_hf(released)
    assert tok.kind == "openai-bpe" and tok.path == released
    base = tok.base_size
    assert hf.config.vocab_size == base  # the released table has no task tokens
    assert gpt.config.vocab_size == tok.vocab_size == base + 3
    assert [tok.start_id, tok.delim_id, tok.extract_id] == list(tok.appended) == [base, base + 1, base + 2]
    table = gpt.tokens_embed.weight
    assert torch.equal(table[:base], hf.tokens_embed.weight)
    assert 0.01 < table[base:].std().item() < 0.03  # N(0, 0.02), as the original initialised them
    ids = torch.tensor([tok.encode("it was a good film , i liked it .")])
    with torch.no_grad():  # the released model's logits over its own vocabulary are unchanged
        torch.testing.assert_close(gpt.eval()(ids)[..., :base], hf.eval()(ids), rtol=0, atol=1e-6)


def test_padding_rows_come_after_the_appended_task_tokens(released):
    gpt, tok = load_backbone(config(released))
    table = GPT(GPTConfig(vocab_size=tok.base_size, vocab_multiple=64, **SHAPE, n_inner=256))
    padded = fit_vocab(table, tok, append=True)
    assert padded.config.vocab_size == tok.vocab_size and padded.config.padded_vocab_size % 64 == 0
    assert not padded.tokens_embed.weight[tok.vocab_size :].any()  # padding: zero, after the task tokens
    assert padded.tokens_embed.weight[tok.base_size : tok.vocab_size].std() > 0.01  # task tokens: drawn
    assert gpt.config.vocab_multiple == 1


def test_the_released_directory_is_evaluated_zero_shot(released, tmp_path):
    from gpt1_ds import evaluate

    out = tmp_path / "results.json"
    assert evaluate.main([str(released), "--zero-shot", "sst2", "--limit", "64", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["zero_shot"]["sst2"]
    assert result["examples"] == 64 and 0 <= result["accuracy"] <= 1


def test_bad_directories_are_errors_naming_the_file_and_both_values(released, prepared, tmp_path):
    weights_only = tmp_path / "weights_only"
    shutil.copytree(released, weights_only, ignore=shutil.ignore_patterns("*.json", "*.txt"))
    shutil.copyfile(released / "config.json", weights_only / "config.json")
    with pytest.raises(ValueError, match=f"{weights_only}: a model without a tokenizer"):
        load_backbone(config(weights_only))

    no_merges = tmp_path / "no_merges"
    shutil.copytree(released, no_merges)
    (no_merges / MERGES_NAME).unlink()
    with pytest.raises((FileNotFoundError, ValueError), match=MERGES_NAME):
        load_backbone(config(no_merges))

    bigger = tmp_path / "bigger"  # a table with more rows than the vocabulary has ids
    shutil.copytree(released, bigger)
    hf = json.loads((bigger / "config.json").read_text())
    torch.manual_seed(0)
    model = transformers.OpenAIGPTLMHeadModel(
        transformers.OpenAIGPTConfig(**{**hf, "vocab_size": hf["vocab_size"] + 10})
    )
    model.save_pretrained(bigger)
    tok = load_tokenizer(bigger)
    with pytest.raises(
        ValueError, match=rf"{bigger}: the tokenizer \(openai-bpe\) has {tok.base_size:,} ids"
    ):
        load_backbone(config(bigger))

    ours = prepared / MODEL_NAME  # our sentencepiece tokenizer given for GPT-1's model
    with pytest.raises(ValueError, match=r"sentencepiece.*is not the tokenizer of.*openai-bpe"):
        load_backbone(config(released, tokenizer=str(ours)))

    # Pretraining on a prepared dataset from the released weights: the tokenizers differ in kind.
    model = GPT(GPTConfig(vocab_size=tok.base_size, **SHAPE, n_inner=256))
    with pytest.raises(ValueError, match=r"\(openai-bpe, sha256 .*\) is not the dataset's .*\(sentencepiece"):
        init_from(model, str(released), load_tokenizer(ours))


@pytest.mark.slow
def test_fine_tune_export_reload_and_generate_from_a_released_directory(released, tmp_path):
    run = tmp_path / "run"
    out = finetune(
        run,
        "--task=sst2",
        f"--train={GLUE / 'sst2' / 'stsa.binary.train'}",
        f"--dev={GLUE / 'sst2' / 'stsa.binary.dev'}",
        f"--init={released}",
        "max_train_examples=512",
        "epochs=1",
        "log_interval=8",
        "ds.optimizer.params.lr=1e-3",
        port=free_port(),
    )
    assert "task tokens appended as new rows" in out.stderr
    results = json.loads((run / "results.json").read_text())
    assert len(results["history"]) == 1 and 0 <= results["history"][0]["accuracy"] <= 1
    for name in (VOCAB_NAME, MERGES_NAME):  # the run keeps its tokenizer
        assert (run / name).read_bytes() == (released / name).read_bytes()

    tuned, _ = model_from_checkpoint(run / "checkpoints")
    tok = load_tokenizer(run)
    assert tuned.config.vocab_size == tok.vocab_size

    export = tmp_path / "export"
    subprocess.run(
        [sys.executable, "-m", "gpt1_ds.export", str(run / "checkpoints"), "--out", str(export)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    card = (export / "README.md").read_text()
    assert f"fine-tuned with gpt1-ds on `sst2` from `{released}`" in card and "OpenAIGPTTokenizer" in card
    hf = transformers.OpenAIGPTLMHeadModel.from_pretrained(export).eval()
    assert hf.config.vocab_size == tok.vocab_size
    ids = torch.tensor([tok.encode("a fine , moving film .")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, tuned.eval()(ids), rtol=0, atol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    assert hf_tok.convert_tokens_to_ids(["_start_", "_delimiter_", "_classify_"]) == list(tok.appended)
    again, found = load_model(export)
    assert found == export and load_tokenizer(found).sha256 == tok.sha256
    assert torch.equal(again.tokens_embed.weight, tuned.tokens_embed.weight)

    for source in (released, export):  # the released model and the fine-tuned one both generate
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "gpt1_ds.generate",
                str(source),
                "--prompt",
                "the film was",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        text = done.stdout.split("--- [1] ---\n")[1].splitlines()[0]
        assert text.startswith("the film was") and len(text) > len("the film was"), done.stdout
        assert "8 new tokens" in done.stderr  # no end-of-text id: GPT-1's tokenizer has none
