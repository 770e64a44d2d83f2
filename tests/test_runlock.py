"""gpt1_ds.runlock: a run holds its directory; a holder that is gone is taken over, a live one named."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from gpt1_ds.runlock import LOCK_NAME, STALE, Holder, RunDirBusy, RunLock

HOLD = (
    "import sys, time; from gpt1_ds.runlock import RunLock; "
    "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


def holder_process(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_named_and_a_killed_one_taken_over(tmp_path, caplog):
    proc = holder_process(tmp_path)
    try:
        lock = json.loads((tmp_path / LOCK_NAME).read_text())
        assert (lock["pid"], lock["host"]) == (proc.pid, socket.gethostname())
        with pytest.raises(RunDirBusy) as e:
            RunLock(tmp_path).acquire(heartbeat=False)
        assert f"{tmp_path} is held by another run (pid {proc.pid} on {socket.gethostname()}, since " in str(
            e.value
        )
        assert "wait for it to end, or choose another --run-dir" in str(e.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    mine = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gpt1_ds.runlock"):
        mine.acquire(heartbeat=False)
    assert f"pid {proc.pid} is no longer running" in caplog.text
    assert mine.read().pid == os.getpid()
    mine.release()
    assert not (tmp_path / LOCK_NAME).exists() and list(tmp_path.iterdir()) == []


def write_holder(run_dir, **changes) -> Holder:
    now = time.time()
    holder = Holder(**{**asdict(Holder.me(now)), "pid": 1, **changes})
    (run_dir / LOCK_NAME).write_text(json.dumps(asdict(holder)))
    return holder


def test_another_hosts_holder_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path):
    write_holder(tmp_path, host="node-b", pid=4242)
    with pytest.raises(RunDirBusy, match=r"pid 4242 on node-b, since .*, last heartbeat 0 s ago"):
        RunLock(tmp_path).acquire(heartbeat=False)
    old = time.time() - STALE - 60
    write_holder(tmp_path, host="node-b", pid=4242, since=old, heartbeat=old)
    lock = RunLock(tmp_path)
    lock.acquire(heartbeat=False)
    assert lock.read().host == socket.gethostname()
    lock.release()


def test_a_requeue_of_the_same_slurm_job_takes_over_at_once(tmp_path, monkeypatch, caplog):
    write_holder(tmp_path, host="node-b", pid=4242, job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    with caplog.at_level(logging.WARNING, logger="gpt1_ds.runlock"):
        RunLock(tmp_path).acquire(heartbeat=False)
    assert "a requeue of SLURM job 777 takes it over" in caplog.text
    write_holder(tmp_path, host="node-b", pid=4242, job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")  # another job: the holder is alive
    with pytest.raises(RunDirBusy, match=r"held by another run \(SLURM job 777, pid 4242 on node-b"):
        RunLock(tmp_path).acquire(heartbeat=False)


def test_the_heartbeat_moves_and_stops_when_another_run_took_over(tmp_path, caplog):
    lock = RunLock(tmp_path)
    lock.acquire(heartbeat=False)
    first = lock.read().heartbeat
    time.sleep(0.05)
    assert lock.refresh() and lock.read().heartbeat > first
    write_holder(tmp_path, host="node-b", pid=4242)
    with caplog.at_level(logging.ERROR, logger="gpt1_ds.runlock"):
        assert not lock.refresh()
    assert "another run took the run directory over" in caplog.text
    lock.release()
    assert lock.read().host == "node-b"  # not this run's to remove


def test_the_other_ranks_of_a_slurm_job_refuse_another_jobs_run_and_pass_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    write_holder(tmp_path, host="node-b", pid=4242, job="5")  # rank 0 of this job
    RunLock(tmp_path).check_free()
    write_holder(tmp_path, host="node-b", pid=4242, job="4")  # another job's live run
    with pytest.raises(RunDirBusy, match=r"held by another run \(SLURM job 4, pid 4242 on node-b"):
        RunLock(tmp_path).check_free()
    old = time.time() - STALE - 60
    write_holder(tmp_path, host="node-b", pid=4242, job="4", since=old, heartbeat=old)
    RunLock(tmp_path).check_free()  # gone: rank 0 takes it over
