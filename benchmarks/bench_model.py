"""Forward + backward throughput of gpt1-ds's GPT against HF's OpenAIGPTLMHeadModel.

Both models hold the same weights (ours is imported from the HF one) and see the
same batches, in training mode, with the same loss (mean next-token cross-entropy).
They are timed in alternation, so that both meet the same machine state; the
median of the repeats is reported. Prints a markdown table; ``--json PATH`` writes
it as JSON too (``benchmarks/benchlib.py``).

    python benchmarks/bench_model.py                     # gpt1 and tiny, fp32 and bf16
    python benchmarks/bench_model.py --presets tiny --repeats 5
    python benchmarks/bench_model.py --quick             # tiny, fp32, 4 × 64: a check in seconds
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import benchlib
import torch
import torch.nn.functional as F
from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

from gpt1_ds.hf import config_to_hf, import_hf
from gpt1_ds.metrics import flops_per_token
from gpt1_ds.model import GPTConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{benchlib.cpu_name()}, {torch.get_num_threads()} threads"


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds per step, mean of ``n`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def bench_preset(preset: str, dtype: str, args: argparse.Namespace, device: torch.device) -> dict:
    config = GPTConfig.from_preset(preset)
    T = min(args.seq_len, config.n_positions)
    batch = args.batch or (2 if preset == "gpt1" else 16)
    torch.manual_seed(0)
    hf = OpenAIGPTLMHeadModel(OpenAIGPTConfig(**config_to_hf(config))).to(device).train()
    ours = import_hf(hf).to(device).train()
    ids = torch.randint(0, config.vocab_size, (batch, T + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = (
        torch.autocast(device.type, dtype=DTYPES[dtype]) if DTYPES[dtype] is not None else nullcontext()
    )

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        with autocast:
            _, loss = ours(x, y)
        loss.backward()

    def step_hf() -> None:
        hf.zero_grad(set_to_none=True)
        with autocast:
            logits = hf(x).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()

    for _ in range(args.warmup):
        step_ours()
        step_hf()
    t_ours, t_hf = [], []
    for _ in range(args.repeats):
        t_ours.append(time_steps(step_ours, args.steps, device))
        t_hf.append(time_steps(step_hf, args.steps, device))
    tokens = batch * T
    ours_tps = tokens / statistics.median(t_ours)
    hf_tps = tokens / statistics.median(t_hf)
    return {
        "preset": preset,
        "dtype": dtype,
        "batch": batch,
        "seq_len": T,
        "ours_tokens_per_sec": ours_tps,
        "hf_tokens_per_sec": hf_tps,
        "speedup": ours_tps / hf_tps,
        "ours_tflops": ours_tps * flops_per_token(config, T) / 1e12,
    }


QUICK = {"presets": ["tiny"], "dtypes": ["fp32"], "batch": 4, "seq_len": 64, "repeats": 2, "steps": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["gpt1", "tiny"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batch", type=int, help="sequences per step (default: 2 for gpt1, 16 otherwise)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = benchlib.parse_args(parser, QUICK)
    device = torch.device(args.device)

    rows = [bench_preset(p, d, args, device) for p in args.presets for d in args.dtypes]
    columns = {
        "model": "{}",
        "dtype": "{}",
        "batch × T": "{}",
        "gpt1-ds tokens/s": "{:,.0f}",
        "HF tokens/s": "{:,.0f}",
        "gpt1-ds / HF": "{:.2f}×",
        "gpt1-ds TFLOP/s": "{:.3f}",
    }
    cells = [
        [
            r["preset"],
            r["dtype"],
            f"{r['batch']} × {r['seq_len']}",
            r["ours_tokens_per_sec"],
            r["hf_tokens_per_sec"],
            r["speedup"],
            r["ours_tflops"],
        ]
        for r in rows
    ]
    result = benchlib.result(
        "model",
        "Model: forward + backward against HF `OpenAIGPTLMHeadModel`",
        device_name(device),
        [benchlib.table("", columns, cells)],
        [
            f"Same weights, same batches, training mode, timed in alternation "
            f"(median of {args.repeats} repeats of {args.steps} step(s) after {args.warmup} warm-up)."
        ],
        quick=args.quick,
    )
    benchlib.emit(result, args.json)


if __name__ == "__main__":
    main()
