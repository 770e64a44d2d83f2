"""Loader throughput at batch 64 × 512: gpt1-ds's TrainLoader against a plain WebDataset pipeline.

    python benchmarks/bench_loader.py --data DIR          # a prepared dataset (seq_len 512)
    python benchmarks/bench_loader.py                     # prepares the embedded sample books first

Both read the same shards of DIR/train, decode the uint16 blocks and build int64
``input_ids``/``targets`` batches; gpt1-ds also shuffles within its window and
splits by rank and worker. Tokens/s counts input tokens (batch × seq_len), over
``--batches`` batches (the loader wraps around epochs). Resume cost: the time to
the first batch after ``load_state_dict`` in the middle of an epoch, beside the
time to the first batch of a fresh loader. The checks' cost: the same loader with its
per-member checks (checksum, token ids) on and off. Prints markdown tables; ``--json PATH``
writes them as JSON too (``benchmarks/benchlib.py``).

    python benchmarks/bench_loader.py --quick             # two books, batch 8 × 64: a check in seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader

from gpt1_ds.data import TrainLoader, open_dataset, to_batch
from gpt1_ds.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent


def throughput(loader, batches: int, tokens_per_batch: int) -> float:
    """Tokens/s over ``batches`` batches, going round the loader's epochs; start-up not counted."""
    it = iter(loader)
    next(it)  # start-up (worker processes) is not throughput
    start = time.perf_counter()
    n = 0
    while n < batches:
        for _ in it:
            n += 1
            if n == batches:
                break
        else:
            it = iter(loader)
    return batches * tokens_per_batch / (time.perf_counter() - start)


def ours(split: Path, workers: int, batches: int, batch_size: int, verify: bool = True) -> float:
    loader = TrainLoader(split, batch_size=batch_size, num_workers=workers, seed=0, verify=verify)
    return throughput(loader, batches, batch_size * loader.seq_len)


def checks_cost(
    split: Path, workers: int, batches: int, batch_size: int, rounds: int
) -> tuple[float, float, float]:
    """Tokens/s with the per-member checks (CRC-32, token ids) and without, each the median of
    ``rounds`` runs taken in pairs of alternating order, and the median of the pairs' costs."""
    on, off = [], []
    for r in range(rounds):
        for verify in (True, False) if r % 2 == 0 else (False, True):
            (on if verify else off).append(ours(split, workers, batches, batch_size, verify))
    costs = [1 - a / b for a, b in zip(on, off, strict=True)]
    return float(np.median(on)), float(np.median(off)), float(np.median(costs))


def checks_alone(split: Path, repeats: int) -> tuple[float, int]:
    """Seconds per member for the checks by themselves (``Dataset.check``: CRC-32, token ids,
    the uint16 view), over every member of the split read into memory; and the member size."""
    dataset = open_dataset(split)
    members = []
    for shard in dataset.shards:
        with tarfile.open(shard.url) as tar:
            members += [(tar.extractfile(m).read(), shard, i) for i, m in enumerate(tar)]
    start = time.perf_counter()
    for _ in range(repeats):
        for data, shard, index in members:
            dataset.check(data, shard, index)
    return (time.perf_counter() - start) / (repeats * len(members)), len(members[0][0])


def baseline(split: Path, workers: int, batches: int, batch_size: int) -> float:
    """webdataset.WebDataset → decode blocks → batches of sequences, the plain way."""
    m = read_manifest(split)
    seq_len = m["seq_len"]
    urls = [str(split / s["name"]) for s in m["shards"]]

    def sequences(src):
        for sample in src:
            yield from np.frombuffer(sample["tokens"], dtype="<u2").reshape(-1, seq_len + 1)

    def batched(src):
        buf = []
        for seq in src:
            buf.append(seq)
            if len(buf) == batch_size:
                yield to_batch(np.stack(buf), seq_len, m["pad_id"])
                buf = []

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        sequences,
        batched,
    )
    loader = DataLoader(pipeline, batch_size=None, num_workers=workers)
    return throughput(loader, batches, batch_size * seq_len)


def resume_cost(split: Path, workers: int, batch_size: int) -> tuple[float, float]:
    """Seconds to the first batch: fresh, and resumed in the middle of an epoch."""
    fresh = TrainLoader(split, batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    next(iter(fresh))
    t_fresh = time.perf_counter() - start
    state = fresh.state_dict()
    state["steps"] = fresh.steps_per_epoch // 2 + 1
    resumed = TrainLoader(split, batch_size=batch_size, num_workers=workers)
    resumed.load_state_dict(state)
    start = time.perf_counter()
    next(iter(resumed))
    return t_fresh, time.perf_counter() - start


def prepare_sample(out: Path, quick: bool) -> None:
    """The embedded sample books as a dataset (``quick``: the three smallest, short sequences)."""
    sample = REPO / "data" / "sample"
    inputs = [str(sample)]
    size = ["--vocab-size", "8192", "--seq-len", "512", "--shard-bytes", "200000"]
    if quick:
        inputs = [str(p) for p in sorted(sample.glob("*.txt.gz"), key=lambda p: p.stat().st_size)[:3]]
        size = ["--vocab-size", "2000", "--seq-len", "64", "--shard-bytes", "4000"]
    cmd = [sys.executable, "-m", "data_prep.prepare", "--input", *inputs, "--out", str(out), *size, "--quiet"]
    subprocess.run(cmd, check=True, cwd=REPO)


QUICK = {
    "batch_size": 8,
    "batches": 20,
    "workers": [0, 1],
    "resume_workers": [0, 1],
    "rounds": 1,
    "check_batches": 20,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data", type=Path, help="prepared dataset directory (default: prepare the sample)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers to time")
    parser.add_argument("--resume-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=5, help="runs each way for the checks' cost")
    parser.add_argument(
        "--check-batches", type=int, default=3000, help="batches per run for the checks' cost"
    )
    args = benchlib.parse_args(parser, QUICK)
    data = args.data
    if data is None:
        data = Path(tempfile.mkdtemp(prefix="bench_loader_"))
        prepare_sample(data, args.quick)
    split = data / "train"
    m = read_manifest(split)
    source = str(args.data) if args.data else "The embedded sample books (`data/sample`)"
    if args.data is None and args.quick:
        source = "The three smallest sample books"
    rates = benchlib.table(
        f"{source}, train split: {len(m['shards'])} shards, {m['total_tokens']:,} tokens, "
        f"seq_len {m['seq_len']}; batch {args.batch_size} × {m['seq_len']}, {args.batches} batches",
        {"pipeline": "{}", "workers": "{}", "M tokens/s": "{:.1f}", "M tokens/s per worker": "{:.1f}"},
    )
    for workers in args.workers:
        for name, fn in (("gpt1-ds TrainLoader", ours), ("plain webdataset.WebDataset", baseline)):
            rate = fn(split, workers, args.batches, args.batch_size) / 1e6
            rates["rows"].append([name, workers, rate, rate / max(1, workers)])
    checks = benchlib.table(
        "What the per-member checks (CRC-32 of the bytes, token ids < vocab size) cost the loader: "
        f"{args.rounds} runs of {args.check_batches} batches each with them on and off "
        "(`TrainLoader(verify=False)`) in alternating order; medians",
        {"workers": "{}", "checks on, M tokens/s": "{:.1f}", "checks off": "{:.1f}", "cost": "{:.1%}"},
    )
    for workers in args.workers:
        on, off, cost = checks_cost(split, workers, args.check_batches, args.batch_size, args.rounds)
        checks["rows"].append([workers, on / 1e6, off / 1e6, cost])
    per_member, member_bytes = checks_alone(split, args.rounds * 20)
    members_per_s = {r[0]: r[2] * 1e6 / (member_bytes / 2) for r in checks["rows"]}  # ≈ 2 bytes a token
    alone = benchlib.table(
        f"The checks by themselves, timed on every member of the split in memory ({member_bytes:,} bytes "
        "each), against the time the loader spends per member with them off",
        {
            "workers": "{}",
            "checks, µs per member": "{:.1f}",
            "loader, µs per member": "{:.1f}",
            "share": "{:.1%}",
        },
        [[w, per_member * 1e6, 1e6 / n, per_member * n] for w, n in members_per_s.items()],
    )
    resume = benchlib.table(
        "Time to the first batch of a fresh loader and after `load_state_dict` in the middle of an epoch",
        {"resume": "{}", "workers": "{}", "seconds to first batch": "{:.3f}"},
    )
    for workers in args.resume_workers:
        t_fresh, t_resume = resume_cost(split, workers, args.batch_size)
        resume["rows"] += [["fresh start", workers, t_fresh], ["resume mid-epoch", workers, t_resume]]
    result = benchlib.result(
        "loader",
        "Loader: gpt1-ds `TrainLoader` against a plain WebDataset pipeline",
        f"{benchlib.cpu_name()}, {os.cpu_count()} cores",
        [rates, checks, alone, resume],
        [
            "Both read the same shards, decode the uint16 blocks and build int64 `input_ids`/`targets` "
            "batches; gpt1-ds also shuffles within its window and splits by rank and worker. Tokens/s "
            "counts input tokens (batch × seq_len), going round the epochs; start-up is not counted."
        ],
        quick=args.quick,
    )
    benchlib.emit(result, args.json)
    if args.data is None:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
