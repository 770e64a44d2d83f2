"""gpt1_ds.distributed: the GPU each rank uses follows the binding; shared GPUs are refused."""

from __future__ import annotations

import pytest

from gpt1_ds.distributed import BindingError, Placement, check_placements, device_index

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
