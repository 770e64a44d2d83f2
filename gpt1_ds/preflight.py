"""A cluster's preflight: what CI cannot check, checked in a few minutes on the user's own nodes.

``slurm/preflight.sh`` (``slurm/preflight_cpu.sh`` on CPUs) runs three commands:

    srun python -m gpt1_ds.preflight check --config C --deepspeed_config D --data DIR --run-dir R
    python -m gpt1_ds.preflight wait --run-dir R --step K      # then scancel -b --signal=USR1 JOB
    python -m gpt1_ds.preflight report --run-dir R --steps N --restarts M

``check`` runs on every task of the allocation: versions (the same on every rank, and tested), the
GPU each rank uses and its binding, the dataset and the run directory from every node, all-reduce
bandwidth (the world, within each node, between nodes) against the expected order of magnitude,
and DeepSpeed's op build. Between ``check`` and ``report`` the script trains N steps, sends itself
USR1 once step K is logged (checkpoint → requeue → resume), and trains to the end. ``report`` adds
the training (loss, tokens/s, ms per step, MFU) and the round trip, and prints one verdict table,
also written to ``R/preflight/verdict.md`` and ``verdict.json``; it exits 1 if any row fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import socket
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpt1_ds.env import TESTED, setup_logging, untested_versions
from gpt1_ds.runlock import Holder, RunLock

# Modules that import torch (DeepSpeed, matplotlib) are imported where a check needs them:
# ``wait`` and ``report`` run on a login node without loading torch, and a check whose import
# fails becomes a FAIL row of the table rather than a traceback.

PASS, WARN, FAIL, INFO, SKIP = "PASS", "WARN", "FAIL", "INFO", "SKIP"
CHECKS, VERDICT_MD, VERDICT_JSON = "checks.json", "verdict.md", "verdict.json"
CHECKPOINT_BYTES_PER_PARAM = 14
"""A checkpoint's size per parameter under mixed precision: bf16 weights (2) and fp32 master weights
and Adam moments (12); gpt1's measured 1.63 GB for 116.5M parameters (docs/SCALING.md)."""

EXPECTED_GBPS = {"intra-node": (100.0, 10.0), "inter-node": (20.0, 2.0)}
"""NCCL bus bandwidth (GB/s) of a large all-reduce: (PASS from, WARN from; FAIL below).
Within a node: NVLink gives hundreds, PCIe 10-25; between nodes: InfiniBand or RoCE gives
tens per node, TCP over Ethernet a few. CPU collectives (gloo) are shown, not judged."""

log = logging.getLogger("gpt1_ds.preflight")


@dataclass
class Row:
    """One line of the verdict table."""

    check: str
    verdict: str
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    width = max(len(r.check) for r in rows)
    lines = [f"| {'check':<{width}} | verdict | detail |", f"|{'-' * (width + 2)}|---------|--------|"]
    lines += [f"| {r.check:<{width}} | {r.verdict:<7} | {r.detail} |" for r in rows]
    return "\n".join(lines)


def size(nbytes: float) -> str:
    """``1.9 GB``, ``524.3 kB``: decimal units, three significant figures or more."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:.0f} B"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def worst(verdicts: list[str]) -> str:
    order = [SKIP, INFO, PASS, WARN, FAIL]
    return max(verdicts, key=order.index, default=PASS)


# ---- check: on every rank ---------------------------------------------------------------------


def bus_bandwidth(nbytes: int, seconds: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce (bytes/s): each byte crosses 2(n-1)/n links."""
    return nbytes * 2 * (ranks - 1) / ranks / seconds


def judge_bandwidth(scope: str, gbps: float, backend: str) -> str:
    if backend != "nccl":
        return INFO
    good, poor = EXPECTED_GBPS[scope]
    return PASS if gbps >= good else WARN if gbps >= poor else FAIL


def time_allreduce(numel: int, dtype: Any, device: Any, group: Any, iters: int) -> float:
    """Seconds per all-reduce of ``numel`` elements within ``group`` (two untimed first)."""
    import torch
    import torch.distributed as dist

    buf = torch.ones(numel, dtype=dtype, device=device)
    for _ in range(2):
        dist.all_reduce(buf, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


class Checker:
    """The checks of ``check``, each returning one row (rank 0's is the one kept)."""

    def __init__(self, args: argparse.Namespace, over: list[str], ds_over: list[str]) -> None:
        import torch

        from gpt1_ds import ds_config
        from gpt1_ds.config import RunConfig
        from gpt1_ds.runner import Context

        self.cfg = RunConfig.from_yaml(args.config, over)
        self.ds_raw = ds_config.read(args.ds_config, self.cfg, ds_over)
        self.ctx = Context.start(self.cfg.collective_timeout)  # a binding that cannot work fails here
        self.args, self.torch = args, torch
        self.gather([None])  # every rank is up before any check is timed

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.ctx.world
        self.torch.distributed.all_gather_object(out, value)
        return out

    def attempt(self, fn: Any) -> tuple[Any, str | None]:
        """(fn's value, None) or (None, why it failed on this rank)."""
        try:
            return fn(), None
        except Exception as e:
            return None, f"{type(e).__name__}: {str(e).strip()[:300]}"

    def failures(self, errors: list[str | None], places: list[tuple[str, str]]) -> str:
        bad = [(r, e) for r, e in enumerate(errors) if e]
        (rank, error), more = bad[0], f" (and {len(bad) - 1} more ranks)" if len(bad) > 1 else ""
        return f"rank {rank} on {places[rank][0]}: {error}{more}"

    def versions(self) -> Row:
        import deepspeed

        torch = self.torch
        mine = {"torch": torch.__version__, "deepspeed": deepspeed.__version__}
        extra = {"python": sys.version.split()[0], "cuda": torch.version.cuda or "none"}
        if self.ctx.device.type == "cuda":
            extra["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        everyone = self.gather({**mine, **extra})
        differ = sorted({k for v in everyone for k in v if v[k] != everyone[0][k]})
        shown = ", ".join(f"{k} {v}" for k, v in everyone[0].items())
        if differ:
            ranks = [r for r, v in enumerate(everyone) if any(v[k] != everyone[0][k] for k in differ)]
            return Row(
                "versions",
                FAIL,
                f"{', '.join(differ)} differ between ranks (rank 0: {shown}; "
                f"other on ranks {ranks[:8]}): install one environment on every node",
                everyone[0],
            )
        untested = untested_versions(mine)
        if untested:
            tested = " with ".join(f"{k} {v}" for k, v in TESTED.items())
            return Row("versions", WARN, f"{shown}; {', '.join(untested)} untested (tested: {tested})", mine)
        return Row("versions", PASS, f"{shown}, the same on every rank (tested)", everyone[0])

    def binding(self) -> list[tuple[str, str]]:
        """Every rank's (host, device), after the placement checks of ``Context.start``."""
        torch, dev = self.torch, self.ctx.device
        gpu = ""
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            gpu = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all") if dev.type == "cuda" else ""
        self.places = self.gather((socket.gethostname(), str(dev), gpu, visible))
        return [(p[0], p[1]) for p in self.places]

    def binding_row(self) -> Row:
        hosts = sorted({p[0] for p in self.places})
        per_host = self.ctx.world // len(hosts)
        kinds = sorted({p[2] for p in self.places if p[2]})
        what = f"each on its own GPU ({'; '.join(kinds)})" if kinds else f"on {self.places[0][1]}"
        example = ", ".join(
            f"{r}→{p[0]}:{p[1]}" + (f" (CUDA_VISIBLE_DEVICES {p[3]})" if p[3] else "")
            for r, p in enumerate(self.places[:4])
        )
        return Row(
            "GPUs and binding",
            PASS,
            f"{plural(self.ctx.world, 'rank')} on {plural(len(hosts), 'host')} (~{per_host} per host), "
            f"{what}: {example}" + (" …" if self.ctx.world > 4 else ""),
            {"ranks": self.ctx.world, "hosts": len(hosts)},
        )

    def data(self, where: list[tuple[str, str]]) -> Row:
        """The dataset from every rank: tokenizer, both manifests, one member of a shard each."""
        from gpt1_ds.data import ShardError, open_dataset, read_shard
        from gpt1_ds.tokenizer import MODEL_NAME, load_tokenizer

        root = Path(self.cfg.data)

        def read() -> int:
            tok = load_tokenizer(root / MODEL_NAME)
            model = self.cfg.model_config()
            train, val = (
                open_dataset(root / split, tok.sha256, model.vocab_size, model.n_positions)
                for split in ("train", "val")
            )
            shard = train.shards[self.ctx.rank % len(train.shards)]
            try:
                next(read_shard(shard, train))  # its first member, checksum and ids checked
            except ShardError as e:
                raise ShardError(f"shard {shard.url}: {e}") from None
            return len(train.shards) + len(val.shards)

        shards, error = self.attempt(read)
        errors = self.gather(error)
        if any(errors):
            return Row("dataset", FAIL, f"{root}: {self.failures(errors, where)}")
        hosts = len({h for h, _ in where})
        return Row(
            "dataset",
            PASS,
            f"{root}: tokenizer, manifests and a shard member (checksums) read by all "
            f"{plural(self.ctx.world, 'rank')} on {plural(hosts, 'host')} ({shards} shards)",
        )

    def run_dir(self, where: list[tuple[str, str]]) -> Row:
        """One file system for the run directory: what rank 0 writes, every rank reads, and each
        rank can write there too (every rank writes its part of a checkpoint)."""
        probe = Path(self.cfg.run_dir) / "preflight"
        nonce = uuid.uuid4().hex if self.ctx.rank == 0 else None
        if self.ctx.rank == 0:
            probe.mkdir(parents=True, exist_ok=True)
            (probe / "probe").write_text(nonce)
        nonce = self.gather(nonce)[0]

        def read_write() -> None:
            seen = (probe / "probe").read_text()
            if seen != nonce:
                raise RuntimeError(f"{probe / 'probe'} holds another run's file: not the same file system")
            mine = probe / f"probe-{self.ctx.rank}"
            mine.write_text(nonce)
            mine.unlink()

        _, error = self.attempt(read_write)
        errors = self.gather(error)
        if any(errors):
            return Row(
                "run directory",
                FAIL,
                f"{probe.parent}: {self.failures(errors, where)}; every rank "
                "writes its part of each checkpoint there: use a file system all nodes share",
            )
        if busy := self.gather(self.held_by() if self.ctx.rank == 0 else None)[0]:
            return Row("run directory", FAIL, busy)
        one = CHECKPOINT_BYTES_PER_PARAM * self.num_parameters()
        keep = self.cfg.keep_checkpoints
        need, free = one * (keep + 1), shutil.disk_usage(probe).free
        detail = (
            f"{probe.parent}: one file system for all ranks; {size(free)} free, {keep} + 1 checkpoints "
            f"(keep_checkpoints and the one being saved) of ≈{size(one)} need {size(need)}"
        )
        verdict = PASS if free >= need else WARN
        return Row("run directory", verdict, detail, {"free_bytes": free, "need_bytes": need})

    def held_by(self) -> str | None:
        """Who holds the run directory, if a run that is alive does (``gpt1_ds.runlock``)."""
        lock, now = RunLock(self.cfg.run_dir), time.time()
        holder = lock.read()
        if holder is None or holder.gone(Holder.me(now), now):
            return None
        return f"{lock.path.parent} is held by another run ({holder.describe(now)}): a run now is refused"

    def num_parameters(self) -> int:
        import torch

        from gpt1_ds.model import GPT

        with torch.device("meta"):  # shapes only
            return GPT(self.cfg.model_config()).num_parameters()

    def bandwidth(self, where: list[tuple[str, str]]) -> list[Row]:
        """All-reduce of the model's gradients over the world, within each node and between nodes."""
        torch, dist = self.torch, self.torch.distributed
        from gpt1_ds.ds_config import precision

        kind = precision(self.ds_raw)  # DeepSpeed reduces gradients in the training precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(kind, torch.float32)
        numel = self.num_parameters()
        nbytes = numel * dtype.itemsize
        backend = dist.get_backend()
        hosts: dict[str, list[int]] = {}
        for rank, (host, _) in enumerate(where):
            hosts.setdefault(host, []).append(rank)
        scopes = [("intra-node", ranks) for ranks in hosts.values()]
        if len(hosts) > 1:  # with one host the world is the node
            scopes.append(("world", list(range(self.ctx.world))))
            scopes.append(("inter-node", [ranks[0] for ranks in hosts.values()]))
        rows, times = [], {}
        for scope, ranks in scopes:
            group = dist.new_group(ranks) if len(ranks) < self.ctx.world else None  # every rank calls it
            if len(ranks) > 1 and self.ctx.rank in ranks:
                times[(scope, ranks[0])] = time_allreduce(
                    numel, dtype, self.ctx.device, group, self.args.iters
                )
        measured = [t for gathered in self.gather(times) for t in gathered.items()]
        for scope in ("world", "intra-node", "inter-node"):
            found: dict[int, float] = {}
            for (s, first), t in measured:
                if s == scope:
                    found[first] = max(found.get(first, 0.0), t)  # the slowest member is the op's time
            if not found:
                continue
            members = {r[0]: len(r) for s, r in scopes if s == scope}
            gbps = {first: bus_bandwidth(nbytes, t, members[first]) / 1e9 for first, t in found.items()}
            first = min(gbps, key=gbps.get)  # the slowest node or group
            verdict = INFO if scope == "world" else judge_bandwidth(scope, gbps[first], backend)
            of = f"the slowest of {len(gbps)} nodes, " if len(gbps) > 1 else ""
            detail = (
                f"{backend}, {members[first]} ranks ({of}from rank {first}): {size(nbytes)} (the gradients, "
                f"{kind}) in {1000 * found[first]:.2f} ms, bus {gbps[first]:,.1f} GB/s"
            )
            if verdict != INFO and verdict != PASS:
                good, _ = EXPECTED_GBPS[scope]
                detail += f"; expected ≥ {good:.0f} GB/s (NCCL_DEBUG=INFO shows the transport NCCL chose)"
            rows.append(
                Row(
                    f"all-reduce {scope}",
                    verdict,
                    detail,
                    {"ms": 1000 * found[first], "bus_gbps": gbps[first], "bytes": nbytes},
                )
            )
        return rows

    def ops(self, where: list[tuple[str, str]]) -> Row:
        from gpt1_ds import ops

        names = ops.needed(self.ds_raw, self.ctx.device.type)
        if not names:
            return Row("DeepSpeed ops", PASS, f"none needed on {self.ctx.device.type} with this optimizer")
        start = time.perf_counter()
        failed = ops.build_once(names, self.ctx.node_leader, self.ctx.device)
        seconds = max(self.gather(time.perf_counter() - start))
        leaders = sum(self.gather(self.ctx.node_leader))
        if any(failed.values()):
            why = "; ".join(f"{k}: {v}" for k, v in failed.items() if v)
            fatal = bool(failed.get("cpu_adam"))
            fallback = "" if fatal else " (training falls back to torch.optim.AdamW(fused=True))"
            return Row("DeepSpeed ops", FAIL if fatal else WARN, f"{why}{fallback}")
        return Row(
            "DeepSpeed ops",
            PASS,
            f"{', '.join(names)} loaded on every rank in {seconds:.1f} s "
            f"(built at most once per node, {leaders} node leaders)",
            {"seconds": seconds},
        )

    def run(self) -> list[Row]:
        rows = [self.versions()]
        where = self.binding()
        rows.append(self.binding_row())
        rows.append(self.data(where))
        rows.append(self.run_dir(where))
        rows += self.bandwidth(where)
        rows.append(self.ops(where))
        return rows


def check(argv: list[str]) -> int:
    from gpt1_ds.runner import parse_launch_args
    from gpt1_ds.train import Pretraining

    args, over, ds_over = parse_launch_args(
        argv,
        "gpt1_ds.preflight check",
        None,
        Pretraining.default_ds_config,
        "run config YAML",
        {"data": "dataset directory", "run_dir": "run directory"},
        Pretraining.config_class,
    )
    args.iters = int(os.environ.get("GPT1_DS_PREFLIGHT_ITERS", "10"))
    checker = Checker(args, over, ds_over)
    rows = checker.run()
    if checker.ctx.rank == 0:
        out = Path(checker.cfg.run_dir) / "preflight" / CHECKS
        out.write_text(json.dumps([asdict(r) for r in rows], indent=2))
        log.info("preflight checks:\n%s", table(rows))
    checker.torch.distributed.barrier()
    checker.torch.distributed.destroy_process_group()
    return 1 if worst([r.verdict for r in rows]) == FAIL else 0


# ---- wait and report: one process -------------------------------------------------------------


def wait(run_dir: Path, step: int, timeout: float) -> int:
    """Until the run has logged step ``step`` or later; 1 after ``timeout`` seconds."""
    from gpt1_ds.plot import scalar_events

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            losses = scalar_events(run_dir).get("train/loss", [])
        except Exception:  # no event file yet
            losses = []
        if losses and losses[-1].step >= step:
            at = losses[-1].step
            note = {"usr1_after_step": at, "usr1_time": time.time()}
            (run_dir / "preflight" / "usr1.json").write_text(json.dumps(note))
            log.info("step %d logged: sending USR1", at)
            return 0
        time.sleep(1)
    log.error("the run did not log step %d within %.0f s", step, timeout)
    return 1


def training_row(events: dict[str, list[Any]], steps: int, log_every: int, resumed: int | None) -> Row:
    """Loss, tokens/s, ms per step and MFU over the logged windows (the first of each attempt,
    which holds start-up work, left out of the speed figures)."""
    losses = {e.step: e.value for e in events.get("train/loss", [])}
    expected = list(range(log_every, steps + 1, log_every))
    if steps % log_every:
        expected.append(steps)
    if not losses:
        return Row("training", FAIL, "no training step was logged (see the job log)")
    firsts = {log_every, *([resumed + log_every] if resumed is not None else [])}

    def median(tag: str) -> float | None:
        vals = [e.value for e in events.get(tag, []) if e.step not in firsts] or [
            e.value for e in events.get(tag, [])
        ]
        return statistics.median(vals) if vals else None

    first, last = losses[min(losses)], losses[max(losses)]
    ms, tps, mfu = (median(t) for t in ("train/step_time", "train/tokens_per_sec", "train/mfu"))
    figures = {
        "loss_first": first,
        "loss_last": last,
        "ms_per_step": 1000 * ms if ms else None,
        "tokens_per_sec": tps,
        "mfu": mfu,
        "steps": max(losses),
    }
    speed = f"{tps:,.0f} tokens/s, {1000 * ms:.1f} ms/step" if ms and tps else "no speed logged"
    speed += f", MFU {100 * mfu:.1f}%" if mfu is not None else ""
    detail = f"{max(losses)} steps, loss {first:.3f} → {last:.3f}; {speed} (medians)"
    if not all(math.isfinite(v) for v in losses.values()):
        return Row("training", FAIL, f"a non-finite loss: {detail}", figures)
    if sorted(losses) != expected:
        missing = sorted(set(expected) - set(losses))[:5]
        return Row(
            "training", FAIL, f"logged steps {sorted(losses)[:5]}…, missing {missing}: {detail}", figures
        )
    if not last < first:
        return Row("training", FAIL, f"the loss did not fall: {detail}", figures)
    return Row("training", PASS, detail, figures)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the run's complete checkpoints."""
    from gpt1_ds.checkpoint import RunDir, complete_tags

    return [int(t.removeprefix("step")) for t in complete_tags(RunDir(run_dir).checkpoints)]


def round_trip_row(
    run_dir: Path, saved: list[int], events: dict[str, list[Any]], steps: int, restarts: int
) -> Row:
    """USR1 → checkpoint → requeue → resume: the job was requeued, a checkpoint was taken between
    the start and the end (the only one before the end: the preflight's interval is the whole run),
    the run ended at ``steps``, and the resumed attempt's first logged step came after it."""
    early = [s for s in saved if 0 < s < steps]
    note_path = run_dir / "preflight" / "usr1.json"
    note = json.loads(note_path.read_text()) if note_path.exists() else None
    if note is None:
        return Row(
            "preemption round trip",
            FAIL,
            "USR1 was never sent: training did not log the step it waits for (see the job log)",
        )
    if restarts < 1:
        return Row(
            "preemption round trip",
            FAIL,
            f"USR1 after step {note['usr1_after_step']} but the job "
            "was not requeued (is --requeue allowed here? see the job log)",
        )
    if not early or steps not in saved:
        return Row(
            "preemption round trip",
            FAIL,
            f"complete checkpoints at steps {saved}: none taken on USR1, "
            f"or the resumed run did not reach step {steps}",
        )
    at = early[0]
    after = [e for e in events.get("train/loss", []) if e.step > at]
    back = min(e.wall_time for e in after) - note["usr1_time"] if after else None
    detail = (
        f"USR1 after step {note['usr1_after_step']} → checkpoint at step {at} → requeued "
        f"(restart {restarts}) → resumed at step {at} → step {steps}"
    )
    detail += f"; {back:.0f} s from USR1 to the next logged step" if back is not None else ""
    return Row("preemption round trip", PASS, detail, {"checkpoint_step": at, "seconds_to_resume": back})


def report(run_dir: Path, steps: int, log_every: int, restarts: int) -> int:
    """The verdict table: ``check``'s rows, the training and the round trip; 1 if any row failed."""
    from gpt1_ds.plot import scalar_events

    out = run_dir / "preflight"
    try:
        rows = [Row(**r) for r in json.loads((out / CHECKS).read_text())]
    except (OSError, ValueError) as e:
        rows = [Row("checks", FAIL, f"the check step did not finish ({e}): see the job log above")]
    try:
        events = scalar_events(run_dir)
    except Exception as e:
        events = {}
        log.warning("no TensorBoard events in %s (%s)", run_dir, e)
    if any(r.verdict == FAIL for r in rows) and not events:
        rows += [Row(name, SKIP, "not run: a check failed") for name in ("training", "preemption round trip")]
    else:
        saved = checkpoint_steps(run_dir)
        resumed = next((s for s in saved if 0 < s < steps), None)
        rows.append(training_row(events, steps, log_every, resumed))
        rows.append(round_trip_row(run_dir, saved, events, steps, restarts))
    verdict = worst([r.verdict for r in rows])
    text = table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / VERDICT_MD).write_text(f"# gpt1-ds preflight: {verdict}\n\n{text}\n")
    (out / VERDICT_JSON).write_text(
        json.dumps({"verdict": verdict, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    print(f"gpt1-ds preflight: {verdict}\n{text}", flush=True)
    return 1 if verdict == FAIL else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return check(argv[1:])
    setup_logging()
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its event reader's chatter
    parser = argparse.ArgumentParser(
        prog="gpt1_ds.preflight", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="the checks, on every task (srun); takes train.py's arguments")
    w = sub.add_parser("wait", help="wait until the run has logged a step")
    w.add_argument("--run-dir", type=Path, required=True)
    w.add_argument("--step", type=int, required=True)
    w.add_argument("--timeout", type=float, default=3600)
    r = sub.add_parser("report", help="the verdict table")
    r.add_argument("--run-dir", type=Path, required=True)
    r.add_argument("--steps", type=int, required=True, help="the steps the run was given")
    r.add_argument("--log-interval", type=int, required=True)
    r.add_argument("--restarts", type=int, default=int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    args = parser.parse_args(argv)
    if args.command == "wait":
        return wait(args.run_dir, args.step, args.timeout)
    return report(args.run_dir, args.steps, args.log_interval, args.restarts)


if __name__ == "__main__":
    from gpt1_ds.distributed import run_rank

    run_rank(main)
