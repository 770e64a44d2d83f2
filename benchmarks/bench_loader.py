"""Loader throughput at batch 64 × 512: gpt1-ds's TrainLoader against a plain WebDataset pipeline.

    python benchmarks/bench_loader.py --data DIR          # a prepared dataset (seq_len 512)
    python benchmarks/bench_loader.py                     # prepares the embedded sample books first

Both read the same shards of DIR/train, decode the uint16 blocks and build int64
``input_ids``/``targets`` batches; gpt1-ds also shuffles within its window and
splits by rank and worker. Tokens/s counts input tokens (batch × seq_len), over
``--batches`` batches (the loader wraps around epochs). Resume cost: the time to
the first batch after ``load_state_dict`` in the middle of an epoch, beside the
time to the first batch of a fresh loader. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from data_prep.manifest import read_manifest
from gpt1_ds.data import TrainLoader, to_batch

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


def ours(split: Path, workers: int, batches: int, batch_size: int) -> float:
    loader = TrainLoader(split, batch_size=batch_size, num_workers=workers, seed=0)
    return throughput(loader, batches, batch_size * loader.seq_len)


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
    state["batch"] = len(fresh) // 2 + 1
    resumed = TrainLoader(split, batch_size=batch_size, num_workers=workers)
    resumed.load_state_dict(state)
    start = time.perf_counter()
    next(iter(resumed))
    return t_fresh, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data", type=Path, help="prepared dataset directory (default: prepare the sample)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    data = args.data
    if data is None:
        data = Path(tempfile.mkdtemp(prefix="bench_loader_"))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.prepare",
                "--input",
                str(REPO / "data" / "sample"),
                "--out",
                str(data),
                "--vocab-size",
                "8192",
                "--seq-len",
                "512",
                "--shard-bytes",
                "200000",
                "--quiet",
            ],
            check=True,
            cwd=REPO,
        )
    split = data / "train"
    m = read_manifest(split)
    print(
        f"\nloader: {split} ({len(m['shards'])} shards, {m['total_tokens']:,} tokens, "
        f"seq_len {m['seq_len']}); "
        f"batch {args.batch_size}; torch {torch.__version__}; {date.today()}\n"
    )
    print("| pipeline | workers | tokens/s | tokens/s per worker |")
    print("|---|---:|---:|---:|")
    for workers in (0, 1, 2):
        for name, fn in (("gpt1-ds TrainLoader", ours), ("plain webdataset.WebDataset", baseline)):
            rate = fn(split, workers, args.batches, args.batch_size)
            per = rate / max(1, workers)
            print(f"| {name} | {workers} | {rate / 1e6:.1f}M | {per / 1e6:.1f}M |")
    print("\n| resume | workers | seconds to first batch |\n|---|---:|---:|")
    for workers in (0, 2):
        t_fresh, t_resume = resume_cost(split, workers, args.batch_size)
        print(f"| fresh start | {workers} | {t_fresh:.3f} |")
        print(f"| resume mid-epoch | {workers} | {t_resume:.3f} |")


if __name__ == "__main__":
    main()
