"""Checkpoints under real faults: a disk that fills during a save, and SIGKILL at many moments of
saves. Real DeepSpeed ranks (mpirun, torchrun; gloo), real files; nothing lost, the same losses after."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL, command, scalars, train

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
    assert "SaveFailed" not in out.stderr  # said, not thrown
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


def start(prepared: Path, run: Path, *overrides: str) -> subprocess.Popen:
    """A 2-rank training run in a process group of its own (to be killed whole); its output
    goes to ``run``.log (a pipe nobody reads would stall it)."""
    cmd = [*command("torchrun", free_port()), "--data", str(prepared), "--run-dir", str(run)]
    with open(run.with_suffix(".log"), "a") as log:
        return subprocess.Popen(
            [*cmd, *SMALL, *overrides], cwd=REPO, stdout=log, stderr=log, start_new_session=True
        )


def output(run: Path) -> str:
    return run.with_suffix(".log").read_text()[-3000:]


def tags(ckpt_dir: Path) -> set[str]:
    return {p.name for p in ckpt_dir.glob("step*")} if ckpt_dir.is_dir() else set()


def save_seconds(proc: subprocess.Popen, ckpt_dir: Path) -> list[float]:
    """Watch a run that saves every step: for each save, the time from its directory's
    appearance to its COMPLETE marker's."""
    seen: dict[str, float] = {}
    done: dict[str, float] = {}
    while proc.poll() is None:
        now = time.monotonic()
        for tag in tags(ckpt_dir):
            seen.setdefault(tag, now)
            if tag not in done and (ckpt_dir / tag / COMPLETE).exists():
                done[tag] = now
        time.sleep(0.001)
    assert proc.returncode == 0, output(ckpt_dir.parent)
    return [done[t] - seen[t] for t in done if t in seen]


def test_twenty_kills_during_saves_always_leave_a_complete_checkpoint(prepared, tmp_path):
    """SIGKILL to both ranks at a moment drawn (fixed seed) within the first save of each
    attempt, 20 times; every attempt resumes with resume=auto; the losses are the
    uninterrupted run's."""
    steps = ["max_steps=30", "checkpoint_interval=1", "keep_checkpoints=2", FP32]
    straight = start(prepared, tmp_path / "straight", *steps)
    seconds = sorted(save_seconds(straight, tmp_path / "straight" / "checkpoints"))
    reference = scalars(tmp_path / "straight", "train/loss")
    window = 1.5 * seconds[len(seconds) // 2]  # a save's length here, and its tail (latest, pruning)
    run = tmp_path / "killed"
    ckpt_dir = run / "checkpoints"
    rng = random.Random(20261202)
    mid_save = 0
    for attempt in range(20):
        before = tags(ckpt_dir)
        proc = start(prepared, run, *steps, "resume=auto")
        deadline = time.monotonic() + 300
        while not tags(ckpt_dir) - before:
            assert proc.poll() is None, f"attempt {attempt} ended early: {output(run)}"
            assert time.monotonic() < deadline, f"attempt {attempt}: no save began"
            time.sleep(0.001)
        time.sleep(rng.uniform(0, window))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        newest = max(p.name for p in ckpt_dir.glob("step*"))
        mid_save += not (ckpt_dir / newest / COMPLETE).exists()
        found = find_resume(ckpt_dir, "auto")
        if found is not None:  # what the next attempt resumes from is complete, and so is `latest`
            assert (found[0] / found[1] / COMPLETE).is_file()
            if (ckpt_dir / LATEST).exists():
                assert (ckpt_dir / (ckpt_dir / LATEST).read_text() / COMPLETE).is_file()
            else:  # killed between the first save's marker and its `latest`
                assert complete_tags(ckpt_dir) == [found[1]]
    print(f"{mid_save} of 20 kills landed inside a save (window {window:.3f} s)")
    assert mid_save >= 5, f"only {mid_save} of 20 kills landed inside a save ({window:.3f} s)"
    train(prepared, run, *steps, "resume=auto")
    losses = scalars(run, "train/loss")
    assert sorted(losses) == list(range(1, 31))
    for step in range(1, 31):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step
