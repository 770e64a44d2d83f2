"""Training throughput, MFU and peak memory: a plain PyTorch loop against DeepSpeed.

    python benchmarks/bench_train.py                          # tiny and gpt1, every variant
    python benchmarks/bench_train.py --presets gpt1 --batch 16 --steps 20   # on a GPU

Variants, each in a process of its own (clean memory peaks), same model, same
batches, one optimiser step per batch, bf16:
  plain         PyTorch loop: bf16 autocast, torch.optim.AdamW (parameter groups)
  plain+ac      the same with activation checkpointing (torch.utils.checkpoint)
  plain+compile the same with the model compiled (torch.compile, inductor)
  hf            HF's OpenAIGPTLMHeadModel of the same shape, bf16 autocast, torch AdamW (fused on
                CUDA): what a user of transformers alone would run
  ds-z0/1/2     DeepSpeed engine with ds_configs/zero{0,1,2}.json (bf16, FusedAdam where built)
  ds-z2+ac      ZeRO-2 with activation checkpointing (DeepSpeed's, configured from the JSON)
  ds-z2+chunk   ZeRO-2 with the loss computed 1,024 positions at a time (loss_chunk_size)
  ds-z2+pad     ZeRO-2 with the token table padded to a multiple of 128 rows (vocab_multiple)
  ds-z2+compile ZeRO-2 with the model compiled under the engine (compile: engine.compile())
Step time is the median over ``--steps`` timed steps after ``--warmup`` (CUDA events on a GPU, with
no host synchronisation between the steps). Peak
memory: CUDA max_memory_allocated; on a CPU, the growth of the process's peak RSS
during the steps (coarse: the allocator keeps memory). Activations: the bytes
autograd holds for the backward pass after one forward, counted exactly with
saved-tensor hooks on any device; what activation checkpointing saves. MFU uses
the device's dense bf16 peak (gpt1_ds.metrics) or ``--peak-flops``; on a CPU
without ``--peak-flops`` it is not reported. Prints a markdown table per preset;
``--json PATH`` writes them as JSON too (``benchmarks/benchlib.py``).
``--quick``: tiny, plain and ds-z2, batch 2 × 32, one step: a check in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import benchlib

from gpt1_ds.env import free_port

REPO = Path(__file__).resolve().parent.parent
VARIANTS = [
    "plain",
    "plain+ac",
    "plain+compile",
    "hf",
    "ds-z0",
    "ds-z1",
    "ds-z2",
    "ds-z2+ac",
    "ds-z2+chunk",
    "ds-z2+pad",
    "ds-z2+compile",
]
VOCAB_MULTIPLE = 128
"""Rows the token table is padded to a multiple of in the ``+pad`` variant (``GPTConfig.vocab_multiple``)."""
LOSS_CHUNK = 1024
"""Positions per chunk of the loss in the ``+chunk`` variant (``RunConfig.loss_chunk_size``)."""


class Variant(NamedTuple):
    """A built variant: ``forward(i)`` gives batch i's loss, ``backward(loss)`` its gradients,
    ``update()`` the optimiser step (clipping, the step, zeroing: all the host and device work
    between two backward passes)."""

    forward: Callable[[int], Any]
    backward: Callable[[Any], None]
    update: Callable[[], None]
    module: Any
    optimizer: str


def build_variant(preset: str, variant: str, batch: int, seq_len: int, batches: int) -> tuple[Variant, int]:
    """The model and optimiser of ``variant`` on this process's device, ``batches`` random batches
    of ``batch`` × ``seq_len`` (at most the context); returns it and the sequence length used."""
    import torch

    from gpt1_ds.config import RunConfig
    from gpt1_ds.ds_config import load_ds_config, resolve_ds_config
    from gpt1_ds.model import GPT, GPTConfig, param_groups

    ac = variant.endswith("+ac")
    multiple = VOCAB_MULTIPLE if variant.endswith("+pad") else 1
    config = GPTConfig.from_preset(preset, activation_checkpointing=ac, vocab_multiple=multiple)
    T = min(seq_len, config.n_positions)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    data = torch.randint(0, config.vocab_size, (batches, batch, T + 1))

    if variant.startswith("plain") or variant == "hf":
        if variant == "hf":
            from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

            from gpt1_ds.hf import config_to_hf

            model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(**config_to_hf(config))).to(device).train()
        else:
            model = GPT(config).to(device).train()
        fused = {"fused": True} if cuda else {}
        opt = torch.optim.AdamW(param_groups(model, 0.01), lr=2.5e-4, betas=(0.9, 0.999), eps=1e-8, **fused)
        if variant.endswith("+compile"):
            model.compile()

        def forward(i: int):
            x, y = data[i, :, :-1].to(device), data[i, :, 1:].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if variant == "hf":  # HF shifts the labels itself: the inputs' own ids
                    return model(input_ids=x, labels=data[i, :, :-1].to(device)).loss
                return model(x, y)[1]

        def update() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        name = "torch AdamW" + (" (fused)" if cuda else "")
        return Variant(forward, lambda loss: loss.backward(), update, model, name), T

    import deepspeed

    from gpt1_ds import distributed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    distributed.init()  # as gpt1_ds.train starts its ranks
    stage = variant.split("-z")[1][0]
    ds = load_ds_config(REPO / "ds_configs" / f"zero{stage}.json")
    ds["train_batch_size"] = batch
    run = RunConfig(model=preset, micro_batch_size=batch, max_steps=10**6)
    ds = resolve_ds_config(ds, run, 1, lambda a: 10**6, f"zero{stage}.json", device.type)
    if ac:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds)
    from gpt1_ds.runner import build_engine

    model = GPT(config)
    model.loss_chunk = LOSS_CHUNK if variant.endswith("+chunk") else 0
    engine, _ = build_engine(model, ds)
    if variant.endswith("+compile"):
        engine.compile()

    def forward_ds(i: int):
        x, y = data[i, :, :-1].to(device), data[i, :, 1:].to(device)
        return engine(x, y)[1]

    optimizer = type(engine.optimizer).__name__
    if hasattr(engine.optimizer, "optimizer"):
        optimizer = f"{type(engine.optimizer).__name__}({type(engine.optimizer.optimizer).__name__})"
    return Variant(forward_ds, engine.backward, engine.step, engine.module, optimizer), T


def run_variant(preset: str, variant: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    """Runs in a child process: builds the variant, trains, returns its figures."""
    import torch

    built, T = build_variant(preset, variant, batch, seq_len, warmup + steps)
    forward, cuda = built.forward, torch.cuda.is_available()

    def step(i: int) -> None:
        built.backward(forward(i))
        built.update()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for i in range(warmup):
        step(i)
    sync()
    saved = 0  # bytes autograd keeps for the backward pass, parameters excluded: the activations
    module = built.module
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            saved += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward(0)
    del loss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    if cuda:  # CUDA events: no host synchronisation between the timed steps
        marks = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)
        ]
        for (begin, end), i in zip(marks, range(warmup, warmup + steps), strict=True):
            begin.record()
            step(i)
            end.record()
        torch.cuda.synchronize()
        times = [begin.elapsed_time(end) / 1000 for begin, end in marks]
    for i in range(warmup, warmup + steps) if not cuda else ():
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    )
    return {
        "step_time": statistics.median(times),
        "tokens": batch * T,
        "peak_bytes": peak,
        "seq_len": T,
        "activation_bytes": saved,
        "optimizer": built.optimizer,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


QUICK = {"presets": ["tiny"], "variants": ["plain", "ds-z2"], "batch": 2, "seq_len": 32, "steps": 1}


def run_child(script: str, spec: str, args: argparse.Namespace) -> dict | None:
    """``script --child PRESET:VARIANT:BATCH`` in a process of its own (clean memory peaks, its own
    port); its RESULT line, or None (its stderr printed) when it failed."""
    cmd = [sys.executable, script, "--child", spec, "--seq-len", str(args.seq_len)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        print(f"{spec} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "gpt1"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument(
        "--batch", type=int, help="sequences per step (default: 4 for gpt1 on a CPU, 32 for tiny)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = benchlib.parse_args(parser, QUICK)

    if args.child:
        preset, variant, batch = args.child.split(":")
        print(
            "RESULT "
            + json.dumps(run_variant(preset, variant, int(batch), args.seq_len, args.steps, args.warmup))
        )
        return

    import torch

    from gpt1_ds.metrics import device_peak_flops, flops_per_token
    from gpt1_ds.model import GPTConfig

    cuda = torch.cuda.is_available()  # CUDA itself is left to the children: no context held here
    device = f"{benchlib.cpu_name()}, {os.cpu_count()} cores"
    peak_flops = args.peak_flops
    tables, failed = [], []
    for preset in args.presets:
        batch = args.batch or (32 if preset == "tiny" else (16 if cuda else 4))
        rows = []
        for variant in args.variants:
            r = run_child(__file__, f"{preset}:{variant}:{batch}", args)
            if r is None:
                failed.append(f"{preset} {variant}")
                continue
            r.update(variant=variant)
            rows.append(r)
        if not rows:
            continue
        if cuda:
            device = rows[0]["device"]
            peak_flops = args.peak_flops or device_peak_flops(device)
        config = GPTConfig.from_preset(preset)
        base = next((r for r in rows if r["variant"] == "plain"), rows[0])
        z2 = next((r for r in rows if r["variant"] == "ds-z2"), None)
        columns = {
            "variant": "{}",
            "optimizer": "{}",
            "step time": "{:.3f} s",
            f"vs {base['variant']}": "{:.2f}×",
            "tokens/s": "{:,.0f}",
            "TFLOP/s": "{:.3f}",
            **({"MFU": "{:.1f}%"} if peak_flops else {}),
            "peak memory": "{:.2f} GiB",
            "activations": "{:.2f} GiB",
            "activations vs ds-z2": "{:.2f}×",
        }
        t = benchlib.table(f"{preset}, batch {batch} × {rows[0]['seq_len']}", columns)
        for r in rows:
            tps = r["tokens"] / r["step_time"]
            tflops = tps * flops_per_token(config, r["seq_len"]) / 1e12
            act = r["activation_bytes"]
            t["rows"].append(
                [
                    r["variant"],
                    r["optimizer"],
                    r["step_time"],
                    r["step_time"] / base["step_time"],
                    tps,
                    tflops,
                    *([100 * tflops * 1e12 / peak_flops] if peak_flops else []),
                    r["peak_bytes"] / 2**30,
                    act / 2**30,
                    act / z2["activation_bytes"] if z2 and z2["activation_bytes"] else None,
                ]
            )
        tables.append(t)
    notes = [
        f"One process per variant, bf16, one optimiser step per batch; step time: median of {args.steps} "
        f"step(s) after {args.warmup} warm-up. Activations: bytes autograd holds for the backward pass "
        "(parameters excluded). Peak memory: "
        + (
            "CUDA `max_memory_allocated`."
            if cuda
            else "growth of the process's peak RSS during the steps (coarse: the allocator keeps memory)."
        )
    ]
    if not peak_flops:
        notes.append("MFU is not given: no known peak for this device (pass `--peak-flops`).")
    if failed:
        notes.append(f"Failed (see the run's stderr): {', '.join(failed)}.")
    result = benchlib.result(
        "train",
        "Training step: a plain PyTorch loop against DeepSpeed ZeRO stages",
        device,
        tables,
        notes,
        quick=args.quick,
    )
    benchlib.emit(result, args.json)


if __name__ == "__main__":
    main()
