"""Hangs fail fast: a rank that makes no progress for ``stall_timeout`` seconds exits with 76.

A dead node, a stuck collective or a rank waiting for data stops every rank of a job: the others
wait in their next collective. Two limits end that wait. torch.distributed's collective timeout
(``collective_timeout``) fails a collective that waits too long (with NCCL,
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` makes its watchdog abort the process rather than leave it
hanging); and this module's ``Watchdog``, a thread on every rank, exits the process when the
loop has not moved for ``stall_timeout`` seconds: it logs what the rank was doing and for how long,
dumps every thread's stack to stderr, writes ``RUN_DIR/HUNG`` and exits with ``HUNG_EXIT``. Nothing
is saved, so no half-done checkpoint can exist: the next run resumes from the last complete one,
and the SLURM templates requeue a job that ends this way (``slurm/requeue.sh``).

For tests, ``GPT1_DS_STALL=RANK:STEP:SECONDS`` makes that rank sleep inside that step of a run that
started from step 0 (a resumed run does not stall again). For the preflight's round trip
(``slurm/preflight.sh``), ``GPT1_DS_HOLD_AT=STEP`` makes every rank wait after that step's log line
until a signal (USR1) arrives, so that the signal lands in the middle of the run however fast it is.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

HUNG_EXIT = 76
"""The exit code of a rank that stalled, or whose collective timed out."""
HUNG = "HUNG"
"""The run directory's marker of a stall (what the rank was doing), for the SLURM templates."""


class Watchdog:
    """A daemon thread that exits the process when ``beat`` has not been called for ``timeout`` s."""

    def __init__(self, timeout: float, rank: int, marker: Path | None) -> None:
        self.timeout, self.rank, self.marker = timeout, rank, marker
        self.phase, self.last = "starting", time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpt1_ds-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.timeout > 0:
            self._thread.start()
        return self

    def beat(self, phase: str) -> None:
        """Progress: the rank now does ``phase``."""
        self.phase, self.last = phase, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.timeout / 4, 5.0)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        what = f"rank {self.rank}: no progress for {idle:.0f} s ({self.phase}); stacks follow"
        log.error(
            "%s; exiting with %d, nothing saved: resume from the last complete checkpoint", what, HUNG_EXIT
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if self.marker is not None:
            try:
                self.marker.write_text(f"{what}\n")
            except OSError as e:  # the marker only helps the requeue decision
                log.error("cannot write %s: %s", self.marker, e)
        sys.stderr.flush()
        os._exit(HUNG_EXIT)


def timed_out(error: BaseException) -> bool:
    """Whether ``error`` is a collective that timed out (gloo's and NCCL's wording)."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def injected_stall(rank: int, step: int, first_step: int) -> None:
    """Sleep where ``GPT1_DS_STALL`` asks (``RANK:STEP:SECONDS``), in a run started at step 0."""
    spec = os.environ.get("GPT1_DS_STALL")
    if not spec or first_step != 0:
        return
    want_rank, want_step, seconds = (int(x) for x in spec.split(":"))
    if (rank, step) == (want_rank, want_step):
        log.warning("rank %d: injected stall of %d s in step %d (GPT1_DS_STALL)", rank, seconds, step)
        time.sleep(seconds)


HOLD_LIMIT = 600.0
"""The longest ``hold_for_signal`` waits before the run goes on without the signal."""


def hold_for_signal(
    step: int, first_step: int, signalled: Callable[[], bool], beat: Callable[[str], None]
) -> None:
    """Where ``GPT1_DS_HOLD_AT`` asks (``STEP``, in a run started before it): wait until ``signalled()``
    (the process got USR1 or TERM), at most ``HOLD_LIMIT`` seconds, keeping the watchdog fed."""
    spec = os.environ.get("GPT1_DS_HOLD_AT")
    if not spec or int(spec) != step or first_step >= step:
        return
    log.info("step %d: waiting for a signal (GPT1_DS_HOLD_AT)", step)
    deadline = time.monotonic() + HOLD_LIMIT
    while not signalled():
        if time.monotonic() > deadline:
            log.warning("step %d: no signal in %.0f s (GPT1_DS_HOLD_AT); going on", step, HOLD_LIMIT)
            return
        beat(f"waiting for a signal after step {step} (GPT1_DS_HOLD_AT)")
        time.sleep(0.05)
