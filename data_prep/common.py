"""Shared plumbing of the data-prep steps: command lines, MPI ranks, work balance, progress."""

from __future__ import annotations

import logging
import sys
from argparse import (
    Action,
    ArgumentDefaultsHelpFormatter,
    ArgumentParser,
    ArgumentTypeError,
    Namespace,
    RawDescriptionHelpFormatter,
)
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt1_ds.env import launched_world_size, mpi_launched, setup_logging


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


def get_comm() -> Comm:
    """COMM_WORLD when launched by mpirun/srun, else a single-process world.

    A launch of N > 1 tasks whose MPI world has size 1 (``srun --mpi=none`` or a
    PMI plugin that does not match the MPI library) would run N copies of the same
    work over the same files: it is refused.
    """
    expected = launched_world_size()
    comm = Comm()
    if mpi_launched() or (expected or 1) > 1:
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


class _HelpFormatter(RawDescriptionHelpFormatter, ArgumentDefaultsHelpFormatter):
    """The docstring as written, each flag's default after its help (where there is one)."""

    def _get_help_string(self, action: Action) -> str | None:
        if action.default in (None, False) or action.required:
            return action.help
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """An argparse type: an integer of 1 or more."""
    value = int(text)
    if value < 1:
        raise ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def step_parser(module: str, doc: str | None, *adders: Callable[[ArgumentParser], Any]) -> ArgumentParser:
    """The parser of ``python -m MODULE``, its docstring as the description, with the adders' flags."""
    parser = ArgumentParser(prog=f"python -m {module}", description=doc, formatter_class=_HelpFormatter)
    for add in adders:
        add(parser)
    return parser


def launch(parser: ArgumentParser, argv: list[str] | None) -> tuple[Namespace, Comm]:
    """The parsed flags, and this process's world with logging set up for its rank."""
    args = parser.parse_args(argv)
    comm = get_comm()
    setup_logging(comm.rank, comm.size)
    return args, comm


def progress(total: int, desc: str, comm: Comm, quiet: bool) -> tqdm:
    """A progress bar in bytes, shown on rank 0 unless ``quiet``."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not comm.is_root or quiet)


def remove_stale(directory: Path, pattern: str, keep: Collection[str] = ()) -> None:
    """Delete the files of ``directory`` that match ``pattern``, but those named in ``keep``."""
    for path in directory.glob(pattern):
        if path.name not in keep:
            path.unlink()


def run_command(main: Callable[[], Any]) -> int:
    """A step's command: bad input (``ValueError``, ``FileNotFoundError``) is one logged line and
    exit 2, not a traceback; under MPI the whole job ends with it (no rank waits in a barrier)."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        logging.getLogger("data_prep").error("%s", e)
        if "mpi4py.MPI" in sys.modules:
            from mpi4py import MPI

            if MPI.COMM_WORLD.Get_size() > 1:
                sys.stderr.flush()
                MPI.COMM_WORLD.Abort(2)
        return 2
    return 0
