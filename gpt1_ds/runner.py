"""What pretraining (``gpt1_ds.train``) and fine-tuning (``gpt1_ds.finetune``) share: the
command line, the process's context, the DeepSpeed engine, the run directory, resume, and
the loop itself with its logging, preemption and teardown.

``Loop.run`` is the step loop: ``train_step`` (the subclass's optimiser step) → the ranks
agree on whether to stop (a non-finite loss, a signal) → the window of logged values →
``log_window`` every ``log_interval`` steps → ``after_step`` doing what ``actions`` says the step
calls for (evaluation, samples, checkpoints) → on a signal, exit 75 after the checkpoint. A subclass
builds its data, model and engine into a ``Built`` record (everything that can contradict is checked
before any compute), then ``main`` reads: setup → ``resume`` → ``start`` → ``run`` → ``finish``.

Exit codes: 0 done; 75 preempted (SIGUSR1 or SIGTERM: the steps up to the next log line were
finished and a checkpoint saved; rerun with ``resume=auto`` to continue); 76 hung (no progress for
``stall_timeout`` seconds, or a collective that timed out: nothing saved, ``gpt1_ds.watchdog``);
1 on error (e.g. a NaN/Inf loss, named with its step, or a checkpoint that could not be saved, with
each rank's reason).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from gpt1_ds import checkpoint, distributed, ds_config, ops, watchdog
from gpt1_ds.checkpoint import ClientState, RunDir, dropout_seed
from gpt1_ds.config import (
    Settings,
    settings_help,
)
from gpt1_ds.distributed import PREEMPTED_EXIT
from gpt1_ds.env import (
    REPO,
    check_versions,
    launched_rank,
    printed_to_debug,
    quiet_libraries,
    setup_logging,
)
from gpt1_ds.files import atomic_write_text
from gpt1_ds.loading import model_states
from gpt1_ds.metrics import Monitor
from gpt1_ds.model import GPT, GPTConfig, param_groups
from gpt1_ds.runlock import RunLock
from gpt1_ds.tokenizer import Tokenizer, copy_tokenizer

log = logging.getLogger(__name__)

SETUP_ERROR_EXIT = 2
"""A run refused before its first step (bad config, data, model or checkpoint): the error is logged
on every rank that found it, without a traceback."""
NEVER = 2**62  # "no step": the first bad step's value while every value was finite
T = TypeVar("T")


def parse_launch_args(
    argv: list[str] | None,
    prog: str,
    description: str | None,
    default_ds_config: str,
    config_help: str,
    flags: dict[str, str],
    settings: type | None = None,
) -> tuple[argparse.Namespace, list[str], list[str]]:
    """The command line of train.py and finetune.py: ``--deepspeed_config``, ``--config``, the
    launchers' own flags, ``flags`` (``--name`` → the config's ``name``), then ``key=value``
    (config) and ``ds.key=value`` (DeepSpeed JSON) overrides. Returns (args, config overrides,
    DeepSpeed overrides); a flag given becomes a config override after the others. ``--help``
    lists every field of ``settings`` (the config class) and of the model."""
    epilog = None
    if settings is not None:
        epilog = "\n\n".join(
            (
                settings_help(settings, "settings (key=value; in the --config YAML as key: value):"),
                settings_help(GPTConfig, "model fields (model_overrides.NAME=value):"),
            )
        )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ds_help = f"DeepSpeed JSON (default {default_ds_config})"
    parser.add_argument(
        "--deepspeed_config", "--ds-config", dest="ds_config", default=default_ds_config, help=ds_help
    )
    parser.add_argument("--config", help=config_help)
    for flag, help_text in flags.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=help_text)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value (config) or ds.key=value (DeepSpeed JSON)")
    args = parser.parse_intermixed_args(argv)  # key=value before and after the flags
    if args.ds_config == default_ds_config and not Path(default_ds_config).is_file():
        args.ds_config = str(REPO / default_ds_config)  # run from another directory: the checkout's own
    over = [o for o in args.overrides if not o.startswith("ds.")]
    ds_over = [o[3:] for o in args.overrides if o.startswith("ds.")]
    over += [f"{flag}={json.dumps(getattr(args, flag))}" for flag in flags if getattr(args, flag) is not None]
    return args, over, ds_over


class Preemption:
    """SIGUSR1/SIGTERM set a flag; the loop finishes its step, saves and exits. Installed
    first thing, so that a signal during start-up is honoured after the first step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum


@dataclass(frozen=True)
class Context:
    """This process in the job: its rank, the world size and its device."""

    rank: int
    world: int
    device: torch.device
    node_leader: bool = True
    """The first rank on its host: it builds DeepSpeed's ops while the others wait (``gpt1_ds.ops``)."""

    @classmethod
    def start(cls, collective_timeout: float | None = None) -> Context:
        """Initialise torch.distributed for whichever launcher started the process; a collective
        that waits longer than ``collective_timeout`` seconds fails."""
        rank, world, local_rank = distributed.init(collective_timeout)
        setup_logging(rank, world, tag_rank=True)  # the rank in every line, also in a world of one
        device = distributed.device(local_rank)
        places: list[Any] = [None] * world
        dist.all_gather_object(places, distributed.placement(rank, device))
        log.info("%s", distributed.check_placements(places))  # every rank checks; rank 0 logs
        leader = rank == min(p.rank for p in places if p.host == places[rank].host)
        if "OMP_NUM_THREADS" not in os.environ:  # set by the user or the launcher: theirs
            torch.set_num_threads(distributed.thread_share(places, rank))
            log.info("%d thread(s) per rank (its share of the host's cores)", torch.get_num_threads())
        return cls(rank, world, device, leader)


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a device or host allocation that failed."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )


def memory_advice(e: BaseException, cfg: Settings, ctx: Context) -> str:
    """One line for an allocation that failed: the model, its training state's size, what shrinks it."""
    with torch.device("meta"):
        params = GPT(cfg.model_config()).num_parameters()
    state = 18 * params  # bf16 weights, fp32 master weights and gradients, Adam's two moments
    cause = str(e).strip().splitlines()[0][:200]
    return (
        f"out of memory on {ctx.device} ({cause}): the {cfg.model} model has {params / 1e6:,.1f}M "
        f"parameters, about {state / 2**30:.1f} GiB of weights, gradients and Adam state per rank "
        f"before ZeRO shards them, and micro-batches of {cfg.micro_batch_size}: lower micro_batch_size (or "
        "max_micro_batch_size), set activation_checkpointing=true or loss_chunk_size=1024, shard the state "
        "with ds_configs/zero2.json or zero3.json, or choose a smaller model (model, model_overrides)"
    )


def build_engine(model: torch.nn.Module, ds_cfg: dict[str, Any]) -> tuple[Any, Any]:
    """The DeepSpeed engine and its LR scheduler, with weight decay through parameter groups.

    DeepSpeed's schedulers start at iteration -1 and step after each update, so the
    first two updates would both get lr(0); one step here makes update s (from 0)
    use lr(s): 0 → peak over the warm-up, and lr 0 exactly at the last update.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ops.defer_muon_compile()
    if not (ds_cfg.get("compile") or {}).get("deepcompile"):  # DeepCompile compiles more than the module
        ops.eager_optimizer_methods()
    weight_decay = ds_cfg.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    # DeepSpeed makes GPU LOCAL_RANK current unless told the device: with one GPU bound per task
    # that is not the one to use (``distributed.device_index``).
    cuda = get_accelerator().device_name() == "cuda"
    args = SimpleNamespace(device_rank=torch.cuda.current_device()) if cuda else None
    with printed_to_debug("deepspeed.initialize"):  # its optimizers print memory figures on rank 0
        engine, _, _, scheduler = deepspeed.initialize(
            args=args, model=model, model_parameters=param_groups(model, weight_decay), config=ds_cfg
        )
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", 0) == -1:
        scheduler.step()
    return engine, scheduler


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        gib = (torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30)
        return dict(zip(("memory/allocated_gb", "memory/peak_gb"), gib, strict=True))
    import psutil

    return {"memory/rss_gb": psutil.Process().memory_info().rss / 2**30}


def in_lockstep(batches: Iterable[T], count: int, device: torch.device) -> Iterator[T | None]:
    """``batches`` (``count`` of them on this rank), then None until every rank has had as many
    turns: under ZeRO-3 each forward gathers parameters from all ranks, so every rank must run
    as many forwards (a None turn runs one that counts nothing)."""
    n = torch.tensor([count], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    it = iter(batches)
    for _ in range(int(n.item())):
        yield next(it, None)


def where(ctx: Context) -> str:
    """``cuda, nccl``: the device type and the collective backend, for the start-up line."""
    return f"{ctx.device.type}, {dist.get_backend()}"


def optimizer_name(engine: Any) -> str:
    """The optimiser doing the update under DeepSpeed's wrappers: FusedAdam on CUDA,
    DeepSpeedCPUAdam with offload, torch's AdamW where neither was built."""
    return type(getattr(engine, "basic_optimizer", None) or engine.optimizer).__name__


def seed_dropout(device: torch.device, seed: int) -> None:
    """Seed the generator that draws the dropout masks on ``device``: what ``torch.manual_seed`` does
    for them, without also queueing seeds for every other backend (a stack trace formatted for each:
    128 µs a call on a CPU, against 1 µs)."""
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def injected_nan_gradient(rank: int, step: int) -> bool:
    """For tests: whether ``GPT1_DS_NAN_GRAD=RANK:STEP`` asks for a NaN gradient on this rank in this
    step (the loss itself stays finite: what bf16 without DeepSpeed's overflow check must catch)."""
    spec = os.environ.get("GPT1_DS_NAN_GRAD")
    return bool(spec) and tuple(int(x) for x in spec.split(":")) == (rank, step)


class Window:
    """The steps since the last log line. Each step's logged values and its gradient norm are
    copied into a row of a buffer on the device (no wait for the device); the rows are read only
    when the ranks agree: the first step with a value that is not finite (``first_bad``), and the
    means for the log line (``mean_over_ranks``). Their time is summed on the host."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows, self.device = rows, device
        self.buffer: torch.Tensor | None = None  # [rows, values + 1]: allocated at the first step
        self.first_step, self.steps, self.seconds = 0, 0, 0.0

    def add(self, step: int, values: torch.Tensor, grad_norm: Any, seconds: float) -> None:
        """Step ``step``'s values (a tensor) and gradient norm (a tensor, a float, or None: unwatched)."""
        if self.buffer is None:
            self.buffer = torch.zeros(self.rows, values.numel() + 1, dtype=torch.float64, device=self.device)
        if self.steps == 0:
            self.first_step = step
        row = self.buffer[self.steps]
        row[:-1].copy_(values.detach().reshape(-1), non_blocking=True)
        if torch.is_tensor(grad_norm):
            row[-1].copy_(grad_norm.detach().reshape(()), non_blocking=True)
        else:  # a float DeepSpeed already holds on the host (inf for a step it skipped), or none
            row[-1].fill_(0.0 if grad_norm is None else float(grad_norm))
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds

    def first_bad(self) -> torch.Tensor:
        """The first step (a tensor on the device) whose row holds a NaN or an infinity; ``NEVER``."""
        if not self.steps:
            return torch.full((), NEVER, dtype=torch.int64, device=self.device)
        bad = ~torch.isfinite(self.buffer[: self.steps]).all(dim=1)
        first = self.first_step + bad.to(torch.int64).argmax()
        return torch.where(bad.any(), first, NEVER)

    def row(self, step: int) -> list[float]:
        """Step ``step``'s values and gradient norm, on the host (to report a bad step)."""
        return self.buffer[step - self.first_step].tolist()

    def mean_over_ranks(self, world: int) -> list[float]:
        """The mean of each logged value over the window's steps and every rank (collective)."""
        total = self.buffer[: self.steps, :-1].sum(dim=0)
        dist.all_reduce(total)
        return (total / (world * self.steps)).tolist()

    def reset(self) -> None:
        self.first_step, self.steps, self.seconds = 0, 0, 0.0


@dataclass
class Built:
    """What a loop's subclass builds before the first step, and ``Loop`` runs."""

    engine: Any
    """DeepSpeed's engine, the model and optimiser inside."""
    scheduler: Any
    """Its learning-rate scheduler (None without one)."""
    ds_cfg: dict[str, Any]
    """The resolved DeepSpeed JSON (``deepspeed_config``), as written into the run directory."""
    tok: Tokenizer
    """The tokenizer, copied into the run directory."""
    steps_per_epoch: int
    """Optimiser steps per epoch."""
    state: ClientState
    """The state a checkpoint carries, before any resume."""


class Loop:
    """The step loop of a run (see the module docstring); a subclass builds what it runs
    (``Built``), supplies the step and says which of its actions a step calls for (``actions``)."""

    name = "train"
    prog: str
    """The command (``gpt1_ds.train``), its default DeepSpeed JSON, its ``--config`` help and its
    flags (``--name`` → the config's ``name``)."""
    default_ds_config: str
    config_help: str
    flags: ClassVar[dict[str, str]]
    config_class: type[Settings]

    def __init__(self, cfg: Settings, ctx: Context, built: Built) -> None:
        self.cfg, self.ctx, self.engine, self.scheduler = cfg, ctx, built.engine, built.scheduler
        self.ds_cfg, self.tok, self.state = built.ds_cfg, built.tok, built.state
        self.steps_per_epoch = built.steps_per_epoch
        self.run_dir, self.total_steps = RunDir(cfg.run_dir), cfg.total_steps(self.steps_per_epoch)
        self.accum = self.ds_cfg["gradient_accumulation_steps"]
        self.preempt: Preemption | None = None
        self.monitor = Monitor(None)
        self.window = Window(cfg.log_interval, ctx.device)

    # ---- what a subclass provides ---------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimiser step; the step's logged values [loss, ...] (mean over micro-batches)."""
        raise NotImplementedError

    def log_window(self, means: list[float], step_time: float) -> None:
        raise NotImplementedError

    def actions(self) -> list[str]:
        """What the step just taken calls for (``"validate"``, ``"sample"``, ``"save"``, …): the one
        place a schedule is decided. The loop agrees on its flags before any, so that nothing is
        done, or saved, after a non-finite loss."""
        return []

    def after_step(self, actions: list[str], preempted: bool) -> None:
        """Do ``actions`` after a step (and save when ``preempted``)."""
        raise NotImplementedError

    def check_saved(self, state: ClientState, path: Path) -> None:
        """Refuse a checkpoint this run cannot load (rank 0, before DeepSpeed reads it)."""

    def check_resume(self, state: ClientState, path: Path) -> None:
        """Refuse a checkpoint this run cannot continue (before its state is taken)."""

    def describe(self) -> None:
        """Log what the run will do, once its files are written."""

    def begin(self) -> None:
        """Work before the first step (e.g. a validation pass at step 0)."""

    def report(self, code: int) -> None:
        """Log how the run ended."""

    # ---- shared ---------------------------------------------------------------------------
    @classmethod
    def main(cls, argv: list[str] | None, doc: str | None) -> int:
        """The command: signal handlers first, then the command line, the config, the checked
        set-up (the subclass's ``__init__``) and the run; the exit code."""
        preempt = Preemption()
        quiet_libraries()
        args, over, ds_over = parse_launch_args(
            argv, cls.prog, doc, cls.default_ds_config, cls.config_help, cls.flags, cls.config_class
        )
        lock = None
        try:
            cfg = cls.config_class.from_yaml(args.config, over)
            if launched_rank() == 0:  # the run holds its directory before anything else starts
                lock = RunLock(cfg.run_dir)
                lock.acquire()
            else:
                RunLock(cfg.run_dir).check_free()
        except (ValueError, FileNotFoundError) as e:
            log.error("%s", e)
            return SETUP_ERROR_EXIT
        try:
            return cls._main(cfg, args, ds_over, preempt)
        finally:
            if lock is not None:
                lock.release()

    @classmethod
    def _main(cls, cfg: Settings, args: argparse.Namespace, ds_over: list[str], preempt: Preemption) -> int:
        check_versions(cfg.allow_untested_versions)
        try:
            ctx = Context.start(cfg.collective_timeout)
        except distributed.PortInUse as e:
            log.error("%s", e)
            return SETUP_ERROR_EXIT
        try:
            try:
                raw = ds_config.read(args.ds_config, cfg, ds_over)  # the one read of the JSON
                cfg, raw = ds_config.batch_settings(cfg, raw, args.ds_config, ctx.world, ctx.device)
                loop = cls(cfg, ctx, args.ds_config, raw)
                loop.resume(cfg.resume)
            except (ValueError, FileNotFoundError) as e:  # bad input, found before any step
                log.error("%s", e)
                return SETUP_ERROR_EXIT
            return loop.execute(preempt)
        except Exception as e:
            if out_of_memory(e):
                log.error("%s", memory_advice(e, cfg, ctx))
                return 1
            if not watchdog.timed_out(e):
                raise
            log.error(
                "rank %d: a collective timed out (%s); exiting with %d", ctx.rank, e, watchdog.HUNG_EXIT
            )
            hung = RunDir(Path(cfg.run_dir)).path / watchdog.HUNG
            with contextlib.suppress(OSError):
                hung.write_text(f"rank {ctx.rank}: a collective timed out\n")
            return watchdog.HUNG_EXIT

    def execute(self, preempt: Preemption) -> int:
        """The whole run once set up and resumed: start → the loop → finish; the exit code."""
        self.preempt = preempt
        self.start(self.cfg.to_yaml())
        self.describe()
        marker = self.run_dir.path / watchdog.HUNG
        self.watchdog = watchdog.Watchdog(self.cfg.stall_timeout, self.ctx.rank, marker).start()
        self.begin()
        code = self.run()
        self.watchdog.stop()
        self.report(code)
        return self.finish(code)

    def resume(self, setting: str) -> None:
        """Continue from the checkpoint ``setting`` names (``auto``, ``none``, a path), if any."""
        found = checkpoint.resume(self.engine, self.run_dir.checkpoints, setting, self._check_saved)
        if found is not None:
            saved, path = found
            self.check_resume(saved, path)
            self.state = self.state.resumed_from(saved)
            log.info("resumed from %s at step %d", path, saved.step)

    def _check_saved(self, path: Path) -> None:
        self.check_saved(ClientState.from_dict(model_states(path), path), path)

    def start(self, config_yaml: str) -> None:
        """Write the run's files (rank 0) and open its TensorBoard log. The tokenizer is kept
        with the run, so that its checkpoints are usable on their own."""
        if self.ctx.rank == 0:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            checkpoint.clear_preempted(self.run_dir)
            (self.run_dir.path / watchdog.HUNG).unlink(missing_ok=True)
            atomic_write_text(self.run_dir.config, config_yaml)
            atomic_write_text(self.run_dir.ds_config, json.dumps(self.ds_cfg, indent=2))
            copy_tokenizer(self.tok.path, self.run_dir.path)
        step = self.state.step
        log_dir = str(self.run_dir.tensorboard) if self.ctx.rank == 0 else None
        self.monitor = Monitor(log_dir, purge_step=step + 1 if step else None)

    def micro_steps(
        self, batch: Callable[[int], T], loss: Callable[[T], tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """``accum`` forward/backward passes and the engine's update; dropout seeded per
        micro-batch (``dropout_seed``). ``loss(batch)`` gives the loss and the logged values."""
        total, accum = None, self.accum
        for micro in range(accum):
            b = batch(micro)
            seed_dropout(self.ctx.device, dropout_seed(self.cfg.seed, self.ctx.rank, self.state.step, micro))
            value, logged = loss(b)
            if injected_nan_gradient(self.ctx.rank, self.state.step + 1):
                value.register_hook(lambda grad: grad * float("nan"))
            self.engine.backward(value)
            self.engine.step()
            logged = logged.detach().float() / accum
            total = logged if total is None else total + logged
        return total

    def due(self, interval: int) -> bool:
        return self.state.step % interval == 0 or self.state.step == self.total_steps

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.engine.get_lr()[0]

    def save(self, reason: str, protect: str | None = None) -> str:
        keep = self.cfg.keep_checkpoints
        tag = checkpoint.save(self.engine, self.run_dir.checkpoints, self.state, keep, protect)
        log.info("checkpoint %s (%s)", self.run_dir.checkpoints / tag, reason)
        return tag

    def grad_norm(self) -> Any:
        """The gradient norm of the step just taken, as DeepSpeed holds it (a tensor on the device, or a
        float), for the window's non-finite check; None under fp16, whose loss scaling skips steps that
        overflow by design."""
        if self.ds_cfg.get("fp16", {}).get("enabled"):
            return None
        return self.engine.get_global_grad_norm()

    def _agree_to_stop(self) -> tuple[int | None, bool]:
        """(the first step with a non-finite value on any rank, a signal on any rank): every
        rank stops at the same step. The one point of the loop where the host waits for the device."""
        mine = self.window.first_bad()
        signal = -float(self.preempt.signal is not None)
        flags = torch.stack(
            [mine.to(torch.float64), torch.tensor(signal, dtype=torch.float64).to(mine.device)]
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        bad, preempted = (int(x) for x in flags.tolist())
        if bad < NEVER and int(mine) == bad:
            *values, norm = self.window.row(bad)
            log.error("step %d: loss %s, gradient norm %s on rank %d", bad, values[0], norm, self.ctx.rank)
        return (bad if bad < NEVER else None), preempted < 0

    def run(self) -> int:
        """Steps until ``total_steps``, a signal (75) or a non-finite loss (1). Between log lines
        and ``after_step``'s work, nothing reads from the device: the flags (a signal, a non-finite
        value, remembered with its step) are agreed on every ``log_interval`` steps and before
        any evaluation or checkpoint, so a signal is honoured within ``log_interval`` steps."""
        opts = dict(desc=self.name, unit="step", disable=self.ctx.rank != 0, dynamic_ncols=True, leave=False)
        bar = tqdm(total=self.total_steps, initial=self.state.step, **opts)
        code, first_step = 0, self.state.step
        while self.state.step < self.total_steps:
            self.watchdog.beat(f"step {self.state.step + 1}")
            start = time.perf_counter()
            watchdog.injected_stall(self.ctx.rank, self.state.step + 1, first_step)
            values = self.train_step()
            self.state.step += 1
            self.window.add(self.state.step, values, self.grad_norm(), time.perf_counter() - start)
            bar.update(1)
            actions = self.actions()
            if not (self.due(self.cfg.log_interval) or actions):
                continue  # the same steps on every rank: the agreement below is a collective
            start = time.perf_counter()
            bad, preempted = self._agree_to_stop()
            self.window.seconds += time.perf_counter() - start  # the device's queue, drained
            if bad is not None:
                last = (checkpoint.complete_tags(self.run_dir.checkpoints) or ["no checkpoint"])[-1]
                if self.ctx.rank == 0:
                    log.error("step %d: a non-finite loss or gradient; stopping (resume from %s)", bad, last)
                code = 1
                break
            if self.due(self.cfg.log_interval):
                self.log_window(
                    self.window.mean_over_ranks(self.ctx.world), self.window.seconds / self.window.steps
                )
                self.window.reset()
            self.watchdog.beat(f"evaluation, samples or checkpoint after step {self.state.step}")
            try:
                self.after_step(actions, preempted)
            except checkpoint.SaveFailed as e:  # raised on every rank alike
                if self.ctx.rank == 0:
                    log.error("step %d: %s", self.state.step, e)
                code = 1
                break
            self.monitor.flush()
            if not preempted:  # the preflight's round trip holds one step for its USR1
                signalled = lambda: self.preempt.signal is not None  # noqa: E731
                watchdog.hold_for_signal(self.state.step, first_step, signalled, self.watchdog.beat)
            if preempted:
                if self.ctx.rank == 0:
                    checkpoint.mark_preempted(self.run_dir, self.state.step)
                code = PREEMPTED_EXIT
                break
        bar.close()
        self.monitor.close()
        return code

    def finish(self, code: int) -> int:
        """Say how the run ended, leave the process group; returns the exit code."""
        if code == PREEMPTED_EXIT:
            step = self.state.step
            log.warning("preempted at step %d: checkpoint saved, exiting with %d", step, PREEMPTED_EXIT)
        dist.barrier()
        dist.destroy_process_group()
        return code
