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
