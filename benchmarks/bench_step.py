"""Milliseconds per optimiser step, split: the compute (forward, backward) and the rest (the update:
clipping, the optimiser, DeepSpeed's own per-step work), a plain PyTorch loop against ZeRO 0/1/2.

    python benchmarks/bench_step.py                           # gpt1, 1 × 128 tokens on a CPU
    python benchmarks/bench_step.py --batch 8 --seq-len 512   # on a GPU: a rank's share on 8 GPUs

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
import statistics
import time
from pathlib import Path

import benchlib
from bench_train import build_variant, run_child

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


QUICK = {"presets": ["tiny"], "variants": ["plain", "ds-z2"], "batch": 1, "seq_len": 16, "steps": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["gpt1"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = benchlib.parse_args(parser, QUICK)
    if args.child:
        preset, variant, batch = args.child.split(":")
        result = measure(preset, variant, int(batch), args.seq_len, args.steps, args.warmup)
        print("RESULT " + json.dumps(result))
        return

    device = f"{benchlib.cpu_name()}, {os.cpu_count()} cores"
    tables, failed = [], []
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
        if first["device"] != "cpu":
            device = first["device"]
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
    title = "Per-step latency: compute and update, a plain PyTorch loop against ZeRO 0/1/2"
    benchlib.emit(benchlib.result("step", title, device, tables, notes, quick=args.quick), args.json)


if __name__ == "__main__":
    main()
