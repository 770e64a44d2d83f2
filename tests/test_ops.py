"""gpt1_ds.ops: an op's build survives the preemption signal SLURM sends every process of a step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

BUILD = """
import signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(time.time()))
from gpt1_ds import ops
print("building", flush=True)
failed = ops.load("shm_comm")
print("built" if failed is None else f"failed: {failed}", "signals:", len(got), flush=True)
"""


@pytest.mark.slow
def test_usr1_to_every_process_during_a_cold_build_neither_kills_it_nor_is_lost(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "building"
    deadline = time.time() + 60  # the compilers are running: ninja under the build directory's lock
    while not list((tmp_path / "ext").rglob("lock")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGUSR1)  # as slurmstepd signals every process of the step
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and out.strip() == "built signals: 1", out


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
