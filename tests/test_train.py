"""gpt1_ds.train: real DeepSpeed engines, real ranks (gloo), real shards of real books."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    BIN,
    FP32_NO_DROPOUT,
    ONE_RANK_ENGINE,
    REPO,
    SHIPPED_STEPS,
    SMALL,
    command,
    made_once,
    run_prepare,
    scalars,
    train,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt1_ds import checkpoint
from gpt1_ds.data import TrainLoader
from gpt1_ds.env import free_port
from gpt1_ds.runner import PREEMPTED_EXIT

pytestmark = pytest.mark.slow  # every test starts training processes

SCHEDULE_SCRIPT = ONE_RANK_ENGINE + textwrap.dedent(
    """
    opt = engine.optimizer
    lrs = []  # lrs[s]: the learning rate of update s (from 0)
    for step in range(4000):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    compact = dict(separators=(",", ":"))
    print("LRS", json.dumps([lrs[s] for s in (0, 1, 1000, 2000, 3000, 3999)], **compact),
          json.dumps([g["weight_decay"] for g in opt.param_groups], **compact))
    """
)


def test_schedule_read_back_from_the_engine(tmp_path):
    script = tmp_path / "schedule.py"
    script.write_text(SCHEDULE_SCRIPT)
    cmd = [sys.executable, str(script), str(free_port()), "ds_configs/zero2.json", "8", "4000"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("LRS"))
    lrs, decay = (json.loads(p) for p in line.split(" ", 2)[1:])
    at0, at1, at1000, at2000, at3000, last = lrs
    assert at0 == 0.0 and at1 == pytest.approx(2.5e-4 / 2000)  # linear warm-up from 0
    assert at1000 == pytest.approx(1.25e-4) and at2000 == pytest.approx(2.5e-4)
    # cosine over updates 2000..3999 (DeepSpeed counts its phase from the warm-up's last update)
    assert at3000 == pytest.approx(2.5e-4 * (1 + math.cos(math.pi * 1001 / 2000)) / 2)
    assert last == 0.0  # cos_min_ratio 0, at the last of 4,000 updates
    assert sorted(decay) == [0.0, 0.01]  # parameter groups: biases and gains not decayed


FP32_RUN = ["max_steps=4", "ds.optimizer.params.lr=0.01", *FP32_NO_DROPOUT]
"""Four steps in fp32 without dropout, at a learning rate whose updates move the loss: the settings
of the runs that ranks, ZeRO stages, the chunked loss, the compiled model and torch's AdamW are
compared in."""


@pytest.fixture(scope="session")
def fp32_runs(prepared, tmp_path_factory) -> Callable[[str, int], Path]:
    """``fp32_runs(launcher, stage)``: the run directory of ``FP32_RUN`` with
    ``ds_configs/zero{stage}.json`` launched by ``launcher`` (``python``: one rank, ``mpirun``:
    two), trained on first use, once per test run (read-only for the tests)."""

    def make(launcher: str, stage: int, run: Path) -> None:
        train(prepared, run, *FP32_RUN, launcher=launcher, ds_config=f"ds_configs/zero{stage}.json")

    def run(launcher: str, stage: int) -> Path:
        name = f"fp32_{launcher}_zero{stage}"
        return made_once(tmp_path_factory, name, functools.partial(make, launcher, stage))

    return run


def fp32_losses(run: Path) -> dict[int, float]:
    """The four steps' losses of an ``FP32_RUN``, checked to have moved."""
    losses = scalars(run, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4] and losses[1] - losses[4] > 0.05, losses
    return losses


def test_one_rank_and_two_ranks_and_zero_stages_give_the_same_losses(fp32_runs):
    reference = fp32_losses(fp32_runs("python", 2))
    for stage in (0, 1, 2, 3):
        losses = scalars(fp32_runs("mpirun", stage), "train/loss")
        for step, value in reference.items():
            assert losses[step] == pytest.approx(value, abs=1e-5), (stage, step)


def test_eight_ranks_give_one_ranks_losses_and_their_checkpoint_resumes_on_four(prepared, tmp_path):
    """A step's batch depends on the step alone: 1 rank (micro-batches of 4, accumulated twice),
    2 ranks (micro-batches of 2 accumulated twice, 2 loader workers each) and 8 CPU ranks (one
    sequence each) train a global batch of 8 to the same losses, the loss averaged over the step's
    tokens; then the 8 ranks' ZeRO-2 checkpoint of step 2 resumed by 4 ranks (automatic micro-batches
    of 2, through DeepSpeed's universal format) trains steps 3 and 4 to the same losses."""
    common = [
        "max_steps=4",
        "ds.train_batch_size=8",
        "micro_batch_size=auto",
        "ds.optimizer.params.lr=0.01",
        "ds.scheduler.params.warmup_num_steps=1",
        *FP32_NO_DROPOUT,
    ]
    out = train(prepared, tmp_path / "one", *common, "max_micro_batch_size=4", launcher="python")
    assert "micro-batch 4 × accumulation 2 × 1 ranks = 8 sequences" in out.stderr
    reference = scalars(tmp_path / "one", "train/loss")
    # large updates: the losses after the resume depend on the weights and moments it restored
    assert sorted(reference) == [1, 2, 3, 4] and reference[1] - reference[4] > 0.15
    out = train(prepared, tmp_path / "two", *common, "max_micro_batch_size=2", "num_workers=2")
    assert "micro-batch 2 × accumulation 2 × 2 ranks = 8 sequences" in out.stderr
    out = train(prepared, tmp_path / "eight", *common, "checkpoint_interval=2", ranks=8)
    assert "micro-batch 1 × accumulation 1 × 8 ranks = 8 sequences" in out.stderr
    saved = tmp_path / "eight" / "checkpoints" / "step00000002"
    out = train(prepared, tmp_path / "four", *common, f"resume={saved}", ranks=4)
    assert "micro-batch 2 × accumulation 1 × 4 ranks = 8 sequences" in out.stderr
    assert f"{saved}: written by 8 ranks, loaded by 4 through {saved}/universal" in out.stderr
    assert f"resumed from {saved} at step 2" in out.stderr
    for run, steps in (("two", [1, 2, 3, 4]), ("eight", [1, 2, 3, 4]), ("four", [3, 4])):
        losses = scalars(tmp_path / run, "train/loss")
        assert sorted(losses) == steps, run
        for step in steps:
            assert losses[step] == pytest.approx(reference[step], abs=1e-5), (run, step)


def test_padded_sequences_weigh_their_tokens_whatever_the_micro_batch(tmp_path):
    """Shards of a few sequences each, so that many sequences end padded: one micro-batch of 16 and
    16 of 1 accumulated give the same losses, the loss averaged over the step's counted targets."""
    data = tmp_path / "small_shards"
    run_prepare(data, extra=["--shard-bytes", "1500"])
    kw = dict(batch_size=16, seq_len=64, seed=1234, shuffle_window=4096)
    loader = TrainLoader(data / "train", **kw)
    counted = [loader.next_step()[0]["counted"] for _ in range(3)]
    assert min(counted) < 16 * 64  # padded targets in the steps trained
    common = ["max_steps=3", "ds.train_batch_size=16", "ds.optimizer.params.lr=0.01", *FP32_NO_DROPOUT]
    runs = {}
    for micro in (16, 1):
        run = tmp_path / f"micro{micro}"
        train(data, run, *common, f"micro_batch_size={micro}", launcher="python")
        runs[micro] = scalars(run, "train/loss")
    assert sorted(runs[16]) == [1, 2, 3]
    for step, value in runs[16].items():
        assert runs[1][step] == pytest.approx(value, abs=1e-5), step


def test_the_chunked_loss_trains_to_the_same_losses_under_zero3(prepared, fp32_runs, tmp_path):
    """loss_chunk_size under DeepSpeed: ZeRO-3 gathers the tied head's weight for each chunk
    and again for its recomputation in the backward pass."""
    whole = fp32_runs("mpirun", 3)
    assert "loss_chunk_size: 0\n" in (whole / "config.yaml").read_text()
    reference = fp32_losses(whole)
    run = tmp_path / "chunk100"
    out = train(prepared, run, *FP32_RUN, "loss_chunk_size=100", ds_config="ds_configs/zero3.json")
    assert "loss in chunks of 100 positions" in out.stderr
    losses = scalars(run, "train/loss")
    for step, value in reference.items():
        assert losses[step] == pytest.approx(value, abs=1e-5), step


@pytest.mark.parametrize("stage", [1, 2])
def test_a_compiled_model_trains_to_the_eager_losses(prepared, fp32_runs, tmp_path, stage):
    """compile=true: engine.compile() (inductor) under ZeRO-1 and -2, fp32: the same losses."""
    eager = fp32_runs("python", stage)
    assert "compile: false\n" in (eager / "config.yaml").read_text()
    reference = fp32_losses(eager)
    run = tmp_path / "compiled"
    ds_config = f"ds_configs/zero{stage}.json"
    out = train(prepared, run, *FP32_RUN, "compile=true", launcher="python", ds_config=ds_config)
    assert "model compiled (torch.compile, inductor)" in out.stderr
    losses = scalars(run, "train/loss")
    for step, value in reference.items():
        assert losses[step] == pytest.approx(value, abs=1e-5), step


def test_torchs_fused_adamw_the_fallback_for_fused_adam_gives_the_same_losses(prepared, fp32_runs, tmp_path):
    """What runs where DeepSpeed's CUDA FusedAdam cannot be built (ds_config.adam_fallback)."""
    reference = fp32_losses(fp32_runs("python", 2))
    run = tmp_path / "torch"
    torch_adam = ("ds.optimizer.params.torch_adam=true", "ds.optimizer.params.fused=true")
    out = train(prepared, run, *FP32_RUN, *torch_adam, launcher="python")
    assert "optimizer AdamW" in out.stderr
    losses = scalars(run, "train/loss")
    for step, value in reference.items():
        assert losses[step] == pytest.approx(value, abs=1e-4), step


def test_tensorboard_holds_the_listed_tags(prepared, tmp_path):
    run = tmp_path / "run"
    train(
        prepared,
        run,
        "max_steps=3",
        "eval_interval=2",
        "sample_interval=2",
        "sample_tokens=5",
        port=free_port(),
    )
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/ppl",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "train/tflops",
        "train/step_time",
        "val/loss",
        "val/ppl",
        "memory/rss_gb",
    ):
        assert tag in tags, tag
    assert sorted(e.step for e in acc.Scalars("val/loss")) == [0, 2, 3]
    assert any("sample" in t for t in acc.Tags()["tensors"])
    config = (run / "config.yaml").read_text()
    assert "max_steps: 3" in config
    resolved = json.loads((run / "ds_config.json").read_text())
    assert resolved["gradient_accumulation_steps"] == 1 and resolved["train_micro_batch_size_per_gpu"] == 4
    assert resolved["scheduler"]["params"]["total_num_steps"] == 3


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "ended early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int = 1, timeout: float = 300) -> None:
    """Waits until the run's event files hold train/loss for a step >= ``step``: training has
    started and made progress (rank 0 flushes its event file every step)."""
    deadline = time.monotonic() + timeout
    events = run_dir / "tensorboard"
    while True:
        try:
            if events.is_dir() and max(scalars(run_dir, "train/loss"), default=0) >= step:
                return
        except KeyError:  # no event file yet, or no train/loss in it
            pass
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "ended early"
        assert time.monotonic() < deadline, f"train/loss never reached step {step}"
        time.sleep(0.1)


INTERRUPTED = ["max_steps=12", "checkpoint_interval=4", "ds.bf16.enabled=false"]
"""The runs the kill and stall tests interrupt: 2 ranks, 12 steps in fp32, a checkpoint every 4."""


@pytest.fixture(scope="session")
def uninterrupted(prepared, tmp_path_factory) -> dict[int, float]:
    """The losses of an ``INTERRUPTED`` run that nothing interrupts (trained once per test run)."""
    run = made_once(tmp_path_factory, "uninterrupted", lambda run: train(prepared, run, *INTERRUPTED))
    return scalars(run, "train/loss")


def test_kill_9_then_resume_auto_matches_the_uninterrupted_run(prepared, tmp_path, uninterrupted):
    steps, reference = INTERRUPTED, uninterrupted
    run = tmp_path / "killed"
    cmd = [
        *command("torchrun", free_port()),
        "--data",
        str(prepared),
        "--run-dir",
        str(run),
        *SMALL,
        *steps,
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_for(run / "checkpoints" / "step00000004" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints" / "step00000012").exists(), "killed too late"
    out = train(prepared, run, *steps, "resume=auto", port=free_port())
    assert "resumed from" in out.stderr
    losses = scalars(run, "train/loss")
    assert sorted(losses) == list(range(1, 13))  # every step once, none twice
    for step in range(1, 13):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step


def test_sigusr1_saves_and_exits_preempted_then_resumes(prepared, tmp_path):
    run = tmp_path / "run"
    steps = ["max_steps=400", "checkpoint_interval=1000"]
    cmd = [*command("python", free_port()), "--data", str(prepared), "--run-dir", str(run), *SMALL, *steps]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert len(tags) == 1
    saved = int(tags[0].removeprefix("step"))
    assert 0 < saved < 400
    out = train(
        prepared,
        run,
        "max_steps=" + str(saved + 3),
        "checkpoint_interval=1000",
        launcher="python",
        port=free_port(),
    )
    assert f"at step {saved}" in out.stderr
    assert max(scalars(run, "train/loss")) == saved + 3


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_launchers_run_two_ranks(prepared, tmp_path, launcher):
    out = train(prepared, tmp_path / launcher, "max_steps=2", launcher=launcher, port=free_port())
    text = out.stderr + out.stdout
    assert "2 ranks" in text
    assert len(scalars(tmp_path / launcher, "train/loss")) == 2
    # Quiet: the ranks print what a user must act on, in the project's words (the warm-up longer
    # than the run, once); the libraries' chatter is kept out (the launcher's own lines aside).
    assert text.count("is longer than the run's 2 steps: the learning rate never reaches its peak") == 1
    for chatter in (
        "less than warmup_num_steps",
        "before it has started",
        "CPU Virtual Memory",
        "FutureWarning",
    ):
        assert chatter not in text, chatter
    ranks_lines = [line for line in text.splitlines() if "Setting accelerator to CPU" in line]
    assert len(ranks_lines) == (2 if launcher == "deepspeed" else 0)  # the deepspeed launcher's own two


def test_two_nodes_over_loopback_match_one_node(prepared, tmp_path):
    common = ["max_steps=3", *FP32_NO_DROPOUT]
    train(prepared, tmp_path / "one_node", *common, port=free_port())
    reference = scalars(tmp_path / "one_node", "train/loss")
    port = free_port()  # one rendezvous for the two nodes of this launch
    procs = []
    for node in (0, 1):
        cmd = [
            str(BIN / "torchrun"),
            "--nnodes",
            "2",
            "--node_rank",
            str(node),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "gpt1_ds/train.py",
            "--deepspeed_config",
            "ds_configs/zero2.json",
            "--data",
            str(prepared),
            "--run-dir",
            str(tmp_path / "two_nodes"),
            *SMALL,
            *common,
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    losses = scalars(tmp_path / "two_nodes", "train/loss")
    for step, value in reference.items():
        assert losses[step] == pytest.approx(value, abs=1e-5)


def test_contradictions_fail_before_any_compute(prepared, tmp_path):
    out = train(
        prepared,
        tmp_path / "a",
        "max_steps=2",
        "ds.train_batch_size=6",
        launcher="python",
        port=free_port(),
        check=False,
    )
    assert out.returncode != 0 and "train_batch_size 6 is not a multiple of micro_batch_size 4" in out.stderr
    out = train(
        prepared,
        tmp_path / "b",
        "max_steps=2",
        "ds.train_micro_batch_size_per_gpu=2",
        launcher="python",
        port=free_port(),
        check=False,
    )
    assert "train_micro_batch_size_per_gpu" in out.stderr and "is 2, but the run needs 4" in out.stderr
    out = train(
        prepared,
        tmp_path / "c",
        "max_steps=2",
        "model_overrides.vocab_size=1000",
        launcher="python",
        port=free_port(),
        check=False,
    )
    assert "vocab_size 2000 exceeds the model's 1000" in out.stderr
    out = train(
        prepared,
        tmp_path / "d",
        "max_steps=2",
        "model_overrides.n_positions=128",
        launcher="python",
        port=free_port(),
        check=False,
    )
    assert "seq_len 64 is shorter than the model's 128" in out.stderr
    out = train(
        prepared, tmp_path / "e", "max_steps=2", "epochs=0", launcher="python", port=free_port(), check=False
    )
    assert "epochs must be a positive integer" in out.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_loss_falls_on_real_books(prepared, tmp_path):
    run = tmp_path / "run"
    train(
        prepared,
        run,
        "max_steps=150",
        "log_interval=10",
        "eval_interval=150",
        "ds.optimizer.params.lr=0.003",
        "ds.scheduler.params.warmup_num_steps=15",
        "ds.bf16.enabled=false",  # what falls is the point: fp32 (bf16 is emulated, slow, on many CPUs)
        port=free_port(),
    )
    val = scalars(run, "val/loss")
    train_loss = scalars(run, "train/loss")
    assert val[150] < val[0] - 0.8, val  # from about ln(2000) = 7.6
    assert train_loss[150] < train_loss[10] - 0.5, train_loss
    manifest = json.loads((prepared / "val" / "manifest.json").read_text())
    bits = scalars(run, "val/bits_per_byte")  # nats per token × tokens per byte / ln 2
    ratio = manifest["total_tokens"] / manifest["text_bytes"] / math.log(2)
    assert bits == pytest.approx({step: loss * ratio for step, loss in val.items()}, rel=1e-5)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3"])
def test_every_shipped_ds_config_trains_as_it_stands(shipped_runs, name):
    """bf16 as the files say, on 2 ranks (the offload config: the op build test)."""
    run = shipped_runs(name)
    assert sorted(scalars(run, "train/loss")) == list(range(1, SHIPPED_STEPS + 1))
    assert json.loads((run / "ds_config.json").read_text())["bf16"]["enabled"] is True


def test_fp16_config_is_refused_on_a_cpu_with_a_clear_error(prepared, tmp_path):
    out = train(
        prepared,
        tmp_path / "fp16",
        "max_steps=1",
        launcher="python",
        port=free_port(),
        ds_config="ds_configs/zero2_fp16.json",
        check=False,
    )
    assert out.returncode != 0 and "fp16.enabled is true, but DeepSpeed has no fp16 on the CPU" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["ds.zero_optimisation.stage=3"],
            "ds_configs/zero2.json: zero_optimisation: not a key DeepSpeed reads; did you mean "
            "'zero_optimization'? (set by ds.zero_optimisation.stage)",
        ),
        (["ds.optimizer.params.lrr=1"], "optimizer.params.lrr: FusedAdam takes no such argument"),
        (["model_overrides.n_layr=1"], "unknown model field 'n_layr': did you mean 'n_layer'?"),
        (["n_layr=1"], "'n_layr' (given on the command line); did you mean 'model_overrides.n_layer'?"),
        (["--ds-config", "nope.json"], "nope.json: no such DeepSpeed config"),
        (["--ds-config", "tests/conftest.py"], "tests/conftest.py: invalid JSON: Extra data: line 1"),
    ],
)  # fmt: skip
def test_a_misspelt_key_is_refused_before_compute_in_one_line(prepared, tmp_path, args, message):
    run = tmp_path / "run"
    out = train(prepared, run, "max_steps=1", *args, launcher="python", port=free_port(), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert message in out.stderr and not (run / "checkpoints").exists()


@pytest.mark.slow
def test_a_second_run_into_a_held_run_directory_is_refused_at_once_naming_the_first(prepared, tmp_path):
    run = tmp_path / "run"
    cmd = [*command("python", free_port()), "--data", str(prepared), "--run-dir", str(run), *SMALL]
    first = subprocess.Popen([*cmd, "max_steps=100000"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "run.lock").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # held before anything else starts
        assert first.poll() is None, first.stderr.read()[-3000:]
        second = train(prepared, run, "max_steps=1", launcher="python", port=free_port(), check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"{run} is held by another run (pid {first.pid} on " in second.stderr.strip().splitlines()[-1]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = train(prepared, run, "max_steps=1", launcher="python", port=free_port())  # takes over
    assert f"pid {first.pid} is no longer running" in third.stderr and not (run / "run.lock").exists()


def test_a_model_that_does_not_fit_in_memory_is_named_with_what_shrinks_it(prepared, tmp_path):
    huge = ["model_overrides.vocab_size=20000000", "model_overrides.n_embd=4096", "model_overrides.n_head=32"]
    out = train(
        prepared, tmp_path / "run", "max_steps=1", *huge, launcher="python", port=free_port(), check=False
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "out of memory on cpu (" in line and re.search(r"the tiny model has [\d,]+\.\dM parameters", line)
    assert "lower micro_batch_size" in line and "activation_checkpointing=true" in line


def test_a_port_in_use_is_named_with_the_way_out(prepared, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1"}
        out = train(prepared, tmp_path / "run", "max_steps=1", launcher="python", check=False, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"port {port} on 127.0.0.1 is in use" in out.stderr and "deepspeed --master_port N" in out.stderr


def test_a_non_finite_loss_stops_the_run_naming_the_step(prepared, tmp_path):
    """The flags are read every log_interval steps (no host wait in between), yet the step
    named is the one where the loss went bad, and nothing is saved after it."""
    steps = []
    for interval in (1, 7):
        out = train(
            prepared,
            tmp_path / f"nan{interval}",
            "max_steps=30",
            f"log_interval={interval}",
            "checkpoint_interval=3",
            "ds.optimizer.params.lr=1e9",
            "ds.scheduler.params.warmup_num_steps=2",
            "ds.gradient_clipping=0",
            port=free_port(),
            check=False,
        )
        assert out.returncode == 1, out.stderr[-2000:]
        found = re.search(r"step (\d+): loss (nan|inf), gradient norm \S+ on rank \d", out.stderr)
        stopping = f"step {found.group(1)}: a non-finite loss or gradient; stopping" if found else "?"
        assert found and stopping in out.stderr, out.stderr[-2000:]
        steps.append(int(found.group(1)))
        saved = [int(p.name[4:]) for p in (tmp_path / f"nan{interval}" / "checkpoints").glob("step*")]
        assert max(saved, default=0) < steps[-1]  # no checkpoint of a model that went bad
    assert steps[0] == steps[1] < 30


def test_zero2_tuned_for_speed_gives_deepspeeds_default_bf16_losses_bit_for_bit(prepared, tmp_path):
    """zero2.json's speed settings (no bf16 overflow check, an all-reduce instead of a reduce-scatter)
    change no arithmetic: 2 ranks in bf16 give the same losses and gradient norms, to the bit, as
    DeepSpeed's defaults for them."""
    common = ("max_steps=4",)
    train(prepared, tmp_path / "tuned", *common)
    defaults = ("ds.bf16.check_grad_overflow=true", "ds.zero_optimization.reduce_scatter=true")
    train(prepared, tmp_path / "defaults", *common, *defaults)
    for tag in ("train/loss", "train/grad_norm"):
        tuned, default = scalars(tmp_path / "tuned", tag), scalars(tmp_path / "defaults", tag)
        assert sorted(tuned) == [1, 2, 3, 4] and tuned == default, tag


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_a_nan_gradient_stops_the_run_at_its_step_and_nothing_is_saved_after_it(prepared, tmp_path, name):
    """bf16 without DeepSpeed's overflow check (zero2.json) and with BF16_Optimizer's own (zero1.json):
    a NaN in rank 1's gradients at step 5, its loss finite, is named with its step from the gradient
    norm, though the ranks agree only every 4 steps and before each checkpoint; none from step 5 on."""
    run = tmp_path / name
    env = {**os.environ, "GPT1_DS_NAN_GRAD": "1:5"}
    overrides = ("max_steps=12", "log_interval=4", "checkpoint_interval=2", "keep_checkpoints=10")
    out = train(prepared, run, *overrides, ds_config=f"ds_configs/{name}.json", check=False, env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    assert re.search(r"step 5: loss \d+\.\d+, gradient norm (inf|nan) on rank \d", out.stderr), out.stderr[
        -3000:
    ]
    assert "step 5: a non-finite loss or gradient; stopping (resume from step00000004)" in out.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000002", "step00000004"]


def test_a_fresh_run_into_a_directory_with_checkpoints_is_refused_or_moves_the_old_run_aside(
    prepared, tmp_path
):
    """resume=none would mix two runs (the new one's checkpoints pruned as older than the old
    one's, latest pointing at a deleted tag): refused before any compute, nothing touched;
    resume=new moves the old run into RUN/previous-1/ and starts afresh there."""
    run = tmp_path / "run"
    common = ("checkpoint_interval=2", "keep_checkpoints=10")
    train(prepared, run, "max_steps=6", *common, launcher="python", port=free_port())
    tags = checkpoint.complete_tags(run / "checkpoints")
    assert tags == ["step00000002", "step00000004", "step00000006"]
    out = train(prepared, run, "max_steps=2", "resume=none", *common, launcher="python", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "holds another run's checkpoints (step00000002 … step00000006)" in out.stderr
    assert "resume=auto continues that run, resume=new moves it aside" in out.stderr
    assert checkpoint.complete_tags(run / "checkpoints") == tags
    assert (run / "checkpoints" / "latest").read_text() == "step00000006"

    out = train(prepared, run, "max_steps=2", "resume=new", *common, launcher="python", port=free_port())
    assert f"earlier contents moved into {run / 'previous-1'}" in out.stderr
    assert checkpoint.complete_tags(run / "previous-1" / "checkpoints") == tags
    assert checkpoint.complete_tags(run / "checkpoints") == ["step00000002"]
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert "max_steps: 2" in (run / "config.yaml").read_text()
    assert sorted(scalars(run, "train/loss")) == [1, 2]  # the new run's curves alone


def test_continued_pretraining_from_an_hf_export(prepared, tmp_path):
    first = tmp_path / "first"
    fast = ["ds.optimizer.params.lr=3e-3", "ds.scheduler.params.warmup_num_steps=1"]
    train(prepared, first, "max_steps=8", "eval_interval=8", *fast, port=free_port())
    hf = tmp_path / "hf"
    export = subprocess.run(
        [sys.executable, "-m", "gpt1_ds.export", str(first / "checkpoints"), "--out", str(hf)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    second = tmp_path / "second"
    out = train(prepared, second, "max_steps=2", f"init={hf}", port=free_port())
    assert f"initialised from {hf}" in out.stderr
    # The same weights and the same validation batches: the new run starts where the first ended.
    assert scalars(second, "val/loss")[0] == pytest.approx(scalars(first, "val/loss")[8], abs=2e-3)
    assert scalars(second, "val/loss")[0] < scalars(first, "val/loss")[0] - 0.05
    wrong = train(
        prepared,
        tmp_path / "wrong",
        "max_steps=2",
        f"init={hf}",
        "model_overrides.n_layer=3",
        port=free_port(),
        check=False,
    )
    assert wrong.returncode != 0
    assert "the model differs from the run config's: {'n_layer': (2, 3)} (init, run)" in wrong.stderr


def test_samples_of_a_model_larger_than_its_tokenizer_never_end_the_run(prepared, tmp_path):
    """The dataset's 2,000 pieces in a 2,500-row table: sampling draws only the tokenizer's ids
    (it used to draw the others, and decoding them crashed every rank)."""
    run = tmp_path / "run"
    out = train(
        prepared,
        run,
        "model_overrides.vocab_size=2500",
        "max_steps=4",
        "sample_interval=2",
        "sample_tokens=200",
        "ds.optimizer.params.lr=3e-3",
        launcher="python",
        port=free_port(),
    )
    assert len(re.findall(r"step \d sample: ", out.stderr)) == 2 and "no sample" not in out.stderr
    assert sorted(scalars(run, "train/loss")) == [1, 2, 3, 4]


def test_a_stalled_rank_ends_the_run_with_76_and_the_resumed_run_matches(prepared, tmp_path, uninterrupted):
    """Rank 1 sleeps inside step 6 (rank 0 waits in the step's all-reduce): a watchdog ends the
    run within the stall timeout, with the rank's stacks, saving nothing; the next run resumes
    from step 4 and gives the uninterrupted run's losses."""
    steps, reference = [*INTERRUPTED, "stall_timeout=8"], uninterrupted

    run = tmp_path / "stalled"
    env = {**os.environ, "GPT1_DS_STALL": "1:6:900"}
    out = train(prepared, run, *steps, port=free_port(), check=False, env=env)
    assert out.returncode != 0
    assert "rank 1: injected stall of 900 s in step 6" in out.stderr
    idle = {
        int(r): float(s) for r, s in re.findall(r"rank (\d): no progress for (\d+) s \(step 6\)", out.stderr)
    }
    # The first watchdog to fire ends the job (the launcher then stops the other rank).
    assert idle and max(idle.values()) < 8 + 5 + 1, out.stderr[-3000:]  # timeout + watch period + a tick
    assert "Most recent call first" in out.stderr or "Current thread" in out.stderr  # the stack dump
    assert out.returncode == 76, out.stderr[-3000:]  # the launcher passes the rank's code on
    assert (run / "HUNG").read_text().startswith("rank ")
    assert checkpoint.complete_tags(run / "checkpoints") == ["step00000004"]  # nothing half-done

    out = train(prepared, run, *steps, port=free_port(), env=env)  # a resumed run does not stall
    assert "resumed from" in out.stderr and not (run / "HUNG").exists()
    losses = scalars(run, "train/loss")
    assert sorted(losses) == list(range(1, 13))
    for step in range(1, 13):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step


def test_three_ranks_refuse_a_batch_of_8_before_compute_and_run_a_changed_one(prepared, tmp_path):
    """A world size that does not divide the global batch: an error naming the sizes that do,
    before any step; global_batch_size=9 runs, with the learning rate scaled and said."""
    base = [str(BIN / "torchrun"), "--nproc_per_node", "3", "--master_port"]
    script = ["gpt1_ds/train.py", "--deepspeed_config", "ds_configs/zero2.json", "--data", str(prepared)]
    small = [s for s in SMALL if not s.startswith("micro_batch_size")]  # auto
    run = tmp_path / "run"
    cmd = [*base, str(free_port()), *script, "--run-dir", str(run), *small, "max_steps=2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "the global batch of 8 sequences does not split over 3 ranks" in out.stderr
    assert (
        "world sizes that can run it: 1, 2, 4, 8" in out.stderr and "global_batch_size=6 or 9" in out.stderr
    )
    assert not (run / "checkpoints").exists()
    out = subprocess.run(
        [*cmd[:4], str(free_port()), *cmd[5:], "global_batch_size=9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "global batch 8 → 9 (global_batch_size), learning rate" in out.stderr
    assert "micro-batch 3 × accumulation 1 × 3 ranks = 9 sequences" in out.stderr
    lr = json.loads((run / "ds_config.json").read_text())["optimizer"]["params"]["lr"]
    assert lr == pytest.approx(
        json.loads((REPO / "ds_configs/zero2.json").read_text())["optimizer"]["params"]["lr"]
        * math.sqrt(9 / 8)
    )
