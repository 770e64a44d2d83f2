"""Shared plumbing of the data-prep steps: MPI ranks, atomic files, hashes, logging."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("data_prep")

# Environment variables that MPI launchers set on every rank, with the world size.
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


class Comm:
    """The few collectives the steps use: mpi4py's COMM_WORLD under an MPI launcher,
    a world of one otherwise (same calls, same code path)."""

    def __init__(self, mpi_comm: Any | None = None) -> None:
        self._comm = mpi_comm
        self.rank = mpi_comm.Get_rank() if mpi_comm is not None else 0
        self.size = mpi_comm.Get_size() if mpi_comm is not None else 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._comm is not None:
            self._comm.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere."""
        return self._comm.gather(obj, root=0) if self._comm is not None else [obj]

    def bcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return self._comm.bcast(obj, root=0) if self._comm is not None else obj


def _expected_world_size() -> int | None:
    """World size as the launcher announced it, if any."""
    for var in _MPI_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if os.environ.get("SLURM_STEP_ID", "").isdigit() and os.environ.get("SLURM_STEP_NUM_TASKS", "").isdigit():
        return int(os.environ["SLURM_STEP_NUM_TASKS"])  # inside an srun step
    return None


def get_comm() -> Comm:
    """COMM_WORLD when launched by mpirun/srun, else a single-process world.

    A launch of N > 1 tasks whose MPI world has size 1 (``srun --mpi=none`` or a
    PMI plugin that does not match the MPI library) would run N copies of the same
    work over the same files: it is refused.
    """
    expected = _expected_world_size()
    launched = any(v in os.environ for v in _MPI_SIZE_VARS + _MPI_RANK_VARS)
    comm = Comm()
    if launched or (expected or 1) > 1:
        from mpi4py import MPI

        comm = Comm(MPI.COMM_WORLD)
    if expected is not None and expected > 1 and comm.size == 1:
        raise RuntimeError(
            f"the launcher started {expected} tasks but each sees an MPI world of size 1: "
            "mpi4py does not talk to this launcher (use `srun --mpi=pmix` or `mpirun`)"
        )
    return comm


def balance(sizes: list[int], ranks: int) -> list[list[int]]:
    """Indices per rank, largest first to the least-loaded rank (deterministic)."""
    loads = [0] * ranks
    owned: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        owned[r].append(i)
        loads[r] += sizes[i]
    return [sorted(o) for o in owned]


def setup_logging(comm: Comm, verbose: bool = False) -> None:
    """INFO on rank 0, WARNING on the other ranks (they speak only when something is wrong)."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if comm.is_root else logging.WARNING,
        format=f"%(asctime)s [rank {comm.rank}] %(levelname)s %(message)s"
        if comm.size > 1
        else "%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name, renamed when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
