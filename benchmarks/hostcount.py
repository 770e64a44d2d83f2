"""Counts what a training step asks of the host: the reads of a tensor's value (each a
synchronisation with the device on a GPU) and the collectives called from Python.

    HOSTCOUNT_OUT=OUT.json python benchmarks/hostcount.py [train.py arguments]          # one rank
    HOSTCOUNT_OUT=OUT.json deepspeed --num_gpus 2 benchmarks/hostcount.py [arguments]   # OUT.rankN.json

runs ``gpt1_ds.train`` with the counters installed and writes, per rank, what steps
``HOSTCOUNT_FROM`` + 1 … ``HOSTCOUNT_TO`` (environment; default 40 … 240) counted between
them, so start-up, the first evaluation and the last checkpoint are left out. ``bench_step.py``
uses the same ``Counter`` in its own loops (plain PyTorch, DDP, the bare engine).

Syncs: on a GPU, what ``torch.cuda.set_sync_debug_mode`` reports; everywhere, the calls that read
a value on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()``, ``int()``,
``float()`` of a tensor, ``torch.cuda.synchronize``). On a CPU every tensor is on the host, so
these count reads that would not wait on a GPU too (an upper bound). Collectives: calls of
``torch.distributed``'s functions, DeepSpeed's included; DDP's buckets are reduced in C++ and
are counted by ``bench_step.py`` through a communication hook.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_object",
    "all_gather_coalesced",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)


SITE_ROOTS = ("site-packages/", "/gpt1_ds/", "/benchmarks/")


def caller() -> str:
    """``path:function`` of the innermost frame outside this file (torch's own included): where
    the read or the collective happens."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    for root in SITE_ROOTS:
        if root in path:
            prefix = "" if root == "site-packages/" else root.strip("/") + "/"
            path = prefix + path.split(root, 1)[1]
            break
    return f"{path}:{frame.f_code.co_name}"


class Counter:
    """Installed once per process, before DeepSpeed caches torch.distributed's functions. Each
    count is kept by what was called and by the place that called it (``name@path:function``)."""

    def __init__(self) -> None:
        self.reads: Tally[str] = Tally()
        self.collectives: Tally[str] = Tally()
        self.cuda_syncs = 0

    def install(self) -> Counter:
        for name in READS:
            setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name), self.reads, name))
        if torch.cuda.is_available():
            sync = torch.cuda.synchronize
            torch.cuda.synchronize = self._counting(sync, self.reads, "cuda.synchronize")
            torch.cuda.set_sync_debug_mode("warn")
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
                if "synchronizing CUDA operation" in str(message):
                    self.cuda_syncs += 1
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
        c10d = dist.distributed_c10d
        for name in COLLECTIVES:
            for module in (dist, c10d):
                if hasattr(module, name):
                    setattr(module, name, self._counting(getattr(module, name), self.collectives, name))
        return self

    @staticmethod
    def _counting(fn: Any, tally: Tally[str], name: str) -> Any:
        if getattr(fn, "_hostcount", False):
            return fn

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            tally[f"{name}@{caller()}"] += 1
            return fn(*args, **kwargs)

        counted._hostcount = True  # type: ignore[attr-defined]
        return counted

    def snapshot(self) -> dict[str, Any]:
        return {
            "reads": dict(self.reads),
            "collectives": dict(self.collectives),
            "cuda_syncs": self.cuda_syncs,
        }


def per_step(before: dict[str, Any], after: dict[str, Any], steps: int) -> dict[str, Any]:
    """What was counted between two snapshots, per step: totals and by name."""

    def diff(key: str) -> dict[str, float]:
        names = set(before[key]) | set(after[key])
        d = {n: round((after[key].get(n, 0) - before[key].get(n, 0)) / steps, 3) for n in sorted(names)}
        return {n: v for n, v in sorted(d.items(), key=lambda kv: -kv[1]) if v}

    reads, collectives = diff("reads"), diff("collectives")
    return {
        "reads": round(sum(reads.values()), 2),
        "collectives": round(sum(collectives.values()), 2),
        "cuda_syncs": round((after["cuda_syncs"] - before["cuda_syncs"]) / steps, 2),
        "reads_by_site": reads,
        "collectives_by_site": collectives,
    }


def window() -> tuple[int, int]:
    return int(os.environ.get("HOSTCOUNT_FROM", "40")), int(os.environ.get("HOSTCOUNT_TO", "240"))


def main() -> None:
    out, argv = Path(os.environ["HOSTCOUNT_OUT"]), sys.argv[1:]
    counter = Counter().install()
    from gpt1_ds import distributed, train  # after the counters: DeepSpeed keeps references

    first, last = window()
    calls, marks = 0, {}
    step = train.Pretraining.train_step

    def counted_step(self: Any) -> torch.Tensor:
        nonlocal calls
        if calls in (first, last):  # before step calls + 1: `calls` steps done
            marks[calls] = counter.snapshot()
            if calls == last:
                rank = dist.get_rank()
                path = out.with_suffix(f".rank{rank}.json") if dist.get_world_size() > 1 else out
                result = per_step(marks[first], marks[last], last - first)
                path.write_text(json.dumps(result, indent=1) + "\n")
        calls += 1
        return step(self)

    train.Pretraining.train_step = counted_step
    distributed.run_rank(lambda: train.main(argv))


if __name__ == "__main__":
    main()
