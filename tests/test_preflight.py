"""gpt1_ds/preflight.py: the verdicts, the report over a run's files, and the checks on 2 real ranks.
The whole job (slurm/preflight_cpu.sh, with its USR1 round trip) is in test_slurm.py."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL, mpirun
from test_data import flip

from gpt1_ds import preflight
from gpt1_ds.checkpoint import COMPLETE, RunDir, tag_for
from gpt1_ds.env import free_port


def test_bus_bandwidth_is_nccl_tests_definition_and_only_nccl_is_judged():
    # 1 GB over 8 ranks in 10 ms: each byte crosses 2 × 7/8 links → 175 GB/s
    assert preflight.bus_bandwidth(10**9, 0.01, 8) == pytest.approx(175e9)
    assert preflight.bus_bandwidth(10**9, 0.01, 2) == pytest.approx(100e9)
    assert preflight.judge_bandwidth("intra-node", 150, "nccl") == preflight.PASS
    assert preflight.judge_bandwidth("intra-node", 20, "nccl") == preflight.WARN  # PCIe-class
    assert preflight.judge_bandwidth("intra-node", 5, "nccl") == preflight.FAIL
    assert preflight.judge_bandwidth("inter-node", 25, "nccl") == preflight.PASS
    assert preflight.judge_bandwidth("inter-node", 1, "nccl") == preflight.FAIL
    assert preflight.judge_bandwidth("inter-node", 0.01, "gloo") == preflight.INFO


def fake_run(run: Path, losses: dict[int, float], saved: list[int], checks: str = preflight.PASS) -> None:
    """A run directory as the preflight job leaves it: check rows, TensorBoard scalars in two
    attempts (the second after the checkpoint at ``saved[0]``), complete checkpoints, the USR1 note."""
    from torch.utils.tensorboard import SummaryWriter

    out = run / "preflight"
    out.mkdir(parents=True)
    rows = [preflight.Row("versions", checks, "torch …")]
    (out / preflight.CHECKS).write_text(json.dumps([r.__dict__ for r in rows]))
    for attempt in (0, 1):
        writer = SummaryWriter(str(RunDir(run).tensorboard), purge_step=saved[0] + 1 if attempt else None)
        for step, loss in losses.items():
            if (step <= saved[0]) == (attempt == 0):
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/step_time", 0.5 if step in (5, saved[0] + 5) else 0.03, step)
                writer.add_scalar("train/tokens_per_sec", 1000.0, step)
        writer.close()
    for step in saved:
        (RunDir(run).checkpoints / tag_for(step)).mkdir(parents=True)
        (RunDir(run).checkpoints / tag_for(step) / COMPLETE).write_text(str(step))
    (out / "usr1.json").write_text(json.dumps({"usr1_after_step": 15, "usr1_time": 0.0}))


def verdict(run: Path) -> dict:
    return json.loads((run / "preflight" / preflight.VERDICT_JSON).read_text())


def test_the_report_passes_a_run_preempted_resumed_and_finished(tmp_path, capsys):
    losses = {s: 8.0 - s / 10 for s in range(5, 31, 5)}
    fake_run(tmp_path, losses, saved=[20, 30])
    assert preflight.report(tmp_path, steps=30, log_every=5, restarts=1) == 0
    out = verdict(tmp_path)
    assert out["verdict"] == "PASS"
    rows = {r["check"]: r for r in out["rows"]}
    training, trip = rows["training"], rows["preemption round trip"]
    assert training["verdict"] == "PASS" and "loss 7.500 → 5.000" in training["detail"]
    # the first window of each attempt (steps 5 and 25: start-up work) is not a speed figure
    assert training["figures"]["ms_per_step"] == pytest.approx(30.0)
    assert trip["verdict"] == "PASS" and trip["figures"]["checkpoint_step"] == 20
    assert "→ checkpoint at step 20 → requeued (restart 1) → resumed at step 20 → step 30" in trip["detail"]
    assert "gpt1-ds preflight: PASS" in capsys.readouterr().out
    assert (tmp_path / "preflight" / preflight.VERDICT_MD).read_text().startswith("# gpt1-ds preflight: PASS")


@pytest.mark.parametrize(
    ("case", "restarts", "saved", "drop", "bad", "expected"),
    [
        ("not requeued", 0, [20, 30], None, None, "was not requeued"),
        ("no USR1 checkpoint", 1, [30], None, None, "none taken on USR1"),
        ("a step missing", 1, [20, 30], 15, None, "missing [15]"),
        ("a NaN", 1, [20, 30], None, 10, "a non-finite loss"),
    ],
)
def test_the_report_fails_what_went_wrong(tmp_path, case, restarts, saved, drop, bad, expected):
    losses = {s: 8.0 - s / 10 for s in range(5, 31, 5) if s != drop}
    if bad:
        losses[bad] = math.nan
    fake_run(tmp_path, losses, saved=saved)
    assert preflight.report(tmp_path, steps=30, log_every=5, restarts=restarts) == 1, case
    out = verdict(tmp_path)
    assert out["verdict"] == "FAIL"
    assert any(r["verdict"] == "FAIL" and expected in r["detail"] for r in out["rows"]), out["rows"]


def test_a_failed_check_skips_the_training_rows(tmp_path):
    (tmp_path / "preflight").mkdir()
    row = preflight.Row("dataset", preflight.FAIL, "data: rank 1 on vm: ShardError: …")
    (tmp_path / "preflight" / preflight.CHECKS).write_text(json.dumps([row.__dict__]))
    assert preflight.report(tmp_path, steps=30, log_every=5, restarts=0) == 1
    rows = verdict(tmp_path)["rows"]
    assert [(r["check"], r["verdict"]) for r in rows] == [
        ("dataset", "FAIL"),
        ("training", "SKIP"),
        ("preemption round trip", "SKIP"),
    ]


@pytest.mark.slow
def test_the_checks_on_two_ranks_name_the_rank_and_shard_that_cannot_be_read(prepared, tmp_path):
    """Real ranks (mpirun), a real fault: one byte of shard 1 flipped. Rank r reads a member of
    shard r, so rank 1 fails the dataset check and rank 0 reports it; the other rows pass."""
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    flip(data / "train" / "shard-000001.tar", 512 + 40, 0x01)  # inside member 0's bytes
    run = tmp_path / "run"
    cmd = [*mpirun(free_port()), sys.executable, "-m", "gpt1_ds.preflight", "check", "--data", str(data)]
    cmd += ["--run-dir", str(run)]
    out = subprocess.run([*cmd, *SMALL], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stderr[-3000:]
    rows = {r["check"]: r for r in json.loads((run / "preflight" / preflight.CHECKS).read_text())}
    assert rows["dataset"]["verdict"] == "FAIL"
    assert "rank 1 on " in rows["dataset"]["detail"] and "shard-000001.tar" in rows["dataset"]["detail"]
    assert "crc32" in rows["dataset"]["detail"]
    for name in ("versions", "GPUs and binding", "run directory", "DeepSpeed ops"):
        assert rows[name]["verdict"] == "PASS", rows[name]
    assert rows["all-reduce intra-node"]["verdict"] == "INFO"
    assert rows["all-reduce intra-node"]["figures"]["bytes"] > 0
    assert "| dataset " in out.stderr and "FAIL" in out.stderr  # the table, logged by rank 0
    # A run that holds the run directory (another host, a fresh heartbeat): the check names it.
    holder = {"host": "node-b", "pid": 4242, "job": "99", "since": time.time(), "heartbeat": time.time()}
    (run / "run.lock").write_text(json.dumps(holder))
    one = [sys.executable, "-m", "gpt1_ds.preflight", "check", "--data", str(prepared), "--run-dir", str(run)]
    out = subprocess.run([*one, *SMALL], cwd=REPO, capture_output=True, text=True, timeout=300)
    rows = {r["check"]: r for r in json.loads((run / "preflight" / preflight.CHECKS).read_text())}
    assert out.returncode == 1 and rows["run directory"]["verdict"] == "FAIL", out.stderr[-3000:]
    assert "held by another run (SLURM job 99, pid 4242 on node-b" in rows["run directory"]["detail"]
