"""Checkpoints under real faults: a disk that fills during a save, and SIGKILL at many moments of
saves. Real DeepSpeed ranks (torchrun, gloo), real files; nothing lost, the same losses after."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_train import SMALL, command, scalars, train

from gpt1_ds.checkpoint import COMPLETE, LATEST, complete_tags, find_resume
from gpt1_ds.env import free_port

pytestmark = pytest.mark.slow  # every test starts training processes

FP32 = "ds.bf16.enabled=false"  # losses compared exactly


def size(path: Path) -> int:
    """Bytes of the files under ``path``, each rounded up to whole 4 KiB pages (as tmpfs counts)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in path.rglob("*") if f.is_file())


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(bytes)``: a tmpfs of that size at one place, mounted or resized; unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "tmpfs"
    where.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        opts = f"size={size}"
        cmd = ["mount", "-o", f"remount,{opts}", str(where)] if mounted else ["mount", "-t", "tmpfs"]
        if not mounted:
            cmd += ["-o", opts, "tmpfs", str(where)]
        subprocess.run(cmd, check=True, capture_output=True)
        mounted.append(size)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_fails_the_save_clearly_keeps_the_last_checkpoint_and_resumes(prepared, tmp_path, tmpfs):
    steps = ["max_steps=12", "checkpoint_interval=4", "keep_checkpoints=1", FP32]
    straight = tmp_path / "straight"
    train(prepared, straight, *steps)
    reference = scalars(straight, "train/loss")
    ckpt = size(straight / "checkpoints" / "step00000012")
    rest = size(straight) - size(straight / "checkpoints") + 64 * 4096  # logs, config, tokenizer
    # Room for one checkpoint and half of the next: the save of step 8 runs out of space.
    run = tmpfs(rest + ckpt + ckpt // 2) / "run"
    out = train(prepared, run, *steps, check=False)
    assert out.returncode == 1, out.stderr[-3000:]
    ckpt_dir = run / "checkpoints"
    assert f"checkpoint {ckpt_dir / 'step00000008'} could not be saved (rank " in out.stderr
    assert "the disk is full" in out.stderr
    assert f"the last complete checkpoint, {ckpt_dir / 'step00000004'}, is intact" in out.stderr
    assert "SaveFailed" not in out.stderr  # said, not thrown (torchrun still reports the exit code)
    assert complete_tags(ckpt_dir) == ["step00000004"]
    assert (ckpt_dir / LATEST).read_text() == "step00000004"
    assert not (ckpt_dir / "step00000008").exists()  # the partial save was removed

    tmpfs(rest + 3 * ckpt)  # space freed
    out = train(prepared, run, *steps, "resume=auto")
    assert "at step 4" in out.stderr
    losses = scalars(run, "train/loss")
    assert sorted(losses) == list(range(1, 13))
    for step in range(1, 13):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step


def test_twenty_kills_during_saves_always_leave_a_complete_checkpoint(prepared, tmp_path):
    """SIGKILL to both ranks at a moment drawn (fixed seed) within the first save of each
    attempt, 20 times; every attempt resumes with resume=auto; the losses are the
    uninterrupted run's."""
    steps = ["max_steps=30", "checkpoint_interval=1", "keep_checkpoints=2", FP32]
    train(prepared, tmp_path / "straight", *steps)
    reference = scalars(tmp_path / "straight", "train/loss")
    run = tmp_path / "killed"
    ckpt_dir = run / "checkpoints"
    rng = random.Random(20261202)
    mid_save = 0
    for attempt in range(20):
        before = {p.name for p in ckpt_dir.glob("step*")} if ckpt_dir.is_dir() else set()
        cmd = [*command("torchrun", free_port()), "--data", str(prepared), "--run-dir", str(run)]
        proc = subprocess.Popen(
            [*cmd, *SMALL, *steps, "resume=auto"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while not (ckpt_dir.is_dir() and {p.name for p in ckpt_dir.glob("step*")} - before):
            assert proc.poll() is None, f"attempt {attempt} ended early: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"attempt {attempt}: no save began"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.08))  # a save of this model takes tens of milliseconds
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        newest = max(p.name for p in ckpt_dir.glob("step*"))
        mid_save += not (ckpt_dir / newest / COMPLETE).exists()
        found = find_resume(ckpt_dir, "auto")
        if found is not None:  # what the next attempt resumes from is complete, and so is `latest`
            assert (found[0] / found[1] / COMPLETE).is_file()
            assert (ckpt_dir / (ckpt_dir / LATEST).read_text() / COMPLETE).is_file()
    assert mid_save >= 3, f"only {mid_save} of 20 kills landed inside a save"
    train(prepared, run, *steps, "resume=auto")
    losses = scalars(run, "train/loss")
    assert sorted(losses) == list(range(1, 31))
    for step in range(1, 31):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step
