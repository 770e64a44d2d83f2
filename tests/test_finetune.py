"""gpt1_ds.finetune: the task head, the auxiliary LM loss, and real 2-rank runs on SST-2 and RTE."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BIN, REPO, mpirun

from gpt1_ds.checkpoint import ClientState
from gpt1_ds.config import FinetuneConfig
from gpt1_ds.env import free_port
from gpt1_ds.finetune import epoch_batches, load_backbone
from gpt1_ds.hf import export_hf
from gpt1_ds.loading import load_model
from gpt1_ds.model import GPT, GPTConfig
from gpt1_ds.tasks import GLUE
from gpt1_ds.tokenizer import MODEL_NAME, load_tokenizer


def test_epoch_batches_are_disjoint_equal_and_reshuffled():
    a = epoch_batches(103, 4, 0, 2, seed=1, epoch=0)
    b = epoch_batches(103, 4, 1, 2, seed=1, epoch=0)
    assert len(a) == len(b) == 103 // 2 // 4
    flat_a, flat_b = [i for m in a for i in m], [i for m in b for i in m]
    assert not set(flat_a) & set(flat_b) and len(set(flat_a)) == len(flat_a)
    assert epoch_batches(103, 4, 0, 2, seed=1, epoch=1) != a
    assert epoch_batches(103, 4, 0, 2, seed=1, epoch=0) == a


def finetune(tmp: Path, *args: str, port: int, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*mpirun(port), sys.executable, "-m", "gpt1_ds.finetune", "--run-dir", str(tmp), *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_sst2_two_ranks_beats_the_majority_class(prepared, tmp_path):
    """A one-layer model of width 64 from random init, 3 epochs of 4,000 SST-2 sentences on 2 ranks (a
    higher lr than GPT-1's 6.25e-5, which is meant for a pretrained model), in fp32 (bf16 fine-tuning:
    the RTE test)."""
    run = tmp_path / "sst2"
    out = finetune(
        run,
        "--task=sst2",
        f"--train={GLUE / 'sst2' / 'stsa.binary.train'}",
        f"--dev={GLUE / 'sst2' / 'stsa.binary.dev'}",
        "--init=none",
        f"--tokenizer={prepared / MODEL_NAME}",
        "model=tiny",
        "model_overrides.vocab_size=2000",
        "model_overrides.n_layer=1",
        "model_overrides.n_embd=64",
        "model_overrides.n_head=2",
        "model_overrides.n_inner=256",
        "model_overrides.n_positions=64",
        "max_train_examples=4000",
        "epochs=3",
        "log_interval=50",
        "ds.optimizer.params.lr=6e-3",
        "ds.bf16.enabled=false",  # fp32: a CPU without bf16 units (no AVX-512) takes 10× longer in bf16
        port=free_port(),
    )
    results = json.loads((run / "results.json").read_text())
    assert results["majority_dev"] == pytest.approx(444 / 872)
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    best = json.loads((run / "best.json").read_text())
    assert best["accuracy"] == max(h["accuracy"] for h in results["history"])
    assert best["accuracy"] > results["majority_dev"] + 0.05, results
    assert 0 < best["f1"] <= 1
    assert (run / "checkpoints" / best["tag"] / "COMPLETE").is_file()
    assert "majority class on dev 50.9%" in out.stderr
    config = (run / "ds_config.json").read_text()
    ds = json.loads(config)
    assert ds["scheduler"]["params"]["total_num_steps"] == 3 * (4000 // 2 // 8 // 2)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 1  # 0.2% of 375 steps, rounded up
    assert ds["scheduler"]["params"]["warmup_max_lr"] == 6e-3


RULES = {"truncation": "shared", "lm_loss_average": "sequence", "clf_dropout_mask": "example"}
"""The fine-tuning rules that are not the defaults."""


@pytest.mark.slow
def test_rte_from_a_pretraining_checkpoint(shipped_runs, tmp_path):
    """From a 2-step pretraining run (train.py, ZeRO-2), fine-tune RTE with the rules that are not the
    defaults; the run reports accuracy and its checkpoint records the rules."""
    pre = shipped_runs("zero2")
    assert (pre / MODEL_NAME).is_file()  # the run keeps its tokenizer: --init needs nothing else
    run = tmp_path / "rte"
    out = finetune(
        run,
        "--task=rte",
        f"--train={GLUE / 'rte' / 'train.tsv'}",
        f"--dev={GLUE / 'rte' / 'dev.tsv'}",
        f"--init={pre / 'checkpoints'}",
        "epochs=1",
        "max_train_examples=128",
        *(f"{key}={value}" for key, value in RULES.items()),
        port=free_port(),
    )
    results = json.loads((run / "results.json").read_text())
    (h,) = results["history"]
    assert 0 <= h["accuracy"] <= 1 and "f1" in h and h["loss"] > 0
    assert "epoch 1 (step 4): dev accuracy" in out.stderr
    assert results["best"]["tag"] == "step00000004"
    assert "(mean per sequence); truncation shared; classifier dropout mask per example" in out.stderr
    states = torch.load(
        run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt", weights_only=False
    )
    recorded = ClientState.from_dict(states, "step00000004").config
    assert {key: recorded[key] for key in RULES} == RULES  # the checkpoint records the rules it ran with
    # the fine-tuned run carries its tokenizer, and its GPT exports like a pretraining run's
    model, tokenizer = load_model(run / "checkpoints")
    assert tokenizer == run / MODEL_NAME and tokenizer.read_bytes() == (pre / MODEL_NAME).read_bytes()
    assert model.config.n_positions == 64 and model.lm_head.weight is model.tokens_embed.weight
    # a resume with another batch layout would shift the epochs: refused, naming both
    args = (
        "--task=rte",
        f"--train={GLUE / 'rte' / 'train.tsv'}",
        f"--dev={GLUE / 'rte' / 'dev.tsv'}",
        f"--init={pre / 'checkpoints'}",
        "epochs=2",
        "max_train_examples=128",
    )
    rules = [f"{key}={value}" for key, value in RULES.items()]
    again = finetune(run, *args, *rules, "micro_batch_size=4", port=free_port(), check=False)
    assert again.returncode != 0
    assert "'micro_batch_size': 8" in again.stderr and "'micro_batch_size': 4" in again.stderr
    assert "the epochs would not line up" in again.stderr
    # and one with the default rules would frame and weigh the examples otherwise: refused first
    again = finetune(run, *args, port=free_port(), check=False)
    assert again.returncode != 0 and "other fine-tuning rules" in again.stderr, again.stderr[-3000:]
    assert again.returncode == 2  # SETUP_ERROR_EXIT, passed on by the launcher
    assert "Traceback" not in again.stderr  # refused with the reason only, before any step
    assert "'truncation': ('shared', 'gpt1')" in again.stderr
    assert (
        "resume with truncation=shared lm_loss_average=sequence, or start afresh with resume=new"
        in again.stderr
    )


@pytest.mark.slow
def test_bad_label_in_dev_fails_before_training(prepared, tmp_path):
    dev = tmp_path / "dev"
    dev.write_text("1 a fine film .\n3 what a label .\n")
    out = finetune(
        tmp_path / "run",
        "--task=sst2",
        f"--train={GLUE / 'sst2' / 'stsa.binary.dev'}",
        f"--dev={dev}",
        "--init=none",
        f"--tokenizer={prepared / MODEL_NAME}",
        "model=tiny",
        "model_overrides.vocab_size=2000",
        port=free_port(),
        check=False,
    )
    assert out.returncode != 0
    assert f"{dev}:2: unknown label '3'; the label set is ['0', '1']" in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_other_launchers(launcher, prepared, tmp_path):
    """One process, and torchrun's two ranks (the other tests' are mpirun's, found through mpi4py):
    the same script, the same result files."""
    run = tmp_path / launcher
    args = [
        "-m",
        "gpt1_ds.finetune",
        "--task=sst2",
        f"--train={GLUE / 'sst2' / 'stsa.binary.dev'}",
        f"--dev={GLUE / 'sst2' / 'stsa.binary.dev'}",
        "--init=none",
        f"--tokenizer={prepared / MODEL_NAME}",
        f"--run-dir={run}",
        "model=tiny",
        "model_overrides.vocab_size=2000",
        "model_overrides.n_layer=1",
        "max_train_examples=128",
        "epochs=1",
    ]
    cmd = [sys.executable, *args]
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = 1 if launcher == "python" else 2
    micro = 32 // ranks  # micro_batch_size auto: the batch of 32 per rank, under the tiny preset's 64
    assert f"{ranks} ranks (cpu, gloo) × micro-batch {micro} × accumulation 1" in out.stderr
    (h,) = json.loads((run / "results.json").read_text())["history"]
    assert h["step"] == 4  # 128 examples in steps of 32, on 1 rank as on 2


@pytest.mark.parametrize("setting", ["new", "keep"])
def test_task_tokens_are_drawn_afresh_as_gpt1_did_unless_kept(prepared, tmp_path, setting):
    tok = load_tokenizer(prepared / MODEL_NAME)
    torch.manual_seed(0)
    pretrained = GPT(GPTConfig.from_preset("tiny", vocab_size=2000, n_layer=1))
    with torch.no_grad():  # rows as pretraining leaves them: far from a fresh N(0, 0.02)
        pretrained.tokens_embed.weight.mul_(10)
    export_hf(pretrained, tmp_path / "hf")
    shutil.copy(prepared / MODEL_NAME, tmp_path / "hf" / MODEL_NAME)
    cfg = FinetuneConfig(init=str(tmp_path / "hf"), train="t", dev="d", task_tokens=setting)
    gpt, _ = load_backbone(cfg)
    before, after = pretrained.tokens_embed.weight, gpt.tokens_embed.weight
    task = [tok.start_id, tok.delim_id, tok.extract_id]
    others = [i for i in range(2000) if i not in task]
    torch.testing.assert_close(after[others], before[others])
    assert gpt.lm_head.weight is gpt.tokens_embed.weight  # the head's columns go with the rows
    if setting == "keep":
        torch.testing.assert_close(after[task], before[task])
    else:
        assert not torch.allclose(after[task], before[task])
        assert 0.01 < after[task].std().item() < 0.03  # N(0, 0.02), not the pretrained scale (0.2)
