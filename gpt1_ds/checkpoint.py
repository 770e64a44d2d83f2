"""Checkpoints: DeepSpeed's ``save_checkpoint`` plus what makes a save safe to resume from,
the typed client state that every gpt1-ds checkpoint carries, and the run directory.

Layout (``RunDir``): ``RUN/checkpoints/step00001000/`` (DeepSpeed's files, any ZeRO stage
and world size) holding ``COMPLETE`` once every rank has finished writing, and
``RUN/checkpoints/latest`` naming the newest complete tag, replaced atomically after the
marker. A save killed half-way leaves a tag without ``COMPLETE``: ``resume=auto`` never
picks it, and the next save removes it. A save that fails (a full disk, an I/O error) on any
rank fails on every rank with ``SaveFailed``, which names each rank's error and the space left;
its partial tag is removed, and the last complete checkpoint and ``latest`` stay as they were.
The last ``keep_checkpoints`` complete tags are kept.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from gpt1_ds.files import atomic_write_text
from gpt1_ds.runlock import LOCK_NAME

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = "universal"
"""``TAG/universal``: the tag converted for another world size (``universal``), kept with it."""
PREEMPTED = "PREEMPTED"
"""``RUN/PREEMPTED``: written after a checkpoint taken on a signal, removed when a run starts.
Job scripts read it rather than exit codes, which a launcher may replace (srun with
--kill-on-bad-exit terminates the slower ranks when the first one exits)."""
FORMAT_VERSION = 1
"""Version of ``ClientState``. 0: checkpoints written before it had one (read as well)."""
DROPOUT_SCHEME = "dropout_seed(seed, rank, step, micro)"
PROGRESS = ("step", "tokens_seen", "val_ppl", "loader", "history", "best")
"""The ``ClientState`` fields that a resume takes from the checkpoint; the others come from the run."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: incomplete, corrupted, inconsistent or too new."""


class SaveFailed(RuntimeError):
    """A save that did not complete on every rank (raised on every rank)."""


def dropout_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The RNG seed of one micro-batch: dropout is a function of (seed, rank, step), so a
    resumed run draws the same masks as the uninterrupted one without saving RNG states."""
    return (((seed * 1_000_003 + rank) * 1_000_003 + step) * 1024 + micro) % (2**63)


class RunDir:
    """The files of one training or fine-tuning run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.tensorboard = self.path / "tensorboard"
        self.config = self.path / "config.yaml"
        self.ds_config = self.path / "ds_config.json"
        self.preempted = self.path / PREEMPTED

    @classmethod
    def of_checkpoints(cls, ckpt_dir: Path) -> RunDir:
        return cls(Path(ckpt_dir).parent)


@dataclass
class ClientState:
    """What a checkpoint holds beside DeepSpeed's state: written by ``gpt1_ds.train`` and
    ``gpt1_ds.finetune``, read by their resume and by ``gpt1_ds.loading``."""

    kind: str = "pretrain"
    """``pretrain`` or ``finetune``."""
    step: int = 0
    """Optimiser steps done."""
    seed: int = 0
    """The run's seed (dropout masks follow ``DROPOUT_SCHEME``)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The run's settings (``RunConfig`` or ``FinetuneConfig`` as a mapping)."""
    model_config: dict[str, Any] | None = None
    """``GPTConfig.to_dict()`` of the model."""
    tokens_seen: int = 0
    """Pretraining: tokens trained on."""
    val_ppl: float | None = None
    """Pretraining: the last validation perplexity."""
    loader: dict[str, Any] | None = None
    """Pretraining: ``TrainLoader.state_dict()``, for an exact resume."""
    task: dict[str, Any] | None = None
    """Fine-tuning: ``kind``, ``labels`` and ``num_outputs`` of the task head."""
    layout: dict[str, Any] | None = None
    """Fine-tuning: world size, batch layout and examples; a resume must have the same."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Fine-tuning: the dev metrics of every epoch."""
    best: dict[str, Any] | None = None
    """Fine-tuning: the best epoch's metrics and tag."""

    def resumed_from(self, saved: ClientState) -> ClientState:
        """This run's state (its settings, seed, model and task) with the progress of ``saved``."""
        return replace(self, **{k: getattr(saved, k) for k in PROGRESS})

    def to_dict(self) -> dict[str, Any]:
        """The mapping handed to DeepSpeed (the layout of format 0, plus version and kind)."""
        config: dict[str, Any] = {"run" if self.kind == "pretrain" else "finetune": self.config}
        config["model_config"] = self.model_config
        if self.task is not None:
            config["task"] = self.task
        out = {k: v for k, v in vars(self).items() if k not in ("config", "model_config", "task", "seed")}
        rng = {"scheme": DROPOUT_SCHEME, "seed": self.seed}
        return {"format_version": FORMAT_VERSION, **out, "rng": rng, "config": config}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path) -> ClientState:
        """From a checkpoint's client state, of this format or an older one (format 0 has no
        ``format_version`` and no ``kind``: a fine-tuning run's config is under ``finetune``)."""
        version = data.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: client state format {version}; this code reads up to {FORMAT_VERSION}"
            )
        scheme = (data.get("rng") or {}).get("scheme", DROPOUT_SCHEME)
        if scheme != DROPOUT_SCHEME:
            raise CheckpointError(f"{where}: dropout scheme {scheme!r}, this code draws {DROPOUT_SCHEME!r}")
        config = data.get("config") or {}
        kind = data.get("kind") or ("finetune" if "finetune" in config else "pretrain")
        settings = config.get("run" if kind == "pretrain" else "finetune") or {}
        seed, task = (data.get("rng") or {}).get("seed", 0), config.get("task")
        progress = {k: data[k] for k in (*PROGRESS, "layout") if k in data}
        return cls(
            kind, seed=seed, config=settings, model_config=config.get("model_config"), task=task, **progress
        )


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with the completion marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


PREVIOUS = "previous-"
"""``RUN/previous-N/``: what ``resume=new`` moved aside, the N-th time."""


def move_aside(run_dir: RunDir) -> Path | None:
    """Rank 0, for ``resume=new``: everything in the run directory but earlier ``previous-N``
    folders into the next ``previous-N``; returns it (None: nothing to move)."""
    if not run_dir.path.is_dir():
        return None
    held = (LOCK_NAME, f".{LOCK_NAME}")  # the run's hold on the directory stays with it
    entries = [p for p in run_dir.path.iterdir() if not p.name.startswith((PREVIOUS, *held))]
    if not entries:
        return None
    numbers = [p.name[len(PREVIOUS) :] for p in run_dir.path.glob(PREVIOUS + "*")]
    aside = run_dir.path / f"{PREVIOUS}{1 + max((int(n) for n in numbers if n.isdigit()), default=0)}"
    aside.mkdir()
    for p in entries:
        p.rename(aside / p.name)
    return aside


def find_resume(ckpt_dir: Path, resume: str) -> tuple[Path, str] | None:
    """(checkpoint dir, tag) to resume from: ``auto`` → the newest complete tag or None;
    ``none`` → None; ``new`` → None (the old run was moved aside); a path → that tag (it must be
    complete). ``none`` or a path elsewhere is refused where ``ckpt_dir`` holds checkpoints of
    its own: a run never mixes with another's (its pruning would take theirs, or theirs its own)."""
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return (ckpt_dir, tags[-1]) if tags else None
    found = None
    if resume not in ("none", "new"):
        path = Path(resume)
        if (path / COMPLETE).is_file():
            found = path.parent, path.name
        elif tags := complete_tags(path):  # a checkpoints directory: its newest complete tag
            found = path, tags[-1]
        else:
            raise FileNotFoundError(
                f"resume={resume!r}: no complete checkpoint there (a tag needs {COMPLETE})"
            )
    mine = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
    if mine and resume != "new" and (found is None or found[0].resolve() != ckpt_dir.resolve()):
        shown = mine[0] if len(mine) == 1 else f"{mine[0]} … {mine[-1]}"
        raise ValueError(
            f"{ckpt_dir} holds another run's checkpoints ({shown}), which resume={resume} would mix with "
            "this run's: resume=auto continues that run, resume=new moves it aside into "
            f"{ckpt_dir.parent / PREVIOUS}N/ and starts afresh, or name another run directory"
        )
    return found


def save(engine: Any, ckpt_dir: Path, state: ClientState, keep: int, protect: str | None = None) -> str:
    """Collective: every rank calls it. Returns the tag. ``protect``: a tag that pruning keeps.
    Raises ``SaveFailed`` on every rank if any rank failed, with the partial tag removed."""
    tag = tag_for(state.step)
    first = dist.get_rank() == 0
    _agree(_attempt(_prepare, ckpt_dir, tag) if first else None, ckpt_dir, tag)
    error = _attempt(engine.save_checkpoint, str(ckpt_dir), tag, state.to_dict(), False)
    if error is not None:
        dist.barrier()  # DeepSpeed's save ends in a barrier, where the ranks it did not fail on wait
    _agree(error, ckpt_dir, tag)  # every rank's files are on disk
    _agree(_attempt(_commit, ckpt_dir, tag, state.step) if first else None, ckpt_dir, tag)
    if first:
        prune(ckpt_dir, keep, protect)
    dist.barrier()
    return tag


def _prepare(ckpt_dir: Path, tag: str) -> None:
    """Rank 0: the directory, without what a save of the same step that was cut short left."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if (ckpt_dir / tag).is_dir() and not (ckpt_dir / tag / COMPLETE).is_file():
        shutil.rmtree(ckpt_dir / tag)


def _commit(ckpt_dir: Path, tag: str, step: int) -> None:
    """Rank 0, once every rank's files are on disk: the marker, then ``latest``."""
    atomic_write_text(ckpt_dir / tag / COMPLETE, f"{step}\n")
    atomic_write_text(ckpt_dir / LATEST, tag)


def _attempt(fn: Any, *args: Any) -> str | None:
    """Run ``fn``; its failure as text (a full disk surfaces as OSError, or as torch.save's RuntimeError)."""
    try:
        fn(*args)
    except (OSError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _agree(error: str | None, ckpt_dir: Path, tag: str) -> None:
    """Collective: if any rank's ``error`` is set, remove the partial tag and raise on every rank."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = {rank: e for rank, e in enumerate(errors) if e is not None}
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    raise SaveFailed(_failure(failed, ckpt_dir, tag))


def _failure(failed: dict[int, str], ckpt_dir: Path, tag: str) -> str:
    """What went wrong, how much space is left, and what a resume will find."""
    reasons = "; ".join(f"rank {rank}: {e}" for rank, e in failed.items())
    tags = complete_tags(ckpt_dir)
    try:
        free = shutil.disk_usage(ckpt_dir).free
        space = f"{free / 1e6:,.1f} MB free on its file system"
        if tags:
            need = sum(f.stat().st_size for f in (ckpt_dir / tags[-1]).rglob("*") if f.is_file())
            if need > free:
                space += f", less than a checkpoint takes ({need / 1e6:,.1f} MB): the disk is full"
    except OSError:
        space = "its free space unknown"
    last = (
        f"the last complete checkpoint, {ckpt_dir / tags[-1]}, is intact: resume=auto continues from it"
        if tags
        else "there is no complete checkpoint yet"
    )
    return (
        f"checkpoint {ckpt_dir / tag} could not be saved ({reasons}); {space}. "
        f"The partial save was removed; {last}."
    )


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


def saved_world_size(path: Path) -> int | None:
    """The data-parallel world size that wrote a checkpoint: its number of ZeRO (or bf16 optimiser)
    partitions; None when the optimiser state is not partitioned (stage 0 in fp32)."""
    return len(list(path.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def universal(ckpt_dir: Path, tag: str) -> Path:
    """Collective: the checkpoint in DeepSpeed's universal format (``ds_to_universal``: each
    parameter's fp32 weights and Adam moments whole, for any world size), converted once by rank 0
    into ``TAG/universal`` (written aside, then renamed) while the others wait."""
    out = ckpt_dir / tag / UNIVERSAL
    error = None
    if dist.get_rank() == 0 and not (out / COMPLETE).is_file():
        error = _attempt(_convert, ckpt_dir / tag, out)
    errors: list[str | None] = [error]
    dist.broadcast_object_list(errors)
    if errors[0] is not None:
        raise CheckpointError(f"{ckpt_dir / tag}: cannot convert it for another world size: {errors[0]}")
    return out


def _convert(path: Path, out: Path) -> None:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(8, (os.cpu_count() or 1) // 2)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path)]
    cmd += ["--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers]
    done = subprocess.run([*cmd, "--inject_missing_state"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ds_to_universal exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    atomic_write_text(tmp / COMPLETE, path.name + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def load(engine: Any, ckpt_dir: Path, tag: str) -> ClientState:
    """Load a complete checkpoint into the engine; returns its client state. One written by another
    data-parallel world size (ZeRO partitions its optimiser state by rank) is loaded through
    DeepSpeed's universal format (``universal``), so that a run can go on with fewer or more ranks."""
    saved = saved_world_size(ckpt_dir / tag)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved is None or saved == world:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    else:
        converted = universal(ckpt_dir, tag)
        log.info("%s: written by %d ranks, loaded by %d through %s", ckpt_dir / tag, saved, world, converted)
        config = engine._config  # DeepSpeed reads the universal switch from its config at load time
        config.load_universal_checkpoint = True
        try:
            path, client = engine.load_checkpoint(str(converted.parent), tag=converted.name)
        finally:
            config.load_universal_checkpoint = False
    if path is None or client is None:  # DeepSpeed only warns when it finds nothing
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    return ClientState.from_dict(client, ckpt_dir / tag)


def resume(
    engine: Any, ckpt_dir: Path, setting: str, check: Callable[[Path], None] | None = None
) -> tuple[ClientState, Path] | None:
    """Collective: rank 0 finds the checkpoint that ``setting`` names (``find_resume``; ``new``
    moves the run directory's contents aside first) and passes it to ``check``; an error of
    either is raised on every rank as a ValueError, before any of them loads; every rank loads
    it. Returns its client state and path, or None to start afresh."""
    found: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            if setting == "new" and (aside := move_aside(RunDir.of_checkpoints(ckpt_dir))):
                log.warning("resume=new: the run directory's earlier contents moved into %s", aside)
            found[0] = find_resume(ckpt_dir, setting)
            if found[0] is not None and check is not None:
                check(found[0][0] / found[0][1])
        except (ValueError, FileNotFoundError) as e:  # every rank refuses, none waits for rank 0
            found[1] = str(e)
    dist.broadcast_object_list(found)
    if found[1] is not None:
        raise ValueError(found[1])
    if found[0] is None:
        return None
    return load(engine, *found[0]), found[0][0] / found[0][1]


def mark_preempted(run_dir: RunDir, step: int) -> None:
    """Rank 0, after the signal's checkpoint is complete."""
    atomic_write_text(run_dir.preempted, f"{step}\n")


def clear_preempted(run_dir: RunDir) -> None:
    """Rank 0, when a run starts."""
    run_dir.preempted.unlink(missing_ok=True)
