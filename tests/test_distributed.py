"""gpt1_ds.distributed: the GPU each rank uses follows the binding; shared GPUs are refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, mpirun

from gpt1_ds.distributed import BindingError, Placement, check_placements, device_index, thread_share
from gpt1_ds.env import free_port

# (what the launcher binds, local rank, GPUs the process sees, its environment) → device index
BINDINGS = [
    ("torchrun/deepspeed: each rank sees the node's 8", 3, 8, {"LOCAL_RANK": "3"}, 3),
    ("srun --gpus-per-task=1: one each", 3, 1, {"SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3"}, 0),
    ("srun --gpu-bind=single:1", 7, 1, {"SLURM_LOCALID": "7", "SLURM_STEP_GPUS": "7"}, 0),
    ("site sets CUDA_VISIBLE_DEVICES per task", 1, 1, {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "5"}, 0),
    ("srun --gpus-per-task=2: two each", 1, 2, {"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "2,3"}, 1),
    ("one rank, all GPUs", 0, 4, {}, 0),
]


@pytest.mark.parametrize(
    ("case", "local_rank", "visible", "env", "expected"), BINDINGS, ids=[b[0] for b in BINDINGS]
)
def test_the_device_follows_what_the_process_sees(case, local_rank, visible, env, expected):
    assert device_index(local_rank, visible, env) == expected


def test_a_rank_beyond_the_visible_gpus_is_an_error_naming_the_variables():
    env = {"LOCAL_RANK": "5", "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_LOCALID": "5"}
    with pytest.raises(BindingError) as e:
        device_index(5, 2, env)
    assert "local rank 5 but this process sees 2 GPUs" in str(e.value)
    assert "CUDA_VISIBLE_DEVICES=0,1, LOCAL_RANK=5, SLURM_LOCALID=5" in str(e.value)
    with pytest.raises(BindingError, match=r"sees no GPU \(CUDA_VISIBLE_DEVICES=\)"):
        device_index(0, 0, {"CUDA_VISIBLE_DEVICES": ""})


def test_two_ranks_on_one_gpu_are_refused_and_the_map_is_one_line():
    ok = [Placement(r, f"node{r // 2}", f"cuda:{r % 2}", f"GPU-{r}", 2) for r in range(4)]
    line = check_placements(ok)
    assert line == "ranks → hosts → devices: 0→node0:cuda:0, 1→node0:cuda:1, 2→node1:cuda:0, 3→node1:cuda:1"
    # Every task of node1 told CUDA_VISIBLE_DEVICES=0: both pick their only GPU, the same one.
    shared = [
        *ok[:2],
        Placement(2, "node1", "cuda:0", "GPU-2", 1),
        Placement(3, "node1", "cuda:0", "GPU-2", 1),
    ]
    with pytest.raises(BindingError, match=r"ranks \[2, 3\] on node1 share one GPU \(GPU-2\)"):
        check_placements(shared)
    # The same UUID string on two hosts is two GPUs; CPU ranks have none to share.
    assert check_placements(
        [Placement(0, "a", "cuda:0", "GPU-0", 1), Placement(1, "b", "cuda:0", "GPU-0", 1)]
    )
    many = [Placement(r, "h", "cpu", "", 0) for r in range(20)]
    assert check_placements(many).endswith("15→h:cpu … (4 more)")


def test_ranks_sharing_a_hosts_cores_split_them_and_bound_ranks_keep_theirs() -> None:
    """2 ranks on 2 shared cores: one thread each (not 2 each, which made a step 10× slower); ranks
    bound to cores of their own (srun --cpus-per-task) keep all of theirs; other hosts do not count."""
    shared = frozenset({0, 1})
    places = [Placement(r, "vm", "cpu", "", 0, shared) for r in range(2)]
    assert [thread_share(places, r) for r in range(2)] == [1, 1]
    bound = [
        Placement(r, "n0", "cuda:0", f"GPU-{r}", 1, frozenset(range(8 * r, 8 * r + 8))) for r in range(4)
    ]
    assert [thread_share(bound, r) for r in range(4)] == [8, 8, 8, 8]
    mixed = [
        Placement(0, "a", "cpu", "", 0, frozenset(range(16))),
        Placement(1, "b", "cpu", "", 0, frozenset(range(16))),
    ]
    assert thread_share(mixed, 0) == 16
    crowded = [Placement(r, "h", "cpu", "", 0, frozenset({0, 1, 2})) for r in range(8)]
    assert thread_share(crowded, 5) == 1  # never 0


RANK_1_FAILS = """
import time
from mpi4py import MPI
from gpt1_ds.distributed import run_rank

def main():
    if MPI.COMM_WORLD.Get_rank() == 1:
        raise RuntimeError("rank 1 fails")
    time.sleep(300)  # as a rank waiting in a collective for rank 1
    return 0

run_rank(main)
"""


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_mpirun_job_at_once_with_its_code_and_traceback():
    """Not left hanging: MPI's finalize in the failed rank would wait for the other rank."""
    cmd = [*mpirun(free_port()), sys.executable, "-c", RANK_1_FAILS]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "RuntimeError: rank 1 fails" in out.stderr, out.stderr[-3000:]
