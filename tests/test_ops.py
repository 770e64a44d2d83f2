"""gpt1_ds.ops: a cold op build, past a stale lock, made once per node and surviving the preemption
signal SLURM sends every process of a step; the CPU flags and the deferred compiles."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ONE_RANK_ENGINE, REPO, SMALL, scalars, train

from gpt1_ds.env import free_port
from gpt1_ds.runner import PREEMPTED_EXIT


def launch_as_srun(cmd: list[str], ranks: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    """``ranks`` processes of ``cmd`` with the variables srun's tasks are given (here as
    RANK, WORLD_SIZE, LOCAL_RANK), in one process group of their own, as a job step's; stderr into
    ``logs/rank{N}.log``."""
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    for rank in range(ranks):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks)}
        rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        group = procs[0].pid if procs else 0  # 0: a new group, the first rank its leader
        with open(logs / f"rank{rank}.log", "w") as err:
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=rank_env, stdout=subprocess.DEVNULL, stderr=err, process_group=group
                )
            )
    return procs


def building(lock: Path, stale: float) -> bool:
    """Whether a build holds ``lock`` (a lock newer than the stale one)."""
    try:
        return lock.stat().st_mtime > stale + 60
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_cold_build_past_a_stale_lock_is_made_once_and_a_usr1_during_it_is_kept(
    prepared, tmp_path, monkeypatch
):
    """Two ranks, optimiser offload (DeepSpeed's CPU Adam, compiled on first use) into an extension
    cache without it that holds the lock of a build killed long ago: without its removal every rank
    would wait on it for ever. The node's first rank builds; the other loads its build. USR1 sent
    during the build to every process of the ranks (as slurmstepd signals every process of a job
    step, the compilers too) neither kills the build nor is lost: the run saves after its first step
    and exits preempted; resumed, ds_configs/zero2_offload.json trains as it stands. (The
    shared-memory collectives, which every CPU run loads, are the usual cache's, linked.)"""
    from torch.utils.cpp_extension import _get_build_directory

    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    shm_comm = Path(_get_build_directory("deepspeed_shm_comm", False))
    (ext / shm_comm.name).symlink_to(shm_comm)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    env = dict(os.environ)
    build_dir = Path(_get_build_directory("cpu_adam", False))
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    lock.touch()
    stale = time.time() - 7200
    os.utime(lock, (stale, stale))
    run = tmp_path / "run"
    config = "ds_configs/zero2_offload.json"
    cmd = [sys.executable, "-m", "gpt1_ds.train", "--deepspeed_config", config, "--data", str(prepared)]
    ranks = launch_as_srun([*cmd, "--run-dir", str(run), *SMALL, "max_steps=2"], 2, env, tmp_path)
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    try:
        deadline = time.time() + 300
        while not building(lock, stale):  # the compilers run under the new lock
            alive = all(p.poll() is None for p in ranks)
            assert alive and time.time() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1)
        os.killpg(ranks[0].pid, signal.SIGUSR1)
        codes = [p.wait(timeout=600) for p in ranks]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ranks[0].pid, signal.SIGKILL)
    err = logs[0].read_text()
    assert codes == [PREEMPTED_EXIT] * 2, err[-3000:]
    assert re.search(rf"removing {re.escape(str(lock))}: a build of cpu_adam killed 12\d min ago", err)
    assert re.search(r"\[rank 0\] INFO DeepSpeed op cpu_adam: loaded in \d+\.\d s", err), err[-3000:]
    assert not lock.exists() and any(build_dir.glob("*.so"))
    assert "DeepSpeedCPUAdam" in err and (run / "checkpoints" / "step00000001" / "COMPLETE").is_file()
    # resumed: ds_configs/zero2_offload.json trains as it stands
    out = train(prepared, run, "max_steps=2", ds_config=config, env=env)
    assert "resumed from" in out.stderr and "at step 1" in out.stderr
    assert sorted(scalars(run, "train/loss")) == [1, 2]
    assert json.loads((run / "ds_config.json").read_text())["bf16"]["enabled"] is True


@pytest.mark.slow
def test_quick_cpu_info_gives_deepspeed_the_build_flags_py_cpuinfo_gives(monkeypatch):
    """DeepSpeed's CPU builders derive -march and the SIMD width from py-cpuinfo; answered from
    /proc/cpuinfo they derive the same flags (so a cached build still matches), without a process."""
    import cpuinfo
    from deepspeed.accelerator import get_accelerator

    from gpt1_ds import ops

    monkeypatch.setattr(cpuinfo, "get_cpu_info", cpuinfo.get_cpu_info)  # restored after the test
    builders = [get_accelerator().create_op_builder(ops.BUILDERS[n]) for n in ("cpu_adam", "shm_comm")]
    slow = [b.cxx_args() for b in builders]
    calls = []
    original = cpuinfo.get_cpu_info
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: calls.append(1) or original())
    ops.quick_cpu_info()
    assert [b.cxx_args() for b in builders] == slow
    assert calls == ([] if ops.proc_cpu_info() else [1])  # asked once at most per process
    assert any(a.startswith("-D__") for a in slow[0])  # the SIMD width is among the flags compared


def test_proc_cpu_info_reads_the_flags_line_of_this_architecture(monkeypatch, tmp_path):
    from gpt1_ds import ops

    monkeypatch.setattr(ops, "PROC_CPUINFO", tmp_path / "cpuinfo")
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n\nprocessor\t: 1\n")
    monkeypatch.setattr(ops.platform, "machine", lambda: "x86_64")
    assert ops.proc_cpu_info() == {"arch": "X86_64", "flags": ["fpu", "sse", "avx2", "avx512f"]}
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    monkeypatch.setattr(ops.platform, "machine", lambda: "aarch64")
    assert ops.proc_cpu_info() == {"arch": "ARM_8", "flags": ["fp", "asimd", "sve"]}
    monkeypatch.setattr(ops.platform, "machine", lambda: "ppc64le")  # py-cpuinfo answers there
    assert ops.proc_cpu_info() is None
    monkeypatch.setattr(ops, "PROC_CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(ops.platform, "machine", lambda: "x86_64")
    assert ops.proc_cpu_info() is None


def test_compile_on_first_call_compiles_once_when_first_called(monkeypatch):
    import torch

    from gpt1_ds import ops

    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or real(fn, **kw))

    def double(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    deferred = ops.compile_on_first_call(backend="eager")(double)
    assert deferred.__name__ == "double" and compiled == []
    x = torch.arange(3.0)
    assert torch.equal(deferred(x), 2 * x) and torch.equal(deferred(x + 1), 2 * x + 2)
    assert compiled == [{"backend": "eager"}]


@pytest.mark.slow
def test_deepspeeds_muon_imports_without_torchs_compiler_and_keeps_torch_compile():
    """ZeRO imports DeepSpeed's Muon optimizer to check any optimizer; its ``@torch.compile``
    decorations would import inductor at start-up."""
    code = """
import sys, torch
real = torch.compile
from gpt1_ds import ops
ops.defer_muon_compile()
from deepspeed.runtime.zero.muon import original_muon
assert torch.compile is real, "torch.compile restored"
assert "torch._inductor.compile_fx" not in sys.modules, "inductor imported"
assert original_muon.zeropower_via_newtonschulz5.__wrapped__.__name__ == "zeropower_via_newtonschulz5"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["ok"], out.stderr[-3000:]


ENGINE = (
    ONE_RANK_ENGINE
    + """
from gpt1_ds import ops
losses = []
for _ in range(3):
    ids = torch.randint(0, 100, (2, 17))
    _, loss = engine(ids[:, :-1], ids[:, 1:])
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
engine.save_checkpoint(sys.argv[5], tag="t")
engine.load_checkpoint(sys.argv[5], tag="t")
compiler = "torch._dynamo" in sys.modules
print("steps", len(losses), "again", ops.eager_optimizer_methods(), "compiler", compiler)
"""
)


@pytest.mark.slow
@pytest.mark.parametrize("config, compiler", [("zero2", False), ("zero3", True)])
def test_an_engine_trains_saves_and_loads_without_torchs_compiler(tmp_path, config, compiler):
    """ZeRO-0/1/2 ranks never import torch._dynamo (about 1.7 s of start-up): the optimizer's
    dynamo-disabled methods run as written (set once, by build_engine). ZeRO-3 imports it to register
    its hooks (DeepSpeed's own ``torch.compiler.disable``)."""
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-c", ENGINE, str(free_port()), f"ds_configs/{config}.json", "2", "10", str(ckpt)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-6:] == ["steps", "3", "again", "[]", "compiler", str(compiler)], out.stdout


def test_eager_optimizer_methods_keep_what_the_methods_do():
    import torch

    from gpt1_ds import ops

    # Those torch wrapped already in this process (a test compiled something) stay as they are.
    assert set(ops.eager_optimizer_methods()) <= set(ops.DYNAMO_WRAPPED)
    assert ops.eager_optimizer_methods() == []
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.5, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    opt.zero_grad()
    assert p.grad is None and torch.equal(p.detach(), torch.full((3,), 0.5))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1})
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 0.5
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"], torch.ones(3))
