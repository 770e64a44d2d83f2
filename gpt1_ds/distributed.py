"""One entry point for every launcher: deepspeed, torchrun, srun, mpirun, or a plain process.

``deepspeed`` and ``torchrun`` set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
Under ``mpirun`` (Open MPI, MPICH, PMIx variables present) DeepSpeed's MPI discovery (mpi4py) sets
them. Under ``srun`` they are mapped from SLURM: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS,
LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the first host of SLURM_JOB_NODELIST, MASTER_PORT =
10000 + job id mod 50000 (every task of the job derives the same one). A plain process is a world
of one on a free local port. NCCL on GPUs and gloo on CPUs, as DeepSpeed's accelerator chooses.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import NamedTuple, NoReturn

import torch

from gpt1_ds import ops
from gpt1_ds.env import free_port, launcher, printed_to_debug


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[003-010,12],gpu7`` → ``node003``."""
    cmd = ["scontrol", "show", "hostnames", nodelist]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass  # no scontrol here: read the list itself
    m = re.match(r"([^,\[]+)(?:\[([^\],-]*)[^\]]*\])?", nodelist)  # prefix, first number of the brackets
    if not m:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def setup_env() -> str:
    """Fill the torch.distributed variables for this launcher; returns its name."""
    kind = launcher()
    env = os.environ
    if kind == "slurm":
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"])
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000))
    elif kind == "single":
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    return kind


def init(timeout: float | None = None) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed, collectives failing after ``timeout``
    seconds (NCCL's watchdog then aborts the process, rather than leaving it hanging); returns
    (rank, world size, local rank)."""
    import deepspeed

    kind = setup_env()
    if "SLURM_JOB_ID" in os.environ:  # mpirun inside an allocation: a port per job, as under srun
        os.environ.setdefault("MASTER_PORT", str(10000 + int(os.environ["SLURM_JOB_ID"]) % 50000))
    port = int(os.environ.get("MASTER_PORT", "29500"))  # MPI discovery announces this port
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    limit = {"timeout": timedelta(seconds=timeout)} if timeout else {}
    ops.quick_cpu_info()
    try:
        with printed_to_debug("deepspeed.init_distributed"), ops.signals_held():  # it loads the CPU shm op
            deepspeed.init_distributed(
                auto_mpi_discovery=kind == "mpi", distributed_port=port, verbose=False, **limit
            )
    except torch.distributed.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        where = f"{os.environ.get('MASTER_PORT', port)} on {os.environ.get('MASTER_ADDR', 'this host')}"
        raise PortInUse(
            f"port {where} is in use (another run on this machine?): give this one another port: "
            "deepspeed --master_port N, torchrun --master-port N, or MASTER_PORT=N"
        ) from None
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        # DeepSpeed's MPI discovery numbers a node's ranks in world order, Open MPI by its mapping
        # (8 ranks on 2 cores: world rank 1 is local rank 2), and DeepSpeed's engine refuses to
        # start where the two differ: Open MPI's number, which binds the rank, is the one kept.
        os.environ["LOCAL_RANK"] = os.environ["OMPI_COMM_WORLD_LOCAL_RANK"]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local


class PortInUse(ValueError):
    """The rendezvous port is taken; the message names it and how to choose another."""


class BindingError(RuntimeError):
    """Ranks and the GPUs they can see do not match; the message names the variables."""


BINDING_VARS = ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "SLURM_LOCALID", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


def _binding(env: Mapping[str, str]) -> str:
    return ", ".join(f"{v}={env[v]}" for v in BINDING_VARS if v in env) or "none of " + ", ".join(
        BINDING_VARS
    )


def device_index(local_rank: int, visible: int, env: Mapping[str, str] = os.environ) -> int:
    """Which of the ``visible`` GPUs this rank uses. One visible (``srun --gpus-per-task=1``,
    ``--gpu-bind=single:1``, a site's per-task ``CUDA_VISIBLE_DEVICES``): that one, whatever the
    local rank. Several (one task per node sees all, as under ``deepspeed`` or ``torchrun``): the
    local rank's, which must be one of them."""
    if visible < 1:
        raise BindingError(f"this process sees no GPU ({_binding(env)})")
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise BindingError(
            f"local rank {local_rank} but this process sees {visible} GPUs ({_binding(env)}): start "
            f"at most {visible} ranks per node, or bind one GPU to each task (srun --gpus-per-task=1)"
        )
    return local_rank


def device(local_rank: int) -> torch.device:
    """This rank's device: a GPU chosen by ``device_index`` (made current) under DeepSpeed's CUDA
    accelerator, else the CPU."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cuda":
        index = device_index(local_rank, torch.cuda.device_count())
        accel.set_device(index)
        return torch.device("cuda", index)
    return torch.device(accel.device_name())


class Placement(NamedTuple):
    """Where one rank runs: its host and device, and the GPU's identity (empty on a CPU)."""

    rank: int
    host: str
    device: str
    uuid: str
    visible: int
    cpus: frozenset[int] = frozenset()
    """The cores this process may run on (its affinity: a launcher's or SLURM's binding)."""


def placement(rank: int, dev: torch.device) -> Placement:
    cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
    if dev.type != "cuda":
        return Placement(rank, socket.gethostname(), str(dev), "", 0, cpus)
    uuid = str(getattr(torch.cuda.get_device_properties(dev), "uuid", dev.index))
    return Placement(rank, socket.gethostname(), str(dev), uuid, torch.cuda.device_count(), cpus)


def thread_share(places: list[Placement], rank: int) -> int:
    """Threads for ``rank``'s own operators: its cores divided among the ranks of its host that may
    run on the same cores. Ranks bound to cores of their own (``srun --cpus-per-task``,
    ``deepspeed --bind_cores_to_rank``) keep all of theirs; ranks that share a host's cores split
    them, instead of each starting one thread per core (2 ranks on 2 cores: 669 ms a step instead
    of 48)."""
    mine = places[rank]
    if not mine.cpus:
        return max(1, (os.cpu_count() or 1) // sum(p.host == mine.host for p in places))
    sharing = sum(1 for p in places if p.host == mine.host and p.cpus & mine.cpus)
    return max(1, len(mine.cpus) // sharing)


def check_placements(places: list[Placement]) -> str:
    """Every rank's placement checked: two ranks on one GPU, or more ranks on a node than the GPUs
    its ranks can see, is a ``BindingError``. Returns the one-line rank → host → device map."""
    by_gpu: dict[tuple[str, str], list[int]] = {}
    for p in places:
        if p.uuid:
            by_gpu.setdefault((p.host, p.uuid), []).append(p.rank)
    shared = {key: ranks for key, ranks in by_gpu.items() if len(ranks) > 1}
    if shared:
        (host, uuid), ranks = next(iter(shared.items()))
        raise BindingError(
            f"ranks {ranks} on {host} share one GPU ({uuid}): each task sees the same device; bind one "
            "GPU per task (srun --gpus-per-task=1) or let each task see all of the node's GPUs"
        )
    shown = [f"{p.rank}→{p.host}:{p.device}" for p in places[:16]]
    more = f" … ({len(places) - 16} more)" if len(places) > 16 else ""
    return "ranks → hosts → devices: " + ", ".join(shown) + more


PREEMPTED_EXIT = 75
"""A run preempted (SIGUSR1 or SIGTERM) after its checkpoint: every rank exits with it together."""


def run_rank(main: Callable[[], int], together: tuple[int, ...] = (0, PREEMPTED_EXIT)) -> NoReturn:
    """Run a rank's ``main`` and exit with its code, without the interpreter's teardown.

    Tearing down the communication and DeepSpeed's C++ objects at interpreter exit sometimes
    aborts a rank ("terminate called without an active exception"), which turns a finished run
    into a failed one; ``os._exit`` skips that teardown. MPI (if mpi4py started it) is finalised
    for the codes in ``together``, with which every rank ends at once (or mpirun calls the exit
    abnormal); for any other code, or an exception (printed, code 1), it is not: finalising waits
    for every rank, and the others may be waiting in a collective for this one. mpirun ends the job
    at the first rank that exits so, with its code (as torchrun and srun do).
    """
    try:
        code = main()
    except Exception:  # any: printed, and the job ended rather than left hanging
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if code in together and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)
