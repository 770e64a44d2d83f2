"""What pretraining buys: SST-2 and RTE dev accuracy of the tiny model from a random init
against the same model pretrained on the embedded books, with the same fine-tuning budget.

GPT-1's thesis in miniature. Pretraining: the demo profile (``configs/tiny-cpu.yaml``):
``data_prep.prepare`` on ``data/sample`` with its ``prep`` flags (8,192-piece tokenizer,
sequences of 128) and ``gpt1_ds/train.py`` with the tiny preset and its learning rate on
2 ranks for ``--pretrain-steps``; or ``--pretrained`` names an existing run's checkpoints
(or an HF directory) whose tokenizer comes with it. Fine-tuning: ``gpt1_ds/finetune.py``
on 2 ranks, ``ds_configs/finetune.json``, the same epochs, learning rate and seed for both
inits (the random init has the pretrained model's shape and tokenizer). Prints a markdown
table; ``--json PATH`` writes it as JSON.

    python benchmarks/bench_finetune.py                        # pretrain 1,500 steps, then 4 fine-tunings
    python benchmarks/bench_finetune.py --pretrained runs/demo/run/checkpoints
    python benchmarks/bench_finetune.py --quick                # a check in about a minute
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchlib
import torch

from gpt1_ds.config import RunConfig
from gpt1_ds.loading import load_model

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROFILE = "configs/tiny-cpu.yaml"  # the demo profile: its data prep flags, model and learning rate
GLUE = REPO / "data" / "glue"
TASKS = {
    "sst2": (GLUE / "sst2" / "stsa.binary.train", GLUE / "sst2" / "stsa.binary.dev", 91.3),
    "rte": (GLUE / "rte" / "train.tsv", GLUE / "rte" / "dev.tsv", 56.0),
}
QUICK = {"pretrain_steps": 20, "max_train_examples": 256, "epochs": 1, "tasks": "sst2"}


def run(cmd: list[str], what: str) -> float:
    """Run a command from the repository root; seconds it took. Its output goes to our stderr."""
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed with exit code {done.returncode}")
    return time.perf_counter() - start


def pretrain(work: Path, steps: int, port: int) -> tuple[Path, float]:
    """Prepare the embedded books and pretrain the tiny model; (checkpoints dir, seconds)."""
    data, run_dir = work / "data", work / "pretrain"
    prep = RunConfig.from_yaml(PROFILE).prep  # the demo profile's data, as `make demo` prepares it
    run(
        [
            sys.executable,
            "-m",
            "data_prep.prepare",
            "--input",
            "data/sample",
            "--out",
            str(data),
            *prep,
            "--quiet",
        ],
        "data prep",
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    seconds = run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "gpt1_ds/train.py",
            "--deepspeed_config",
            "ds_configs/zero2.json",
            "--config",
            PROFILE,
            "--data",
            str(data),
            "--run-dir",
            str(run_dir),
            f"max_steps={steps}",
            f"eval_interval={max(steps // 4, 1)}",
            f"checkpoint_interval={steps}",
            "sample_interval=0",
            "log_interval=50",
            f"ds.scheduler.params.warmup_num_steps={max(steps // 20, 1)}",
        ],
        "pretraining",
    )
    return run_dir / "checkpoints", seconds


def finetune(task: str, init: str, args: argparse.Namespace, shape: dict, tokenizer: Path, port: int) -> dict:
    train, dev, _ = TASKS[task]
    run_dir = args.work / f"{task}-{'random' if init == 'none' else 'pretrained'}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "gpt1_ds/finetune.py",
        "--deepspeed_config",
        "ds_configs/finetune.json",
        "--task",
        task,
        "--train",
        str(train),
        "--dev",
        str(dev),
        "--init",
        init,
        "--tokenizer",
        str(tokenizer),
        "--run-dir",
        str(run_dir),
        f"epochs={args.epochs}",
        "log_interval=100",
        f"seed={args.seed}",
        f"ds.optimizer.params.lr={args.lr}",
    ]
    if args.max_train_examples:
        cmd.append(f"max_train_examples={args.max_train_examples}")
    if init == "none":
        cmd += ["model=tiny", *(f"model_overrides.{k}={json.dumps(v)}" for k, v in shape.items())]
    seconds = run(cmd, f"fine-tuning {task} from {init}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"seconds": seconds, **results}


def val_ppl(run_dir: Path) -> str:
    """``first → last`` validation perplexity of a pretraining run, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    ppl = acc.Scalars("val/ppl")
    return f"{ppl[0].value:,.0f} at step {ppl[0].step} → {ppl[-1].value:,.1f} at step {ppl[-1].step}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--pretrained", help="a pretraining run's checkpoints or an HF directory (default: pretrain)"
    )
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--tasks", default="sst2,rte", help="comma-separated: sst2, rte")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (GPT-1: 3)")
    parser.add_argument(
        "--lr", type=float, default=2.5e-4, help="fine-tuning lr (GPT-1's 6.25e-5 is for the 117M model)"
    )
    parser.add_argument("--max-train-examples", type=int)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_finetune")
    parser.add_argument("--port", type=int, default=29870)
    args = benchlib.parse_args(parser, QUICK)
    args.work.mkdir(parents=True, exist_ok=True)

    pretrain_seconds = None
    if args.pretrained:
        source = Path(args.pretrained)
    else:
        source, pretrain_seconds = pretrain(args.work, args.pretrain_steps, args.port)
    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise SystemExit(f"no tokenizer.model found with {source}")
    shape = {k: v for k, v in model.config.to_dict().items() if k != "activation_checkpointing"}
    n_params = model.num_parameters()
    del model

    rows, port = [], args.port + 1
    for task in args.tasks.split(","):
        for init in ("none", str(source)):
            r = finetune(task, init, args, shape, tokenizer, port)
            port += 1
            last = r["history"][-1]
            rows.append(
                [
                    task,
                    "random" if init == "none" else "pretrained",
                    100 * r["best"]["accuracy"],
                    100 * last["accuracy"],
                    100 * last["f1"],
                    100 * r["majority_dev"],
                    TASKS[task][2],
                    r["seconds"],
                ]
            )
    columns = {
        "task": "{}",
        "init": "{}",
        "best dev acc. %": "{:.1f}",
        "final dev acc. %": "{:.1f}",
        "final F1 %": "{:.1f}",
        "majority class %": "{:.1f}",
        "GPT-1 paper %": "{:.1f}",
        "fine-tuning s": "{:.0f}",
    }
    pre = (
        f"pretrained for {args.pretrain_steps} steps ({pretrain_seconds:.0f} s) on the embedded books "
        f"(validation perplexity {val_ppl(source.parent)})"
        if pretrain_seconds is not None
        else f"pretrained: `{source}`"
    )
    notes = [
        f"Tiny model ({shape['n_layer']} layers × {shape['n_embd']}, context {shape['n_positions']}, vocab "
        f"{shape['vocab_size']:,}: {n_params:,} parameters), {pre}. Fine-tuning: 2 ranks, batch 32, "
        f"{args.epochs} epoch(s), lr {args.lr:g} with 0.2% warm-up and linear decay, LM weight 0.5, "
        f"seed {args.seed}; the same for both inits.",
        "The GPT-1 paper's figures are for the 117M model pretrained on BooksCorpus (about 1B tokens).",
    ]
    result = benchlib.result(
        "finetune",
        "Fine-tuning: random init vs pretrained on the embedded books",
        f"{benchlib.cpu_name()}, {torch.get_num_threads()} threads, 2 ranks",
        [benchlib.table("", columns, rows)],
        notes,
        quick=args.quick,
    )
    benchlib.emit(result, args.json)


if __name__ == "__main__":
    main()
