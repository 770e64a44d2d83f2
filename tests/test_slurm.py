"""slurm/: the sbatch templates on a real one-node SLURM cluster (slurm/local_cluster.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, SMALL, scalars
from test_shard import dataset_files

from data_prep.verify import verify
from gpt1_ds.tasks import GLUE

pytestmark = pytest.mark.slow  # every test submits SLURM jobs

CLUSTER = REPO / "slurm" / "local_cluster.sh"


def cluster(nodes: int, state_dir: str | None) -> Iterator[dict[str, str]]:
    """Bring a local cluster of ``nodes`` up (installing SLURM as root if needed); down afterwards
    unless it was already running."""
    base = {**os.environ, **({"GPT1DS_SLURM_DIR": state_dir} if state_dir else {})}
    conf = subprocess.run([str(CLUSTER), "env"], capture_output=True, text=True, check=True, env=base).stdout
    env = {**base, "SLURM_CONF": conf.strip().split("=", 1)[1]}
    was_up = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True, env=env).stdout
    was_up = "idle" in was_up or "alloc" in was_up or "mix" in was_up
    if not was_up:
        if os.geteuid() != 0 and (nodes > 1 or subprocess.run(["which", "slurmctld"]).returncode):
            pytest.skip("installing SLURM, or the network namespaces of several nodes, needs root")
        cmd = [str(CLUSTER), "up", *(["--nodes", str(nodes)] if nodes > 1 else [])]
        up = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert up.returncode == 0, up.stderr
    yield env
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, env=env, timeout=60)
        if nodes > 1:  # down leaves nothing behind: no daemon, namespace, bridge or host name
            left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert "gpt1n" not in left and "gpt1n" not in Path("/etc/hosts").read_text()
            assert subprocess.run(["ip", "link", "show", "gpt1br"], capture_output=True).returncode != 0
            assert subprocess.run(["pgrep", "-f", "slurmd -N gpt1n"], capture_output=True).returncode == 1


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """The one-node cluster."""
    yield from cluster(1, None)


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[dict[str, str]]:
    """A two-node cluster: two slurmd, each in its own network namespace with its own hostname
    (gpt1n1, gpt1n2) and address (slurm/local_cluster.sh up --nodes 2)."""
    yield from cluster(2, "/tmp/gpt1-ds-slurm-2n")


def sbatch(env: dict[str, str], script: str, log: Path, *flags: str, **settings: str) -> str:
    job_env = {**env, **settings}
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", f"--error={log}", *flags, script],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=job_env,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def read_log(path: Path) -> str:
    """A job log; srun merges the tasks' output, which can split a multi-byte character."""
    return path.read_text(errors="replace")


def job_state(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_done(env: dict[str, str], job: str, timeout: float = 400) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(env, job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} did not end: {job_state(env, job)}")


def overrides(*extra: str) -> str:
    return " ".join([*SMALL, "ds.optimizer.params.lr=0.003", *extra])


def preempt_long_run(slurm_env, prepared, run: Path, log: Path, *flags: str, **settings: str) -> str:
    """Submit a 400-step CPU pretraining job; once it trains, send USR1 to its batch shell."""
    job = sbatch(
        slurm_env,
        "slurm/pretrain_cpu.sh",
        log,
        *flags,
        DATA=str(prepared),
        RUN_DIR=str(run),
        OVERRIDES=overrides("max_steps=400", "checkpoint_interval=1000"),
        **settings,
    )
    deadline = time.monotonic() + 300
    while not re.search(r"step \d+/400", read_log(log) if log.exists() else ""):
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)
    subprocess.run(["scancel", "-b", "--signal=USR1", job], env=slurm_env, check=True)
    return job


def test_sbatch_pretrain_cpu_profile_completes_with_checkpoints_and_falling_loss(
    slurm_env, prepared, tmp_path
):
    run = tmp_path / "run"
    job = sbatch(
        slurm_env,
        "slurm/pretrain_cpu.sh",
        tmp_path / "job.out",
        DATA=str(prepared),
        RUN_DIR=str(run),
        OVERRIDES=overrides("max_steps=30", "checkpoint_interval=10", "log_interval=5"),
    )
    state = wait_done(slurm_env, job)
    log = read_log(tmp_path / "job.out")
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert "2 tasks" in log and "training exited with 0" in log
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000020", "step00000030"]
    losses = scalars(run, "train/loss")
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[30] < losses[5] - 0.3


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes(slurm_env, prepared, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    job = preempt_long_run(slurm_env, prepared, run, log)
    deadline = time.monotonic() + 300
    while "resumed from" not in read_log(log):
        assert time.monotonic() < deadline, read_log(log)[-3000:]
        time.sleep(1)
    text = read_log(log)
    saved = int(re.search(r"checkpoint \S*step(\d+) \(signal", text).group(1))
    assert f"resumed from {run}/checkpoints/step{saved:08d} at step {saved}" in text
    assert "requeueing job" in text and "(restart 1)" in text
    assert job_state(slurm_env, job)["Restarts"] == "1"
    subprocess.run(["scancel", job], env=slurm_env, check=True)  # the rest would take minutes
    wait_done(slurm_env, job)
    steps = sorted(scalars(run, "train/loss"))
    assert steps == sorted(set(steps)), "a step was trained twice"


def stalling_job(slurm_env, prepared, run: Path, log: Path, stall: str, **settings: str) -> tuple[dict, str]:
    """A 10-step CPU pretraining job (checkpoints every 4 steps) whose rank stalls where ``stall``
    (GPT1_DS_STALL) says, watched by an 8 s watchdog; its final state and log."""
    job = sbatch(
        slurm_env,
        "slurm/pretrain_cpu.sh",
        log,
        DATA=str(prepared),
        RUN_DIR=str(run),
        OVERRIDES=overrides("max_steps=10", "checkpoint_interval=4", "log_interval=1", "stall_timeout=8"),
        GPT1_DS_STALL=stall,
        **settings,
    )
    return wait_done(slurm_env, job), read_log(log)


def test_a_stalled_rank_ends_the_job_which_is_requeued_and_resumes(slurm_env, prepared, tmp_path):
    """Rank 1 sleeps inside step 6 of the first attempt: the watchdogs end the srun step with 76
    (nothing saved), the script requeues the job, and the requeued job resumes from step 4."""
    run = tmp_path / "run"
    state, text = stalling_job(slurm_env, prepared, run, tmp_path / "job.out", "1:6:900")
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-3000:]
    assert "rank 1: injected stall of 900 s in step 6" in text
    assert re.search(r"rank \d: no progress for \d+ s \(step 6\)", text)
    assert "a rank stalled or a collective timed out" in text
    assert "nothing saved, the run resumes from the last complete checkpoint\n" in text
    assert "requeueing job" in text
    assert f"resumed from {run}/checkpoints/step00000004 at step 4" in text
    assert "training exited with 0" in text and not (run / "HUNG").exists()
    assert sorted(scalars(run, "train/loss")) == list(range(1, 11))


def test_attempts_that_save_nothing_new_stop_requeueing_naming_the_time_they_need(
    slurm_env, prepared, tmp_path
):
    """Rank 1 stalls in step 1 of every attempt (no checkpoint is ever made, so every attempt starts
    at step 0): after MAX_IDLE_REQUEUES attempts in a row with nothing new saved, the job ends."""
    state, text = stalling_job(
        slurm_env, prepared, tmp_path / "run", tmp_path / "job.out", "1:1:900", MAX_IDLE_REQUEUES="2"
    )
    assert state["Restarts"] == "1" and state["ExitCode"] == "75:0", text[-3000:]
    assert text.count("nothing saved, the run resumes from the last complete checkpoint") == 2
    assert "2 attempts in a row saved nothing new (this one ran " in text
    assert "Give the job a longer --time, or its signal earlier (--signal=B:USR1@N" in text


def test_sbatch_prep_data_with_2_mpi_ranks_produces_a_dataset_that_verifies(slurm_env, tmp_path):
    out = tmp_path / "ds"
    job = sbatch(
        slurm_env,
        "slurm/prep_data.sh",
        tmp_path / "job.out",
        "--ntasks-per-node=2",
        INPUT="data/sample",
        OUT=str(out),
        PREP_ARGS="--vocab-size 2000 --seq-len 64 --shard-bytes 100000 --val-fraction 0.2 "
        "--test-fraction 0.2",
    )
    state = wait_done(slurm_env, job)
    log = read_log(tmp_path / "job.out")
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert "2 ranks" in log and "[rank 0]" in log  # a real 2-rank MPI world
    assert verify(out) == []


def test_the_requeue_cap_is_honoured(slurm_env, prepared, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    job = preempt_long_run(slurm_env, prepared, run, log, MAX_REQUEUES="0")
    state = wait_done(slurm_env, job)
    text = read_log(log)
    assert "requeue cap 0 reached, not requeueing" in text
    assert state["Restarts"] == "0" and state["ExitCode"] == "75:0"
    assert len(list((run / "checkpoints").glob("step*/COMPLETE"))) == 1


def test_sbatch_finetune_is_preempted_requeued_and_resumes_to_the_end(slurm_env, prepared, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    job = sbatch(
        slurm_env,
        "slurm/finetune_cpu.sh",
        log,
        INIT="none",
        RUN_DIR=str(run),
        OVERRIDES=f"tokenizer={prepared / 'tokenizer.model'} model=tiny model_overrides.vocab_size=2000 "
        "model_overrides.n_layer=2 max_train_examples=800 epochs=2 log_interval=5 "
        "ds.optimizer.params.lr=5e-4 ds.bf16.enabled=false",  # fp32: bf16 is slow on CPUs without AVX-512
    )
    deadline = time.monotonic() + 300
    while not re.search(r"step (1\d|[2-4]\d)/50 ", read_log(log) if log.exists() else ""):
        assert time.monotonic() < deadline, "fine-tuning never started"
        time.sleep(0.5)
    subprocess.run(["scancel", "-b", "--signal=USR1", job], env=slurm_env, check=True)
    state = wait_done(slurm_env, job, timeout=500)
    text = read_log(log)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-3000:]
    saved = int(re.search(r"checkpoint \S*step(\d+) \(signal\)", text).group(1))
    assert 10 <= saved < 50
    assert f"resumed from {run}/checkpoints/step{saved:08d} at step {saved}" in text
    results = json.loads((run / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    steps = sorted(scalars(run, "finetune/loss"))
    assert steps == sorted(set(steps)) and steps[-1] == 50, "a step was trained twice or missing"


def test_sbatch_finetune_from_a_released_openai_gpt_directory(slurm_env, openai_gpt_dir, tmp_path):
    """INIT=an openai-gpt directory: GPT-1's tokenizer, the task tokens appended, 2 tasks to the end."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    settings = dict(INIT=str(openai_gpt_dir), RUN_DIR=str(run))
    job = sbatch(
        slurm_env, "slurm/finetune_cpu.sh", log, **settings, OVERRIDES="max_train_examples=256 epochs=1"
    )
    state = wait_done(slurm_env, job, timeout=300)
    text = read_log(log)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-3000:]
    assert "task tokens appended as new rows" in text and "2 ranks" in text
    assert json.loads((run / "results.json").read_text())["history"][-1]["epoch"] == 1
    assert (run / "vocab.json").read_bytes() == (openai_gpt_dir / "vocab.json").read_bytes()


def run_preflight(env: dict[str, str], prepared: Path, run: Path, *flags: str) -> tuple[str, dict]:
    """sbatch slurm/preflight_cpu.sh (30 steps, the test's small model); once it has completed
    after its one requeue: the job log and the verdict's rows by check."""
    log = run.parent / "job.out"
    settings = dict(DATA=str(prepared), RUN_DIR=str(run), STEPS="30", OVERRIDES=overrides())
    state = wait_done(env, sbatch(env, "slurm/preflight_cpu.sh", log, *flags, **settings), timeout=500)
    text = read_log(log)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-3000:]
    assert state["ExitCode"] == "0:0" and "gpt1-ds preflight: PASS" in text
    verdict = json.loads((run / "preflight" / "verdict.json").read_text())
    return text, {r["check"]: r for r in verdict["rows"]}


def test_the_preflight_cpu_profile_checks_trains_round_trips_and_passes(slurm_env, prepared, tmp_path):
    """slurm/preflight_cpu.sh end to end: the checks on 2 tasks, 30 steps with USR1 after step 15
    (sent by the job itself) → checkpoint → requeue → resume → step 30, and the verdict table."""
    run = tmp_path / "run"
    text, rows = run_preflight(slurm_env, prepared, run)
    assert list(rows) == [
        "versions",
        "GPUs and binding",
        "dataset",
        "run directory",
        "all-reduce intra-node",
        "DeepSpeed ops",
        "training",
        "preemption round trip",
    ]
    assert all(r["verdict"] in ("PASS", "INFO") for r in rows.values()), rows
    assert "2 ranks on 1 host" in rows["GPUs and binding"]["detail"]
    training = rows["training"]["figures"]
    assert training["steps"] == 30 and training["loss_last"] < training["loss_first"] - 0.3
    assert training["ms_per_step"] > 0 and training["tokens_per_sec"] > 0
    saved = rows["preemption round trip"]["figures"]["checkpoint_step"]
    assert 15 <= saved < 30 and f"resumed from {run}/checkpoints/step{saved:08d} at step {saved}" in text
    assert sorted(scalars(run, "train/loss")) == list(range(5, 31, 5))


# --- Two nodes ---------------------------------------------------------------------------------


def test_two_nodes_train_one_rank_each_are_preempted_requeued_and_resume(two_nodes, prepared, tmp_path):
    """One rank on each node (gloo between two network namespaces, the master found by name):
    USR1 → checkpoint → requeue → the job resumes on two nodes."""
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    job = preempt_long_run(two_nodes, prepared, run, log, "--nodes=2", "--ntasks-per-node=1")
    deadline = time.monotonic() + 300
    while "resumed from" not in read_log(log):
        assert time.monotonic() < deadline, read_log(log)[-3000:]
        time.sleep(1)
    text = read_log(log)
    assert text.count("ranks → hosts → devices: 0→gpt1n1:cpu, 1→gpt1n2:cpu") == 2, text[-3000:]
    assert "on gpt1n[1-2]: 2 tasks" in text and "(restart 1) on gpt1n[1-2]" in text
    saved = int(re.search(r"checkpoint \S*step(\d+) \(signal", text).group(1))
    assert f"resumed from {run}/checkpoints/step{saved:08d} at step {saved}" in text
    subprocess.run(["scancel", job], env=two_nodes, check=True)  # the rest would take minutes
    wait_done(two_nodes, job)


def test_two_nodes_preflight_measures_the_all_reduce_between_nodes(two_nodes, prepared, tmp_path):
    _, rows = run_preflight(two_nodes, prepared, tmp_path / "run", "--nodes=2", "--ntasks-per-node=1")
    assert "2 ranks on 2 hosts" in rows["GPUs and binding"]["detail"]
    assert "2 ranks on 2 hosts" in rows["dataset"]["detail"]
    # one rank per node: no all-reduce within a node
    assert [name for name in rows if name.startswith("all-reduce")] == [
        "all-reduce world",
        "all-reduce inter-node",
    ]
    assert rows["all-reduce inter-node"]["figures"]["bus_gbps"] > 0
    assert rows["preemption round trip"]["verdict"] == "PASS"


def test_a_run_directory_held_from_one_node_is_refused_on_the_other(two_nodes, prepared, tmp_path):
    """The lock works across hosts on the shared file system (no flock): a job on gpt1n2 into the
    run directory a job on gpt1n1 is training in is refused at once, naming the holder."""
    run = tmp_path / "run"
    first_log, second_log = tmp_path / "first.out", tmp_path / "second.out"
    long = overrides("max_steps=100000", "checkpoint_interval=100000")
    job = {"DATA": str(prepared), "RUN_DIR": str(run)}
    first = sbatch(two_nodes, "slurm/pretrain_cpu.sh", first_log, "--nodelist=gpt1n1", OVERRIDES=long, **job)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"step \d+/100000", read_log(first_log) if first_log.exists() else ""):
            assert time.monotonic() < deadline, "the first job never trained"
            time.sleep(0.5)
        short = overrides("max_steps=2")
        second = sbatch(
            two_nodes, "slurm/pretrain_cpu.sh", second_log, "--nodelist=gpt1n2", OVERRIDES=short, **job
        )
        state = wait_done(two_nodes, second)
        text = read_log(second_log)
        # Every task refuses with 2; srun reports 143 where it killed the slower one first.
        assert state["ExitCode"] in ("2:0", "143:0") and state["Restarts"] == "0", text[-3000:]
        assert f"{run} is held by another run (SLURM job {first}, pid " in text
        assert " on gpt1n1, since " in text and "Traceback" not in text and "requeueing job" not in text
    finally:
        subprocess.run(["scancel", first], env=two_nodes, check=True)
    wait_done(two_nodes, first)


def test_two_nodes_prepare_data_with_one_mpi_rank_each_identical_to_one_rank(two_nodes, tmp_path):
    args = "--vocab-size 2000 --seq-len 64 --shard-bytes 100000 --val-fraction 0.2 --test-fraction 0.2"
    out = tmp_path / "two"
    job = sbatch(
        two_nodes,
        "slurm/prep_data.sh",
        tmp_path / "job.out",
        "--nodes=2",
        "--ntasks-per-node=1",
        INPUT="data/sample",
        OUT=str(out),
        PREP_ARGS=args,
    )
    state = wait_done(two_nodes, job)
    text = read_log(tmp_path / "job.out")
    assert state["JobState"] == "COMPLETED" and state["NodeList"] == "gpt1n[1-2]", text[-3000:]
    assert "2 ranks" in text and verify(out) == []
    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "data_prep.prepare", "--input", "data/sample", "--out", str(one), "--quiet"]
    subprocess.run([*cmd, *args.split()], cwd=REPO, check=True, capture_output=True)
    reference = dataset_files(one)  # shards, manifests, tokenizer (not the logs with their timings)
    assert len(reference) > 10 and dataset_files(out) == reference


DEEPSPEED_SLURM = """#!/usr/bin/env bash
# The README's lines: DeepSpeed's launcher, slurm runner, from the batch script of an allocation
cd {repo}
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=$SLURM_NTASKS_PER_NODE/" > {hostfile}
{bin}/deepspeed --hostfile {hostfile} --launcher slurm --no_ssh_check \\
    --master_addr "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)" \\
    gpt1_ds/train.py --deepspeed_config ds_configs/zero2.json --data {data} --run-dir {run} {overrides}
"""


def test_the_deepspeed_launcher_runs_across_two_nodes_from_an_allocation(two_nodes, prepared, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        DEEPSPEED_SLURM.format(
            repo=REPO,
            hostfile=tmp_path / "hostfile",
            bin=Path(sys.executable).parent,
            data=prepared,
            run=tmp_path / "run",
            overrides=overrides("max_steps=10", "log_interval=5"),
        )
    )
    job = sbatch(two_nodes, str(script), tmp_path / "job.out", "--nodes=2", "--ntasks-per-node=1")
    state = wait_done(two_nodes, job)
    text = read_log(tmp_path / "job.out")
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert (tmp_path / "hostfile").read_text() == "gpt1n1 slots=1\ngpt1n2 slots=1\n"
    assert "ranks → hosts → devices: 0→gpt1n1:cpu, 1→gpt1n2:cpu" in text
    assert sorted(scalars(tmp_path / "run", "train/loss")) == [5, 10]


def test_the_suite_runs_as_a_job_array_and_a_dependent_job_gathers_the_table(slurm_env, prepared, tmp_path):
    """slurm/suite_cpu.sh: one task of the paper per array index (the embedded SST-2 and RTE; a third
    index finds nothing to do), each a 2-rank fine-tuning under srun; then GATHER=1 writes the table."""
    tasks, out = tmp_path / "tasks", tmp_path / "out"
    for name in ("sst2", "rte"):
        shutil.copytree(GLUE / name, tasks / name)
    found = [sys.executable, "-m", "gpt1_ds.suite", "--tasks-dir", str(tasks), "--out", str(out), "--which"]
    assert subprocess.run(found, cwd=REPO, capture_output=True, text=True).stdout.strip() == "2"
    settings = dict(
        INIT="none",
        TASKS_DIR=str(tasks),
        OUT=str(out),
        OVERRIDES=f"tokenizer={prepared / 'tokenizer.model'} model=tiny model_overrides.vocab_size=2000 "
        "model_overrides.n_layer=1 max_train_examples=64 epochs=1 ds.bf16.enabled=false",
    )
    array = sbatch(slurm_env, "slurm/suite_cpu.sh", tmp_path / "task-%a.out", "--array=0-2", **settings)
    gather = sbatch(
        slurm_env, "slurm/suite_cpu.sh", tmp_path / "gather.out", f"--dependency=afterany:{array}",
        GATHER="1", **settings,
    )  # fmt: skip
    state = wait_done(slurm_env, gather, timeout=600)
    logs = {p.name: read_log(p) for p in tmp_path.glob("*.out")}
    assert state["JobState"] == "COMPLETED", logs
    assert "array index 2: no task of the paper there" in logs["task-2.out"]
    rows = json.loads((out / "suite.json").read_text())
    assert [r["task"] for r in rows] == ["rte", "sst2"]  # the paper's order
    assert all("error" not in r and r["train_examples"] == 64 for r in rows), rows
    assert "| sst2 | accuracy |" in (out / "suite.md").read_text()
