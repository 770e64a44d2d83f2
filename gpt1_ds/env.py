"""The process's environment: its launcher, logging per rank, a free port. Shared by training
(``gpt1_ds.distributed``) and data prep; imports nothing heavy, so an MPI rank starts fast."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
"""The checkout gpt1-ds runs from: its ``ds_configs/``, ``configs/`` and embedded ``data/``."""
TESTED = {"torch": "2.13", "deepspeed": "0.19"}
"""The torch and DeepSpeed releases (major.minor) gpt1-ds is tested with; ``constraints.txt`` pins
them for ``make setup`` and ``pyproject.toml`` bounds them."""

MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
"""Variables that MPI launchers set on every rank, holding the world size."""
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def launcher() -> str:
    """Which launcher started this process: ``env`` (deepspeed, torchrun, or a mapping done
    before), ``mpi``, ``slurm`` (an srun step) or ``single``."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if "OMPI_COMM_WORLD_SIZE" in env or "MV2_COMM_WORLD_SIZE" in env:
        return "mpi"  # mpirun; inside an allocation SLURM_PROCID is 0 on every rank, so this comes first
    if all(v in env for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID")):
        return "slurm"  # an srun step, whatever its --mpi plugin
    if "PMI_SIZE" in env or "PMIX_RANK" in env:
        return "mpi"
    return "single"


def launched_world_size() -> int | None:
    """The world size an MPI launcher or an srun step announced, if any."""
    for var in MPI_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if os.environ.get("SLURM_STEP_ID", "").isdigit() and os.environ.get("SLURM_STEP_NUM_TASKS", "").isdigit():
        return int(os.environ["SLURM_STEP_NUM_TASKS"])
    return None


def launched_rank() -> int:
    """This process's global rank as its launcher announced it (before torch.distributed starts)."""
    for var in ("RANK", "SLURM_PROCID", *MPI_RANK_VARS):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def mpi_launched() -> bool:
    """Whether an MPI launcher's variables are present."""
    return any(v in os.environ for v in MPI_SIZE_VARS + MPI_RANK_VARS)


class _Answered(logging.Filter):
    """DeepSpeed's warnings that gpt1-ds answers in its own words (a warm-up longer than the run:
    ``ds_config.resolve_ds_config``) or that ask nothing of the user (its scheduler read before its
    first step, as every run does)."""

    ANSWERED = ("is less than warmup_num_steps", "learning rate from scheduler before it has started")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.ANSWERED)


def setup_logging(rank: int = 0, world: int = 1, tag_rank: bool | None = None) -> None:
    """INFO on rank 0, WARNING on the others; DeepSpeed's chatter muted. Lines name the rank when
    ``tag_rank`` (default: in a world of more than one)."""
    tag = f" [rank {rank}]" if (world > 1 if tag_rank is None else tag_rank) else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s{tag} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("DeepSpeed", "deepspeed"):
        logger = logging.getLogger(noisy)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _Answered) for f in logger.filters):
            logger.addFilter(_Answered())


@contextlib.contextmanager
def printed_to_debug(what: str) -> Iterator[None]:
    """What ``print`` writes inside the block, logged at debug level instead (``what`` names it)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        yield
    if text := out.getvalue().strip():
        logging.getLogger("gpt1_ds").debug("%s printed:\n%s", what, text)


def quiet_libraries() -> None:
    """Keep out of a run's log what the libraries print that asks nothing of the user, before they
    load: DeepSpeed's guess of the accelerator on a machine without CUDA (``DS_ACCELERATOR=cpu``
    unless set), torch's deprecation of a collective DeepSpeed calls."""
    import warnings

    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", r".*all_gather_into_tensor.* is deprecated", FutureWarning)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UntestedVersions(RuntimeError):
    """torch or DeepSpeed is a release gpt1-ds has not been tested with."""


def untested_versions(versions: dict[str, str]) -> list[str]:
    """``name version`` of each package in ``versions`` whose major.minor is not the tested one."""
    return [
        f"{name} {v}"
        for name, v in versions.items()
        if ".".join(v.split("+")[0].split(".")[:2]) != TESTED[name]
    ]


def check_versions(allow_untested: bool) -> None:
    """Refuse (or, when allowed, warn about) a torch or DeepSpeed release outside ``TESTED``."""
    import deepspeed
    import torch

    untested = untested_versions({"torch": torch.__version__, "deepspeed": deepspeed.__version__})
    if not untested:
        return
    tested = " with ".join(f"{name} {v}" for name, v in TESTED.items())
    message = f"{', '.join(untested)}: gpt1-ds is tested with {tested} (constraints.txt)"
    if not allow_untested:
        raise UntestedVersions(f"{message}; set allow_untested_versions=true to run anyway")
    logging.getLogger(__name__).warning("%s; running anyway (allow_untested_versions)", message)
