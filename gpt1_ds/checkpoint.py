"""Checkpoints: DeepSpeed's ``save_checkpoint`` plus what makes a save safe to resume from.

Layout: ``RUN/checkpoints/step00001000/`` (DeepSpeed's files, any ZeRO stage and
world size) holding ``COMPLETE`` once every rank has finished writing, and
``RUN/checkpoints/latest`` naming the newest complete tag, replaced atomically
after the marker. A save killed half-way leaves a tag without ``COMPLETE``:
``--resume auto`` never picks it, and the next save removes it. The last
``keep_checkpoints`` complete tags are kept.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
PREEMPTED = "PREEMPTED"
"""``RUN/PREEMPTED``: written after a checkpoint taken on a signal, removed when a run starts.
Job scripts read it rather than exit codes, which a launcher may replace (srun with
--kill-on-bad-exit terminates the slower ranks when the first one exits)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with the completion marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def find_resume(ckpt_dir: Path, resume: str) -> tuple[Path, str] | None:
    """(checkpoint dir, tag) to resume from: ``auto`` → the newest complete tag or None;
    ``none`` → None; a path → that tag (it must be complete)."""
    if resume == "none":
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return (ckpt_dir, tags[-1]) if tags else None
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return path.parent, path.name
    tags = complete_tags(path)
    if tags:  # a checkpoints directory: its newest complete tag
        return path, tags[-1]
    raise FileNotFoundError(f"resume={resume!r}: no complete checkpoint there (a tag needs {COMPLETE})")


def save(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    client_state: dict[str, Any],
    keep: int,
    protect: str | None = None,
) -> str:
    """Collective: every rank calls it. Returns the tag. ``protect``: a tag that pruning keeps."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        marker = ckpt_dir / tag / COMPLETE
        marker.write_text(f"{step}\n")
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        prune(ckpt_dir, keep, protect)
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep: int, protect: str | None = None) -> None:
    """Keep the newest ``keep`` complete tags (and ``protect``); remove older ones and unfinished saves."""
    tags = complete_tags(ckpt_dir)
    newest = tags[-1] if tags else None
    for old in tags[:-keep]:
        if old == protect:
            continue
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    for p in ckpt_dir.iterdir():
        if p.is_dir() and not (p / COMPLETE).is_file() and newest and p.name < newest:
            log.warning("removing unfinished checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


def load(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load a complete checkpoint into the engine; returns its client state."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None or client is None:  # DeepSpeed only warns when it finds nothing
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return client


def mark_preempted(run_dir: Path, step: int) -> None:
    """Rank 0, after the signal's checkpoint is complete."""
    tmp = run_dir / f".{PREEMPTED}.tmp"
    tmp.write_text(f"{step}\n")
    os.replace(tmp, run_dir / PREEMPTED)


def clear_preempted(run_dir: Path) -> None:
    """Rank 0, when a run starts."""
    (run_dir / PREEMPTED).unlink(missing_ok=True)
