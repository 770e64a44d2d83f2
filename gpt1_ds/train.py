"""Pretrain GPT-1 with DeepSpeed.

    deepspeed gpt1_ds/train.py --deepspeed_config ds_configs/zero2.json \\
        --config configs/gpt1.yaml --data DIR --run-dir RUN [key=value ...] [ds.key.path=value ...]

The same script runs under ``torchrun``, ``srun``, ``mpirun`` and as a plain
``python -m gpt1_ds.train`` (one process); see ``gpt1_ds.distributed``.
``key=value`` overrides the run config (``max_steps=100``,
``model_overrides.n_layer=6``); ``ds.a.b=value`` overrides the DeepSpeed JSON
(``ds.scheduler.params.warmup_num_steps=100``). Output: ``RUN/config.yaml``,
``RUN/ds_config.json`` (the resolved JSON), ``RUN/checkpoints/``,
``RUN/tensorboard/``.

Exit codes: 0 done; 75 preempted (SIGUSR1 or SIGTERM: the step in flight was
finished and a checkpoint saved; rerun with ``resume=auto`` to continue);
1 on error (e.g. a NaN/Inf loss, named with its step).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_prep.common import sha256_file
from data_prep.tokenizer import MODEL_NAME, Tokenizer
from gpt1_ds import checkpoint, distributed
from gpt1_ds.config import RunConfig, load_ds_config, parse_value, resolve_ds_config
from gpt1_ds.data import EvalLoader, TrainLoader
from gpt1_ds.generate import sample
from gpt1_ds.metrics import Monitor, device_peak_flops, flops_per_token
from gpt1_ds.model import GPT, IGNORE_INDEX, param_groups

log = logging.getLogger("gpt1_ds.train")

PREEMPTED_EXIT = 75
DEFAULT_DS_CONFIG = "ds_configs/zero2.json"


def parse_launch_args(
    argv: list[str] | None,
    prog: str,
    description: str,
    default_ds_config: str,
    config_help: str,
    flags: dict[str, str],
) -> tuple[argparse.Namespace, list[str], list[str]]:
    """The command line shared by train.py and finetune.py: ``--deepspeed_config``, ``--config``,
    the launchers' own flags, ``flags`` (``--name`` → the config's ``name``), then ``key=value``
    (config) and ``ds.key=value`` (DeepSpeed JSON) overrides. Returns (args, config overrides,
    DeepSpeed overrides); a flag given becomes a config override after the others."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--deepspeed_config",
        "--ds-config",
        dest="ds_config",
        default=default_ds_config,
        help=f"DeepSpeed JSON (default {default_ds_config})",
    )
    parser.add_argument("--config", help=config_help)
    for flag, help_text in flags.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=help_text)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value (config) or ds.key=value (DeepSpeed JSON)")
    args = parser.parse_args(argv)
    over = [o for o in args.overrides if not o.startswith("ds.")]
    ds_over = [o[3:] for o in args.overrides if o.startswith("ds.")]
    over += [f"{flag}={json.dumps(getattr(args, flag))}" for flag in flags if getattr(args, flag) is not None]
    return args, over, ds_over


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], list[str]]:
    return parse_launch_args(
        argv,
        "gpt1_ds.train",
        __doc__,
        DEFAULT_DS_CONFIG,
        "run config YAML (configs/gpt1.yaml, configs/tiny-cpu.yaml)",
        {
            "data": "dataset directory (overrides the config's data)",
            "run_dir": "run directory (overrides the config's run_dir)",
        },
    )


def apply_ds_overrides(ds: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override ds.{item!r} is not ds.key=value")
        node = ds
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = parse_value(value)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Preemption:
    """SIGUSR1/SIGTERM set a flag; the loop finishes its step, saves and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum


def dropout_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The RNG seed of one micro-batch: dropout is a function of (seed, rank, step), so a
    resumed run draws the same masks as the uninterrupted one without saving RNG states."""
    return (((seed * 1_000_003 + rank) * 1_000_003 + step) * 1024 + micro) % (2**63)


def evaluate(engine: Any, loader: EvalLoader, device: torch.device) -> tuple[float, float]:
    """Mean next-token loss and perplexity over the validation batches of every rank."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target count
    n = torch.tensor([len(loader)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)  # every rank runs as many forwards (ZeRO-3 gathers)
    it = iter(loader)
    with torch.no_grad():
        for _ in range(int(n.item())):
            batch = next(it, None)
            if batch is None:  # this rank has fewer sequences: a forward that counts nothing
                x = torch.zeros(1, loader.seq_len, dtype=torch.long)
                y = torch.full_like(x, IGNORE_INDEX)
            else:
                x, y = batch["input_ids"], batch["targets"]
            x, y = x.to(device), y.to(device)
            logits = engine(x)
            count = (y != IGNORE_INDEX).sum()
            if count:
                loss = torch.nn.functional.cross_entropy(
                    logits.float().view(-1, logits.size(-1)),
                    y.view(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                total += torch.stack([loss.double(), count.double()])
    dist.all_reduce(total)
    engine.train()
    mean = (total[0] / total[1]).item()
    return mean, math.exp(min(mean, 50.0))


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "memory/allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
            "memory/peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    import psutil

    return {"memory/rss_gb": psutil.Process().memory_info().rss / 2**30}


def generate_text(engine: Any, tok: Tokenizer, run: RunConfig, device: torch.device, step: int) -> str:
    """A sample from the current model (every rank runs it: ZeRO-3 needs every rank's part)."""
    prompt = torch.tensor([tok.encode(run.sample_prompt)], dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(run.seed + step)
    out = sample(
        engine.module, prompt, run.sample_tokens, temperature=0.8, top_k=40, generator=gen, stop_id=tok.eod_id
    )
    return tok.decode([i for i in out[0].tolist() if i != tok.eod_id])


def build_engine(model: GPT, ds_cfg: dict[str, Any]) -> tuple[Any, Any]:
    """The DeepSpeed engine and its LR scheduler, with weight decay through parameter groups.

    DeepSpeed's schedulers start at iteration -1 and step after each update, so the
    first two updates would both get lr(0); one step here makes update s (from 0)
    use lr(s): 0 → peak over the warm-up, and lr 0 exactly at the last update.
    """
    import deepspeed

    weight_decay = ds_cfg.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay), config=ds_cfg
    )
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", 0) == -1:
        scheduler.step()
    return engine, scheduler


def load_init(model: GPT, source: str, tok: Tokenizer) -> None:
    """Copy pretrained weights into ``model``; the shapes and the tokenizer must be the same."""
    from gpt1_ds.export import load_model

    pretrained, tokenizer = load_model(source)
    shape = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
    ours, theirs = model.config.to_dict(), pretrained.config.to_dict()
    differ = {k: (theirs[k], ours[k]) for k in shape if ours[k] != theirs[k]}
    if differ:
        raise ValueError(f"init={source}: the model differs from the run config's: {differ} (init, run)")
    if tokenizer is not None and sha256_file(tokenizer) != tok.sha256:
        raise ValueError(f"init={source}: its tokenizer {tokenizer} is not the dataset's")
    model.load_state_dict(pretrained.state_dict())
    log.info("initialised from %s", source)


def main(argv: list[str] | None = None) -> int:
    preempt = Preemption()  # from the start: a signal during start-up is honoured after the first step
    args, run_over, ds_over = parse_args(argv)
    run = RunConfig.from_yaml(args.config, run_over)
    import deepspeed

    rank, world, local_rank = distributed.init()
    setup_logging(rank)
    device = distributed.device(local_rank)
    run_dir, data_dir = Path(run.run_dir), Path(run.data)
    ckpt_dir = run_dir / "checkpoints"

    # ---- everything that can contradict is checked before any compute -------------------
    tok = Tokenizer(data_dir / MODEL_NAME)
    model_cfg = run.model_config()
    checks = dict(seq_len=model_cfg.n_positions, vocab_size=model_cfg.vocab_size, tokenizer_sha256=tok.sha256)
    train_loader = TrainLoader(
        data_dir / "train",
        run.micro_batch_size,
        rank=rank,
        world_size=world,
        seed=run.seed,
        num_workers=run.num_workers,
        slots=run.data_slots,
        shuffle_window=run.shuffle_window,
        pin_memory=device.type == "cuda",
        **checks,
    )
    val_loader = EvalLoader(
        data_dir / "val",
        run.micro_batch_size,
        rank=rank,
        world_size=world,
        max_batches=run.eval_batches,
        **checks,
    )
    ds_raw = load_ds_config(args.ds_config)
    apply_ds_overrides(ds_raw, ds_over)
    ds_cfg = resolve_ds_config(
        ds_raw, run, world, lambda accum: len(train_loader) // accum, args.ds_config, device.type
    )
    accum = ds_cfg["gradient_accumulation_steps"]
    if len(train_loader) < accum:
        raise ValueError(
            f"{data_dir}/train gives {len(train_loader)} micro-batches per rank per epoch, "
            f"fewer than one step's {accum}"
        )
    steps_per_epoch = len(train_loader) // accum
    total_steps = run.max_steps if run.max_steps is not None else run.epochs * steps_per_epoch
    T = model_cfg.n_positions
    tokens_per_step = ds_cfg["train_batch_size"] * T

    if run.activation_checkpointing and "activation_checkpointing" in ds_cfg:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_cfg)
    torch.manual_seed(run.seed)
    model = GPT(model_cfg)
    if run.init:
        load_init(model, run.init, tok)
    engine, scheduler = build_engine(model, ds_cfg)

    # ---- resume --------------------------------------------------------------------------
    found = checkpoint.find_resume(ckpt_dir, run.resume) if rank == 0 else None
    found = [found]
    dist.broadcast_object_list(found)
    found = found[0]
    step, tokens_seen = 0, 0
    if found is not None:
        client = checkpoint.load(engine, *found)
        saved_model = client.get("config", {}).get("model_config")
        if saved_model is not None and saved_model != model_cfg.to_dict():
            raise ValueError(
                f"checkpoint {found[0] / found[1]} holds model {saved_model}, "
                f"the run config asks for {model_cfg.to_dict()}"
            )
        step, tokens_seen = client["step"], client["tokens_seen"]
        train_loader.load_state_dict(client["loader"])
        log.info("resumed from %s at step %d", found[0] / found[1], step)

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clear_preempted(run_dir)
        (run_dir / "config.yaml").write_text(run.to_yaml())
        (run_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2))
        for name in (MODEL_NAME, "tokenizer.json"):  # the run's checkpoints are usable on their own
            if (data_dir / name).is_file():
                shutil.copyfile(data_dir / name, run_dir / name)
    monitor = Monitor(
        str(run_dir / "tensorboard") if rank == 0 else None, purge_step=step + 1 if step else None
    )
    peak = run.peak_flops or (
        device_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    )
    fpt = flops_per_token(model_cfg, T)
    log.info(
        "gpt1-ds: %s, %d ranks (%s), micro-batch %d × accumulation %d × %d ranks = %d sequences of %d; "
        "%d steps (%d per epoch); ZeRO stage %s; %s",
        run.model,
        world,
        device.type,
        run.micro_batch_size,
        accum,
        world,
        ds_cfg["train_batch_size"],
        T,
        total_steps,
        steps_per_epoch,
        ds_cfg.get("zero_optimization", {}).get("stage", 0),
        "bf16"
        if ds_cfg.get("bf16", {}).get("enabled")
        else "fp16"
        if ds_cfg.get("fp16", {}).get("enabled")
        else "fp32",
    )

    def save(reason: str) -> None:
        client = {
            "step": step,
            "tokens_seen": tokens_seen,
            "val_ppl": last_ppl,
            "loader": train_loader.state_dict(),
            "rng": {"scheme": "dropout_seed(seed, rank, step, micro)", "seed": run.seed},
            "config": {
                "run": json.loads(json.dumps(vars(run), default=str)),
                "model_config": model_cfg.to_dict(),
            },
        }
        tag = checkpoint.save(engine, ckpt_dir, step, client, run.keep_checkpoints)
        log.info("checkpoint %s (%s)", ckpt_dir / tag, reason)

    first_ppl = last_ppl = None
    if step == 0:
        val_loss, first_ppl = evaluate(engine, val_loader, device)
        last_ppl = first_ppl
        monitor.scalars({"val/loss": val_loss, "val/ppl": first_ppl}, 0)
        log.info("step 0: val loss %.4f, ppl %.2f", val_loss, first_ppl)

    flags = torch.zeros(2, device=device)  # [non-finite loss, signal], agreed across ranks each step
    batches = iter(())
    window_loss, window_steps, window_time = 0.0, 0, 0.0
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=rank != 0,
        dynamic_ncols=True,
        leave=False,
    )
    saved_at = step
    exit_code = 0
    while step < total_steps:
        start = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            batch = next(batches, None)
            if batch is None:
                batches = iter(train_loader)  # the next epoch (the loader keeps its workers)
                batch = next(batches)
            torch.manual_seed(dropout_seed(run.seed, rank, step, micro))
            _, loss = engine(
                batch["input_ids"].to(device, non_blocking=True),
                batch["targets"].to(device, non_blocking=True),
            )
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float() / accum
        step += 1
        tokens_seen += tokens_per_step
        flags[0] = float(not torch.isfinite(step_loss))
        flags[1] = float(preempt.signal is not None)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            log.error(
                "step %d: loss is %s; stopping (resume from %s)",
                step,
                step_loss.item(),
                checkpoint.complete_tags(ckpt_dir)[-1:] or "no checkpoint",
            )
            exit_code = 1
            break
        elapsed = time.perf_counter() - start
        window_loss += step_loss.item()
        window_steps += 1
        window_time += elapsed
        bar.update(1)

        if step % run.log_interval == 0 or step == total_steps:
            loss_t = torch.tensor([window_loss / window_steps], device=device)
            dist.all_reduce(loss_t)
            train_loss = loss_t.item() / world
            step_time = window_time / window_steps
            tps = tokens_per_step / step_time
            tflops = tps * fpt / 1e12
            mfu = tps * fpt / (peak * world) if peak else None
            lr = scheduler.get_last_lr()[0] if scheduler is not None else engine.get_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else None
            monitor.scalars(
                {
                    "train/loss": train_loss,
                    "train/ppl": math.exp(min(train_loss, 50.0)),
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/tokens_per_sec": tps,
                    "train/tflops": tflops,
                    "train/mfu": mfu,
                    "train/step_time": step_time,
                    "train/tokens_seen": tokens_seen,
                    **memory_metrics(device),
                },
                step,
            )
            eta = timedelta(seconds=int((total_steps - step) * step_time))
            if rank == 0:
                tqdm.write(
                    f"step {step}/{total_steps} | loss {train_loss:.4f} | lr {lr:.3e} | {tps:,.0f} tok/s"
                    + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                    + f" | ETA {eta}"
                )
            window_loss, window_steps, window_time = 0.0, 0, 0.0

        if step % run.eval_interval == 0 or step == total_steps:
            val_loss, last_ppl = evaluate(engine, val_loader, device)
            monitor.scalars({"val/loss": val_loss, "val/ppl": last_ppl}, step)
            log.info("step %d: val loss %.4f, ppl %.2f", step, val_loss, last_ppl)
        if run.sample_interval and (step % run.sample_interval == 0 or step == total_steps):
            text = generate_text(engine, tok, run, device, step)
            monitor.text("sample", text, step)
            log.info("step %d sample: %s", step, text.replace("\n", " / "))
        if flags[1]:
            save(f"signal {preempt.signal}" if preempt.signal else "signal on another rank")
            saved_at = step
            exit_code = PREEMPTED_EXIT
            if rank == 0:
                checkpoint.mark_preempted(run_dir, step)
            break
        if step % run.checkpoint_interval == 0 or step == total_steps:
            save("interval" if step < total_steps else "end")
            saved_at = step
        monitor.flush()

    bar.close()
    if exit_code == 0 and saved_at != step:
        save("end")
    monitor.close()
    if exit_code == PREEMPTED_EXIT:
        log.warning("preempted at step %d: checkpoint saved, exiting with %d", step, PREEMPTED_EXIT)
    elif exit_code == 0:
        log.info("done: %d steps, %s tokens", step, f"{tokens_seen:,}")
        if first_ppl is not None and last_ppl is not None:
            log.info("validation perplexity: %.1f at step 0 → %.1f at step %d", first_ppl, last_ppl, step)
        log.info("TensorBoard: tensorboard --logdir %s", run_dir / "tensorboard")
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    distributed.exit_now(main())
