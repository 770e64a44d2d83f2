"""A run holds its run directory: ``RUN/run.lock`` names the holder and carries its heartbeat.

Two trainings in one run directory would share checkpoints and ``latest`` and log every step
twice. The lock is a small JSON file (host, pid, SLURM job id, since, heartbeat), created with
``os.link`` (atomic, and failing where the file exists, also on NFS: no ``flock``) and refreshed
by a thread of rank 0 every ``HEARTBEAT`` seconds. A holder that is gone is taken over with a
warning: on the same host, its pid is dead (or its heartbeat stale: the pid was reused); on
another host, its heartbeat is older than ``STALE``; a requeue of the same SLURM job takes it
over at once. Anything else is refused in one line naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT = 30.0
"""Seconds between the holder's refreshes of the lock."""
STALE = 300.0
"""Seconds without a refresh after which a holder on another host is taken for gone."""


class RunDirBusy(ValueError):
    """The run directory is held by a run that is alive; the message names it."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory."""

    host: str
    pid: int
    job: str | None
    since: float
    heartbeat: float

    @classmethod
    def me(cls, now: float) -> Holder:
        return cls(socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), now, now)

    def same_process(self, other: Holder) -> bool:
        return (self.host, self.pid, self.since) == (other.host, other.pid, other.since)

    def describe(self, now: float) -> str:
        job = f"SLURM job {self.job}, " if self.job else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        beat = f"last heartbeat {now - self.heartbeat:.0f} s ago"
        return f"{job}pid {self.pid} on {self.host}, since {since}, {beat}"

    def gone(self, me: Holder, now: float) -> str | None:
        """Why this holder no longer holds the directory (None: it still does)."""
        if self.job and self.job == me.job:
            return f"a requeue of SLURM job {self.job} takes it over"
        stale = now - self.heartbeat > STALE
        if self.host == me.host:
            if not _alive(self.pid):
                return f"pid {self.pid} is no longer running"
            return (
                f"its heartbeat stopped {now - self.heartbeat:.0f} s ago (pid {self.pid} was reused)"
                if stale
                else None
            )
        return f"its heartbeat stopped {now - self.heartbeat:.0f} s ago" if stale else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """Rank 0's hold on a run directory: ``acquire``, a heartbeat thread, ``release``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.me: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> Holder | None:
        """The holder the lock names (None: no lock, or one that is not a lock's JSON)."""
        try:
            return Holder(**json.loads(self.path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self, heartbeat: bool = True) -> None:
        """Hold the directory, taking over from a holder that is gone; ``RunDirBusy`` if it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        me = Holder.me(now)
        for _ in range(5):
            if self._create(me):
                self.me = me
                if heartbeat:
                    self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
                    self._thread.start()
                return
            holder = self.read()
            if holder is None:  # being written, or not ours to read: judged by its age
                age = now - self.path.stat().st_mtime if self.path.exists() else STALE + 1
                if age <= STALE:
                    time.sleep(0.1)
                    continue
                holder = Holder("?", -1, None, now - age, now - age)
            reason = holder.gone(me, now)
            if reason is None:
                raise RunDirBusy(
                    f"{self.path.parent} is held by another run ({holder.describe(now)}): wait for it "
                    f"to end, or choose another --run-dir (the lock: {self.path})"
                )
            log.warning("taking over %s from %s: %s", self.path.parent, holder.describe(now), reason)
            self._remove_if(holder)
        raise RunDirBusy(f"{self.path}: could not take the run directory (it keeps changing hands)")

    def check_free(self) -> None:
        """For a rank other than 0 of a SLURM job: ``RunDirBusy`` where another job's live run holds
        the directory, so that every task of the step exits 2 (srun reports the tasks' worst code,
        and a task killed for rank 0's refusal would report 143). Rank 0's own lock names this job."""
        job, holder, now = os.environ.get("SLURM_JOB_ID"), self.read(), time.time()
        if job is None or holder is None or holder.job == job:
            return
        if holder.gone(Holder.me(now), now) is None:
            raise RunDirBusy(f"{self.path.parent} is held by another run ({holder.describe(now)})")

    def _create(self, me: Holder) -> bool:
        """Write the lock where there is none (a temporary file linked into place: atomic)."""
        tmp = self.path.with_name(f".{LOCK_NAME}.{me.host}.{me.pid}")
        tmp.write_text(json.dumps(asdict(me)), encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_if(self, holder: Holder) -> None:
        """Remove the lock if it still names ``holder`` (moved aside first, so that a lock another
        run has written since is put back, not deleted)."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale.{os.getpid()}")
        try:
            self.path.rename(aside)
        except FileNotFoundError:
            return
        try:
            moved = Holder(**json.loads(aside.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            moved = None
        if moved is not None and not moved.same_process(holder) and holder.host != "?":
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # a new holder's lock: back in place
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            if not self.refresh():
                return

    def refresh(self) -> bool:
        """The heartbeat written (False, with an error logged, where another run holds the lock now)."""
        assert self.me is not None
        current = self.read()
        if current is None or not current.same_process(self.me):
            log.error("%s: another run took the run directory over; this run no longer holds it", self.path)
            return False
        beat = Holder(**{**asdict(self.me), "heartbeat": time.time()})
        tmp = self.path.with_name(f".{LOCK_NAME}.beat.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(asdict(beat)), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk: the run goes on; the lock keeps its last heartbeat
            log.warning("%s: heartbeat not written: %s", self.path, e)
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self.read()
        if self.me is not None and current is not None and current.same_process(self.me):
            self.path.unlink(missing_ok=True)
        self.me = None
