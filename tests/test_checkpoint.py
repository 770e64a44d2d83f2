"""gpt1_ds.checkpoint: which tag a resume takes, pruning, DeepSpeed's silent failure, and the
client state's format (checkpoints written before it had a version still load, resume, export)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL, scalars

from gpt1_ds import checkpoint
from gpt1_ds.env import free_port
from gpt1_ds.export import export
from gpt1_ds.loading import load_model
from gpt1_ds.tokenizer import MODEL_NAME


def make_tags(root, complete: list[int], partial: list[int]):
    for step in complete + partial:
        tag = root / checkpoint.tag_for(step)
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if step in complete:
            (tag / checkpoint.COMPLETE).write_text(f"{step}\n")


def test_auto_resume_takes_the_newest_complete_tag_never_a_half_written_one(tmp_path):
    make_tags(tmp_path, complete=[100, 200], partial=[300])
    assert checkpoint.find_resume(tmp_path, "auto") == (tmp_path, "step00000200")
    assert checkpoint.find_resume(tmp_path / "empty", "auto") is None
    assert checkpoint.find_resume(tmp_path / "empty", "none") is None
    with pytest.raises(ValueError, match=r"\(step00000100 … step00000300\).*resume=auto.*resume=new"):
        checkpoint.find_resume(tmp_path, "none")  # a directory with checkpoints: never mixed
    assert checkpoint.find_resume(tmp_path, "new") is None  # (the run moved aside first: resume())
    assert checkpoint.find_resume(tmp_path, str(tmp_path / "step00000100")) == (tmp_path, "step00000100")
    assert checkpoint.find_resume(tmp_path, str(tmp_path)) == (tmp_path, "step00000200")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.find_resume(tmp_path, str(tmp_path / "step00000300"))


def test_another_runs_checkpoint_is_refused_into_a_directory_with_checkpoints(tmp_path):
    make_tags(tmp_path / "other", complete=[5], partial=[])
    make_tags(tmp_path / "mine", complete=[7], partial=[])
    other = str(tmp_path / "other" / "step00000005")
    assert checkpoint.find_resume(tmp_path / "new", other) == (tmp_path / "other", "step00000005")
    with pytest.raises(ValueError, match=r"\(step00000007\), which resume=.*other.* would mix"):
        checkpoint.find_resume(tmp_path / "mine", other)


def test_resume_new_moves_the_run_directory_aside_into_the_next_previous_folder(tmp_path):
    run = checkpoint.RunDir(tmp_path / "run")
    assert checkpoint.move_aside(run) is None  # nothing there
    make_tags(run.checkpoints, complete=[100], partial=[])
    run.config.write_text("old: 1\n")
    (run.path / "previous-1").mkdir()
    aside = checkpoint.move_aside(run)
    assert aside == run.path / "previous-2" and sorted(p.name for p in run.path.iterdir()) == [
        "previous-1",
        "previous-2",
    ]
    assert (aside / "checkpoints" / "step00000100" / checkpoint.COMPLETE).is_file()
    assert (aside / "config.yaml").read_text() == "old: 1\n"


def test_prune_keeps_the_last_k_and_drops_older_unfinished_saves(tmp_path):
    make_tags(tmp_path, complete=[100, 200, 300, 400], partial=[250, 500])
    checkpoint.prune(tmp_path, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    # 500 is newer than the newest complete tag: it may be a save still in flight elsewhere.
    assert left == ["step00000300", "step00000400", "step00000500"]


class _EngineThatFindsNothing:
    def load_checkpoint(self, load_dir, tag=None):
        return None, None  # what DeepSpeed returns, with only a warning, when nothing is there


def test_a_failed_deepspeed_load_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="could not load checkpoint"):
        checkpoint.load(_EngineThatFindsNothing(), tmp_path, "step00000100")


# ---- checkpoints written before the client state had a format version (tests/data/legacy) ----

LEGACY = Path(__file__).parent / "data" / "legacy"
# test_train's small settings with the legacy runs' smaller model (later overrides win)
LEGACY_TINY = [
    *SMALL,
    *("model_overrides.n_layer=1", "model_overrides.n_embd=32", "model_overrides.n_inner=128"),
]
LEGACY_TINY.append("eval_batches=2")


def legacy_copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(LEGACY / name, tmp_path / name))


@pytest.mark.parametrize(
    ("name", "kind", "step"),
    [
        ("pretrain_zero2", "pretrain", 3),
        ("pretrain_zero0_bf16", "pretrain", 2),
        ("finetune_sst2", "finetune", 2),
    ],
)
def test_a_legacy_checkpoint_reads_as_format_0_and_exports(name, kind, step, tmp_path):
    run = legacy_copy(name, tmp_path)
    tag = checkpoint.tag_for(step)
    states = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert "format_version" not in states and "kind" not in states  # as written before
    state = checkpoint.ClientState.from_dict(states, tag)
    assert (state.kind, state.step, state.seed) == (kind, step, 1234)
    assert state.model_config["n_embd"] == 32
    if kind == "finetune":
        assert state.task == {"kind": "classification", "labels": ["0", "1"], "num_outputs": 2}
        assert state.layout["micro_batch_size"] == 8 and state.config["task"] == "sst2"
    else:
        assert state.loader["epoch"] == 0 and state.tokens_seen == 8 * 64 * step
    model, tokenizer = load_model(run / "checkpoints")
    assert tokenizer == run / MODEL_NAME and model.lm_head.weight is model.tokens_embed.weight
    out = export(run / "checkpoints", tmp_path / "hf")
    again, _ = load_model(out)
    x = torch.randint(0, 2000, (2, 16))
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=1e-6)
    # the current format writes the same layout, with its version and kind
    written = state.to_dict()
    assert written["format_version"] == checkpoint.FORMAT_VERSION and written["kind"] == kind
    assert checkpoint.ClientState.from_dict(written, "again") == state


def test_a_client_state_of_a_newer_format_is_refused():
    with pytest.raises(checkpoint.CheckpointError, match="client state format 99"):
        checkpoint.ClientState.from_dict({"format_version": 99, "step": 1}, "ckpt/step00000001")


def legacy_launch(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_a_legacy_pretraining_checkpoint_is_refused_naming_why_and_its_weights_train_on(prepared, tmp_path):
    """A checkpoint whose loader state predates the order by global batch (version 1) is refused
    before DeepSpeed loads it, naming the way out; that way out (init=) trains from its weights."""
    run = legacy_copy("pretrain_zero2", tmp_path)
    common = [*LEGACY_TINY, "max_steps=6", "ds.bf16.enabled=false"]
    args = ["--deepspeed_config", "ds_configs/zero2.json", "--data", str(prepared)]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "gpt1_ds.train", *args, "--run-dir", str(run), *common]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    saved = run / "checkpoints" / "step00000003"
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (
        f"{saved}: the checkpoint's loader state is version 1, whose data order depended on the world size "
        f"and micro-batch" in out.stderr
    )
    assert f"train on from its weights in a new run (init={saved} with another --run-dir)" in out.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000003"]  # untouched
    legacy_launch("gpt1_ds.train", *args, "--run-dir", str(tmp_path / "new"), *common, f"init={saved}")
    model, _ = load_model(tmp_path / "new" / "checkpoints")
    assert sorted(scalars(tmp_path / "new", "train/loss")) == [1, 2, 3, 4, 5, 6]
    assert model.config.n_embd == 32


@pytest.mark.slow
def test_a_legacy_finetuning_checkpoint_resumes(tmp_path):
    run = legacy_copy("finetune_sst2", tmp_path)
    out = legacy_launch(
        "gpt1_ds.finetune",
        *("--deepspeed_config", "ds_configs/finetune.json", "--task", "sst2", "--run-dir", str(run)),
        *("--train", "data/glue/sst2/stsa.binary.train", "--dev", str(LEGACY / "finetune_sst2_dev.txt")),
        *("--init", str(LEGACY / "pretrain_zero2" / "checkpoints")),
        *("max_train_examples=64", "max_steps=4", "micro_batch_size=8", "ds.train_batch_size=8"),
    )
    assert f"resumed from {run}/checkpoints/step00000002 at step 2" in out.stderr
    assert json.loads((run / "results.json").read_text())["history"][-1]["step"] == 4
