"""What a step costs beyond its arithmetic: two tables.

    python benchmarks/bench_step.py                           # both tables
    python benchmarks/bench_step.py --tables host             # the host's cost of a step only
    python benchmarks/bench_step.py --tables split --batch 8 --seq-len 512   # on a GPU

**host**: the time the host adds to each step, ``gpt1_ds.train`` as users run it against a
plain PyTorch loop (1 rank) and torch DDP (2 ranks). GPT-1's shape (12 layers, its 146
parameter tensors) at width 64 with one sequence of 32 tokens per rank and step, so that the
arithmetic nearly vanishes and a step is mostly host work: on a cluster of fast GPUs that work,
not the FLOPs, sets the wall time of GPT-1's ~3.05M sequential steps. Each row runs in
processes of its own (``--repeats`` times, the rows interleaved; median and spread). A step's
time is taken from outside the loop: the parent stamps the arrival of the log lines of steps
``--window`` A and B and divides by B − A, so that start-up, the first evaluation and the last
checkpoint are left out, and no work moved out of a loop's own clock can look like a gain (the
loop's own clock is shown beside it). Every rank gets ``--threads`` threads, on both sides.
The start-up column: from the command to the first step, as the parent saw it (the first
step's log line, less the steps it covers at the measured step time).
A further run of each row counts, per step, the reads of tensor values on the host (each a
synchronisation on a GPU) and the collectives called from Python (``hostcount.py``). Rows:
``plain@1``, ``ddp@2``, ``engine:JSON@N`` (the DeepSpeed engine in a bare loop: what DeepSpeed
costs without the training loop), ``train:JSON@N`` (``python -m gpt1_ds.train`` at 1 rank, the
``deepspeed`` launcher at 2); ``+NAME`` adds a setting of ``SETTINGS``, ``+key=value`` any
override (``+ds.bf16.check_grad_overflow=true``).

**split**: milliseconds per optimiser step, split: the compute (forward, backward) and the rest
(the update: clipping, the optimiser, DeepSpeed's own per-step work), a plain PyTorch loop
against ZeRO 0/1/2 at world size 1.

GPT-1's recipe is about 3.05M steps of 64 sequences, so its wall time on many GPUs is set by
what a step costs beyond its FLOPs. With a small batch the forward and backward are short and the
update (the same work whatever the batch: 117M parameters through Adam, plus DeepSpeed's own
bookkeeping) shows as what it is: a floor under every step. One process per variant (world size
1, no communication: the gradient all-reduce is the preflight's to measure, on the cluster); the
device synchronised between the parts (on a GPU that serialises what would overlap, so the sum is
an upper bound). Medians over ``--steps`` after ``--warmup``. ``--quick``: tiny, 1 × 16, 2 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import hostcount
from bench_train import build_variant, run_child

from gpt1_ds.env import free_port

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ["plain", "ds-z0", "ds-z1", "ds-z2"]


def measure(preset: str, variant: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    """In a child process: seconds of each part of each step, medians."""
    import torch

    built, T = build_variant(preset, variant, batch, seq_len, warmup + steps)
    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    parts: dict[str, list[float]] = {"forward": [], "backward": [], "update": []}
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = built.forward(i)
        sync()
        t1 = time.perf_counter()
        built.backward(loss)
        sync()
        t2 = time.perf_counter()
        built.update()
        sync()
        t3 = time.perf_counter()
        if i >= warmup:
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[name].append(seconds)
    params = sum(p.numel() for p in built.module.parameters())
    return {
        **{name: statistics.median(values) for name, values in parts.items()},
        "optimizer": built.optimizer,
        "params": params,
        "seq_len": T,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


# ---- host: what the host adds to a step -----------------------------------------------------

HOST_MODEL = {"n_embd": 64, "n_head": 4, "n_inner": 256, "n_positions": 32, "vocab_size": 8192}
"""GPT-1's 12 layers and 146 parameter tensors at a width where the arithmetic nearly vanishes; the
token table fits the tokenizer of ``HOST_PREP``."""
HOST_PREP = ["--vocab-size", "8192", "--seq-len", "32", "--shard-bytes", "1000000"]
HOST_PREP += ["--val-fraction", "0.05", "--test-fraction", "0"]
SETTINGS: dict[str, list[str]] = {
    # DeepSpeed's own defaults for the two settings the shipped JSONs change for speed
    "ds-defaults": ["ds.bf16.check_grad_overflow=true", "ds.zero_optimization.reduce_scatter=true"],
    "workers": ["num_workers=2"],  # two loader workers per rank, the loader's earlier default
    "compile": ["compile=true"],  # torch.compile under the engine (engine.compile())
}
"""Named settings a row adds with ``+NAME``."""
HOST_ROWS = [
    "plain@1",
    "engine:zero1@1",
    "engine:zero2@1",
    "train:zero0@1",
    "train:zero1@1",
    "train:zero1+workers@1",
    "train:zero1+compile@1",
    "train:zero2@1",
    "train:zero2+ds-defaults@1",
    "train:zero3@1",
    "train:zero2_offload@1",
    "ddp@2",
    "engine:zero1@2",
    "engine:zero2@2",
    "train:zero0@2",
    "train:zero1@2",
    "train:zero1+workers@2",
    "train:zero2@2",
    "train:zero2+ds-defaults@2",
    "train:zero3@2",
]
HOST_SIDE = ("gpt1_ds/data.py:", "torch/optim/")
"""Places that read tensors which live on the host on every device (the loader's own batches;
the step counts of torch's optimisers unless fused or capturable): their reads are counted
apart, not as synchronisations."""
TRAIN_LINE = re.compile(r"step (\d+)/\d+ \|")
LOOP_LINE = re.compile(r"^STEP (\d+)$")
LOOP_CLOCK = re.compile(r"step (\d+)/\d+ \|.*\| ([\d.]+) ms/step")


@dataclass(frozen=True)
class HostRow:
    """``KIND[:JSON][+SETTING|+key=value ...]@RANKS`` (the module docstring)."""

    spec: str
    kind: str
    ranks: int
    config: str | None
    overrides: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str) -> HostRow:
        head, _, ranks = spec.rpartition("@")
        first, *extra = head.split("+")
        kind, _, config = first.partition(":")
        if not ranks.isdigit() or kind not in ("plain", "ddp", "engine", "train"):
            raise ValueError(
                f"row {spec!r} is not KIND[:JSON][+SETTING]@RANKS (KIND: plain, ddp, engine, train)"
            )
        if (kind in ("engine", "train")) != bool(config):
            raise ValueError(
                f"row {spec!r}: engine and train rows name a JSON of ds_configs/, the others none"
            )
        unknown = [e for e in extra if "=" not in e and e not in SETTINGS]
        if unknown:
            raise ValueError(f"row {spec!r}: unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
        overrides = [o for e in extra for o in ([e] if "=" in e else SETTINGS[e])]
        return cls(spec, kind, int(ranks), config or None, tuple(overrides))

    @property
    def base(self) -> str:
        """The row this one is compared with: the plain loop at one rank, DDP at more."""
        return "plain@1" if self.ranks == 1 else f"ddp@{self.ranks}"


def host_loop(spec: str, first: int, last: int, log_interval: int, count: Path | None) -> None:
    """A child rank of a ``plain``, ``ddp`` or ``engine`` row: random batches in memory, ``STEP n``
    printed by rank 0 after every ``log_interval`` steps (the device drained first)."""
    counter = hostcount.Counter().install() if count else None
    import torch
    import torch.distributed as dist

    from gpt1_ds.config import RunConfig, parse_overrides
    from gpt1_ds.ds_config import load_ds_config, resolve_ds_config
    from gpt1_ds.model import GPT, GPTConfig, param_groups

    row = HostRow.parse(spec)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    config = GPTConfig.from_preset("gpt1", **HOST_MODEL)
    torch.manual_seed(0)
    steps = last + log_interval
    data = torch.randint(0, config.vocab_size, (steps, 1, config.n_positions + 1))
    model = GPT(config).to(device).train()

    if row.kind in ("plain", "ddp"):
        if row.kind == "ddp":
            dist.init_process_group("nccl" if cuda else "gloo")
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
            if counter:  # the buckets' all-reduces through Python, where the counter sees them
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                model.register_comm_hook(None, allreduce_hook)
        groups = param_groups(model, 0.01)  # fused: one kernel for every tensor (CPU and CUDA)
        opt = torch.optim.AdamW(groups, lr=2.5e-4, betas=(0.9, 0.999), eps=1e-8, fused=True)

        def step(i: int) -> None:
            x, y = data[i, :, :-1].to(device), data[i, :, 1:].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    else:
        from gpt1_ds import distributed
        from gpt1_ds.runner import build_engine

        distributed.init()  # as gpt1_ds.train starts its ranks
        ds_over = {k[3:]: v for k, v in parse_overrides(list(row.overrides)).items() if k.startswith("ds.")}
        other = [o for o in row.overrides if not o.startswith("ds.") and o != "compile=true"]
        if other:
            raise ValueError(
                f"row {spec!r}: an engine row takes ds.key=value and compile=true only, not {other}"
            )
        ds = load_ds_config(REPO / "ds_configs" / f"{row.config}.json", ds_over)
        ds["train_batch_size"] = world
        run = RunConfig(model="gpt1", micro_batch_size=1, max_steps=10**6)
        ds = resolve_ds_config(ds, run, world, lambda a: 10**6, f"{row.config}.json", device.type)
        engine, _ = build_engine(model, ds)
        if "compile=true" in row.overrides:
            engine.compile()

        def step(i: int) -> None:
            x, y = data[i, :, :-1].to(device), data[i, :, 1:].to(device)
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()

    marks = {}
    for i in range(steps):
        if counter and i in (first, last):
            marks[i] = counter.snapshot()
        step(i)
        if (i + 1) % log_interval == 0:
            if cuda:
                torch.cuda.synchronize()
            if rank == 0:
                print(f"STEP {i + 1}", flush=True)
    if counter and rank == 0:
        count.write_text(json.dumps(hostcount.per_step(marks[first], marks[last], last - first)) + "\n")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_args(row: HostRow, data: Path, run_dir: Path, steps: int, log_interval: int) -> list[str]:
    """``gpt1_ds.train``'s command line for ``row``: GPT-1's profile at the host benchmark's shape."""
    args = ["--deepspeed_config", f"ds_configs/{row.config}.json", "--config", "configs/gpt1.yaml"]
    args += ["--data", str(data), "--run-dir", str(run_dir)]
    args += [f"model_overrides.{k}={v}" for k, v in HOST_MODEL.items()]
    args += ["micro_batch_size=1", f"ds.train_batch_size={row.ranks}", f"max_steps={steps}"]
    return [*args, f"log_interval={log_interval}", *row.overrides]


def host_commands(
    row: HostRow, data: Path, scratch: Path, args: argparse.Namespace, count: Path | None
) -> list[list[str]]:
    """The processes of one run of ``row``: the first prints the step lines (a launcher or rank 0)."""
    first, last = args.window
    if row.kind == "train":
        steps = last + args.log_interval  # the last checkpoint and evaluation after the window
        script = str(REPO / "benchmarks" / "hostcount.py") if count else None
        train = train_args(row, data, scratch / "run", steps, args.log_interval)
        if row.ranks == 1:
            return [[sys.executable, *([script] if script else ["-m", "gpt1_ds.train"]), *train]]
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(row.ranks)]
        launcher += ["--master_port", str(free_port())]
        return [[*launcher, script or str(REPO / "gpt1_ds" / "train.py"), *train]]
    child = [sys.executable, __file__, "--host-child", row.spec, "--window", str(first), str(last)]
    child += ["--log-interval", str(args.log_interval)] + (["--count", str(count)] if count else [])
    return [child] * row.ranks


def run_host(
    row: HostRow, data: Path, scratch: Path, args: argparse.Namespace, count: Path | None = None
) -> dict[str, Any]:
    """One run of ``row``: ms per step between the window's log lines as the parent saw them arrive,
    and the loop's own clock where it prints one; with ``count``, the per-step counts instead."""
    first, last = args.window
    commands = host_commands(row, data, scratch, args, count)
    port = str(free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, HOSTCOUNT_FROM=str(first), HOSTCOUNT_TO=str(last))
    if count:
        env["HOSTCOUNT_OUT"] = str(count)
    procs, logs = [], []
    launched = time.perf_counter()
    for rank, cmd in enumerate(commands):
        if len(commands) > 1:
            env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(commands))}
        log = (scratch / f"rank{rank}.log").open("w") if rank else None
        logs.append(log)
        out = subprocess.PIPE if rank == 0 else log
        procs.append(
            subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        )
    pattern = TRAIN_LINE if row.kind == "train" else LOOP_LINE
    stamps: dict[int, float] = {}
    clock: list[float] = []
    tail: list[str] = []
    for line in procs[0].stdout:
        now = time.perf_counter()
        if m := pattern.search(line):
            stamps.setdefault(int(m.group(1)), now)
        if (m := LOOP_CLOCK.search(line)) and first < int(m.group(1)) <= last:
            clock.append(float(m.group(2)))
        tail = ([*tail, line])[-40:]
    codes = [p.wait() for p in procs]
    for log in logs:
        if log:
            log.close()
    if any(codes) or first not in stamps or last not in stamps:
        others = "".join((scratch / f"rank{r}.log").read_text()[-2000:] for r in range(1, len(commands)))
        raise RuntimeError(f"{row.spec}: exit {codes}\n{''.join(tail)}{others}")
    subprocess.run(["rm", "-rf", str(scratch / "run")], check=True)
    if count:
        found = count if count.exists() else count.with_suffix(".rank0.json")
        return json.loads(found.read_text())
    ms = 1000 * (stamps[last] - stamps[first]) / (last - first)
    logged = min(stamps)  # command → the first step: the first log line less the steps it covers
    startup = stamps[logged] - launched - logged * ms / 1000
    return {"ms": ms, "clock": statistics.mean(clock) if clock else None, "startup": startup}


def host_counts(counts: dict[str, Any]) -> tuple[float, float, float]:
    """(synchronising reads, host-side reads, collectives) per step, from ``hostcount.per_step``."""
    sites = counts["reads_by_site"]
    host = sum(v for k, v in sites.items() if any(h in k for h in HOST_SIDE))
    syncs = counts["cuda_syncs"] if counts["cuda_syncs"] else counts["reads"] - host
    return syncs, host, counts["collectives"]


def host_table(args: argparse.Namespace, device_count: int) -> tuple[list[benchlib.Table], list[str]]:
    """Runs every row ``--repeats`` times, interleaved, and once more counting; the tables and notes."""
    rows = [HostRow.parse(spec) for spec in args.rows]
    skipped = [r.spec for r in rows if r.ranks > max(device_count, 1) and device_count > 0]
    rows = [r for r in rows if r.spec not in skipped]
    results: dict[str, dict[str, Any]] = {r.spec: {"runs": [], "failed": None} for r in rows}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        scratch = Path(tmp)
        data = scratch / "data"
        prep = [sys.executable, "-m", "data_prep.prepare", "--input", str(REPO / "data" / "sample")]
        subprocess.run([*prep, "--out", str(data), "--quiet", *HOST_PREP], check=True, cwd=REPO)
        for repeat in range(args.repeats + 1):  # the last round counts
            for row in rows:
                r = results[row.spec]
                if r["failed"]:
                    continue
                try:
                    if repeat < args.repeats:
                        r["runs"].append(run_host(row, data, scratch, args))
                        print(f"{row.spec}: {r['runs'][-1]['ms']:.2f} ms/step", file=sys.stderr, flush=True)
                    elif not args.no_count:
                        r["counts"] = run_host(row, data, scratch, args, count=scratch / "count.json")
                        (scratch / "count.json").unlink(missing_ok=True)
                        (scratch / "count.rank0.json").unlink(missing_ok=True)
                        (scratch / "count.rank1.json").unlink(missing_ok=True)
                except RuntimeError as e:
                    print(str(e)[-4000:], file=sys.stderr)
                    r["failed"] = str(e).splitlines()[0]
    return host_tables(rows, results, args), host_notes(rows, results, args, skipped)


def host_tables(
    rows: list[HostRow], results: dict[str, dict[str, Any]], args: argparse.Namespace
) -> list[benchlib.Table]:
    def median(spec: str) -> float | None:
        runs = results.get(spec, {}).get("runs")
        return statistics.median(x["ms"] for x in runs) if runs else None

    columns = {
        "row": "{}",
        "ranks": "{}",
        "ms/step": "{:.2f}",
        "spread": "{}",
        "vs plain/DDP": "{:.2f}×",
        "loop's clock": "{:.2f}",
        "start-up (s)": "{:.1f}",
        "syncs/step": "{:.2f}",
        "host-side reads/step": "{:.2f}",
        "collectives/step": "{:.2f}",
    }
    first, last = args.window
    title = (
        f"ms per step between the log lines of steps {first} and {last} as the parent saw them, median of "
        f"{args.repeats} runs (spread: min–max); "
        + (f"{args.threads} thread(s) per rank" if args.threads else "OMP_NUM_THREADS unset")
    )
    main = benchlib.table(title, columns)
    loop = benchlib.table(
        "The training loop's own work: `gpt1_ds.train` against the same DeepSpeed engine in a bare loop",
        {"JSON, settings": "{}", "ranks": "{}", "engine ms/step": "{:.2f}", "train ms/step": "{:.2f}",
         "loop's work": "{:.2f} ms", "share of the step": "{:.1f}%"},
    )  # fmt: skip
    for row in rows:
        r = results[row.spec]
        ms, base = median(row.spec), median(row.base)
        runs = [x["ms"] for x in r["runs"]]
        spread = (
            f"{min(runs):.2f}–{max(runs):.2f}" if runs else (f"failed: {r['failed']}" if r["failed"] else "")
        )
        clocks = [x["clock"] for x in r["runs"] if x["clock"] is not None]
        syncs = host_counts(r["counts"]) if r.get("counts") else (None, None, None)
        ratio = ms / base if ms and base and row.spec != row.base else None
        startups = [x["startup"] for x in r["runs"]]
        main["rows"].append(
            [
                row.spec,
                row.ranks,
                ms,
                spread,
                ratio,
                statistics.median(clocks) if clocks else None,
                statistics.median(startups) if startups else None,
                *syncs,
            ]
        )
        engine = row.spec.replace("train:", "engine:", 1)
        if row.kind == "train" and median(engine) and ms:
            label = row.spec.split(":", 1)[1].rsplit("@", 1)[0]
            work = ms - median(engine)
            loop["rows"].append([label, row.ranks, median(engine), ms, work, 100 * work / ms])
    return [main] + ([loop] if loop["rows"] else [])


def host_notes(
    rows: list[HostRow], results: dict[str, dict[str, Any]], args: argparse.Namespace, skipped: list[str]
) -> list[str]:
    notes = [
        "Host benchmark: GPT-1's 12 layers and 146 parameter tensors at width 64 (4 heads, FFN 256, "
        "8,192 tokens, context 32), one sequence of 32 tokens per rank per step, bf16. plain: a PyTorch "
        "loop (bf16 autocast on fp32 weights, torch's fused AdamW, clipping at 1.0); ddp: the same "
        "under DistributedDataParallel (gloo on a CPU, NCCL on GPUs); engine: the "
        "DeepSpeed engine of the JSON in a bare loop; train: `python -m gpt1_ds.train` (1 rank) or the "
        "`deepspeed` launcher (2 ranks) with `configs/gpt1.yaml` at this shape: loader, logging, "
        "TensorBoard, the end's evaluation and checkpoint after the window. syncs/step: reads of a "
        "tensor's value on the host (.item(), .tolist(), bool(), …; on a GPU, what "
        "torch.cuda.set_sync_debug_mode reports), on rank 0, in a separate counting run; on a CPU every "
        "tensor counts (an upper bound). host-side reads: of tensors on the host on every device "
        "(the loader's batches, the step counts of torch's unfused AdamW). collectives/step: "
        "torch.distributed calls from Python (DDP's bucket all-reduces through its default hook in the "
        "counting run)."
    ]
    sites = []
    for row in rows:
        counts = results[row.spec].get("counts")
        if row.kind == "train" and counts:
            top = {**counts["reads_by_site"], **counts["collectives_by_site"]}
            shown = ", ".join(
                f"{k} {v:g}" for k, v in top.items() if v >= 0.5 and not any(h in k for h in HOST_SIDE)
            )
            sites.append(f"`{row.spec}`: {shown or 'none'}")
    if sites:
        notes.append(
            "Per step, what reads a value or calls a collective (≥ 0.5 a step): " + "; ".join(sites) + "."
        )
    if skipped:
        notes.append(f"Not run, more ranks than devices: {', '.join(skipped)}.")
    failed = [f"{spec} ({r['failed']})" for spec, r in results.items() if r["failed"]]
    if failed:
        notes.append(f"Failed: {'; '.join(failed)}.")
    return notes


QUICK = {
    "presets": ["tiny"],
    "variants": ["plain", "ds-z2"],
    "batch": 1,
    "seq_len": 16,
    "steps": 2,
    "rows": ["plain@1", "train:zero1@1"],
    "repeats": 1,
    "window": [4, 12],
    "log_interval": 4,
}


def split_table(args: argparse.Namespace) -> tuple[list[benchlib.Table], list[str], str | None]:
    """The split table's rows, each variant in a process of its own; (tables, notes, GPU name)."""
    tables, failed = [], []
    device = None
    for preset in args.presets:
        rows = {}
        for variant in args.variants:
            r = run_child(__file__, f"{preset}:{variant}:{args.batch}", args)
            if r is None:
                failed.append(f"{preset} {variant}")
            else:
                rows[variant] = r
        if not rows:
            continue
        first = next(iter(rows.values()))
        device = first["device"] if first["device"] != "cpu" else None
        base_name = "plain" if "plain" in rows else next(iter(rows))
        base = rows[base_name]
        columns = {
            "variant": "{}",
            "optimizer": "{}",
            "forward": "{:.1f} ms",
            "backward": "{:.1f} ms",
            "update": "{:.1f} ms",
            "step": "{:.1f} ms",
            "non-compute": "{:.1f} ms",
            "vs plain": "{:.2f}×",
        }
        title = f"{preset} ({first['params'] / 1e6:.1f}M parameters), batch {args.batch} × {first['seq_len']}"
        t = benchlib.table(title, columns)
        compute = base["forward"] + base["backward"]  # the model's own work, the plain loop's
        overhead = {v: r["forward"] + r["backward"] + r["update"] - compute for v, r in rows.items()}
        for variant, r in rows.items():
            step = r["forward"] + r["backward"] + r["update"]
            t["rows"].append(
                [
                    variant,
                    r["optimizer"],
                    1000 * r["forward"],
                    1000 * r["backward"],
                    1000 * r["update"],
                    1000 * step,
                    1000 * overhead[variant],
                    overhead[variant] / overhead[base_name],
                ]
            )
        tables.append(t)
    notes = [
        f"One process per variant, world size 1, bf16; medians of {args.steps} step(s) after "
        f"{args.warmup} warm-up. update: clipping, the optimiser step and zeroing (plain), or "
        "`engine.step()` (DeepSpeed: the same plus its fp32 master weights, gradient norm and "
        "bookkeeping). DeepSpeed also works inside the backward pass (its gradient hooks copy, "
        "accumulate and partition the gradients), so non-compute is the step less the plain "
        "loop's forward + backward: everything a step costs beyond the model's own arithmetic. "
        "The device is synchronised between the parts."
    ]
    if failed:
        notes.append(f"Failed (see the run's stderr): {', '.join(failed)}.")
    return tables, notes, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tables", nargs="+", default=["host", "split"], choices=["host", "split"])
    host = parser.add_argument_group("host table")
    host.add_argument("--rows", nargs="+", default=HOST_ROWS, help="rows (the module docstring)")
    host.add_argument("--repeats", type=int, default=3, help="timed runs of each row (median, spread)")
    host.add_argument("--window", type=int, nargs=2, default=[40, 240], metavar=("A", "B"))
    host.add_argument("--log-interval", type=int, default=20, help="steps between log lines (divides A, B)")
    host.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of each rank (OMP_NUM_THREADS; 0: left unset, as launched)",
    )
    host.add_argument("--no-count", action="store_true", help="no counting run")
    split = parser.add_argument_group("split table")
    split.add_argument("--presets", nargs="+", default=["gpt1"])
    split.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    split.add_argument("--batch", type=int, default=1, help="sequences per step")
    split.add_argument("--seq-len", type=int, default=128)
    split.add_argument("--steps", type=int, default=5)
    split.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--host-child", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=Path, help=argparse.SUPPRESS)
    args = benchlib.parse_args(parser, QUICK)
    if args.child:
        preset, variant, batch = args.child.split(":")
        result = measure(preset, variant, int(batch), args.seq_len, args.steps, args.warmup)
        print("RESULT " + json.dumps(result))
        return
    if args.host_child:
        host_loop(args.host_child, *args.window, args.log_interval, args.count)
        return
    for spec in args.rows:
        HostRow.parse(spec)  # a bad row is refused before anything runs
    if any(a % args.log_interval for a in args.window) or args.window[0] >= args.window[1]:
        parser.error("--window A B: A < B, both multiples of --log-interval")

    import torch

    gpus = torch.cuda.device_count()
    device = f"{benchlib.cpu_name()}, {os.cpu_count()} cores"
    tables, notes = [], []
    if "host" in args.tables:
        t, n = host_table(args, gpus)
        tables, notes = tables + t, notes + n
    if "split" in args.tables:
        t, n, gpu = split_table(args)
        tables, notes, device = tables + t, notes + n, gpu or device
    if gpus:
        device = torch.cuda.get_device_name(0) + (f" × {gpus}" if gpus > 1 else "")
    title = "Per-step cost beyond the arithmetic: the host's share of a step, and compute against update"
    benchlib.emit(benchlib.result("step", title, device, tables, notes, quick=args.quick), args.json)


if __name__ == "__main__":
    main()
