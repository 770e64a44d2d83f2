"""One entry point for every launcher: deepspeed, torchrun, srun, mpirun, or a plain process.

``deepspeed`` and ``torchrun`` set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. Under ``mpirun`` (Open MPI, MPICH, PMIx variables present) DeepSpeed's
MPI discovery (mpi4py) sets them. Under ``srun`` they are mapped from SLURM:
RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID,
MASTER_ADDR = the first host of SLURM_JOB_NODELIST, MASTER_PORT = 10000 + job id
mod 50000 (every task of the job derives the same one). A plain process is a world
of one on a free local port. NCCL on GPUs and gloo on CPUs, as DeepSpeed's
accelerator chooses.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[003-010,12],gpu7`` → ``node003``."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def launcher() -> str:
    """Which launcher started this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "env"  # deepspeed, torchrun, or a mapping done before
    if any(v in os.environ for v in _MPI_VARS):
        return "mpi"  # checked before SLURM: under mpirun inside an allocation, SLURM_PROCID is 0 everywhere
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "SLURM_STEP_ID" in os.environ:
        return "slurm"
    return "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_env() -> str:
    """Fill the torch.distributed variables for this launcher; returns its name."""
    kind = launcher()
    env = os.environ
    if kind == "slurm":
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000))
    elif kind == "single":
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    return kind


def init() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world size, local rank)."""
    import deepspeed
    import torch.distributed as dist

    kind = setup_env()
    port = int(os.environ.get("MASTER_PORT", "29500"))  # MPI discovery announces this port
    deepspeed.init_distributed(auto_mpi_discovery=kind == "mpi", distributed_port=port, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    return rank, world, local
