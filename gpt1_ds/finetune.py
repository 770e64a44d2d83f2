"""Fine-tune GPT-1 on a downstream task with DeepSpeed (Radford et al., 2018, §3.2).

    deepspeed gpt1_ds/finetune.py --deepspeed_config ds_configs/finetune.json \\
        --task sst2 --train data/glue/sst2/stsa.binary.train --dev data/glue/sst2/stsa.binary.dev \\
        --init RUN/checkpoints --run-dir RUN2 [key=value ...] [ds.key.path=value ...]

Like ``gpt1_ds.train`` it also runs under ``torchrun``, ``srun``, ``mpirun`` and as a
plain process. The pretrained model (our checkpoint, an HF directory, or ``none`` for
a random init) gets a linear head on the last layer's state at the ``<extract>``
token (``gpt1_ds.tasks`` frames the inputs); the loss is the task loss plus
``lm_coef`` (0.5) × the language-modelling loss on the same tokens. GPT-1's recipe is
the default: lr 6.25e-5, batch 32, 3 epochs, linear warm-up over 0.2% of the steps
then linear decay to 0 (``WarmupDecayLR``), classifier dropout 0.1.

After each epoch the dev set is scored (accuracy; F1 for two classes; Pearson and
Spearman for similarity scores), a checkpoint is saved, and the best one (by the
task's main metric) is kept: ``RUN2/best.json`` names it, ``RUN2/results.json``
holds every epoch's metrics. Exit codes as in train.py (75: preempted, resumable).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_prep.tokenizer import MODEL_NAME, Tokenizer
from gpt1_ds import checkpoint, distributed
from gpt1_ds.config import FinetuneConfig, load_ds_config, resolve_ds_config
from gpt1_ds.export import load_model
from gpt1_ds.metrics import Monitor
from gpt1_ds.model import GPT, IGNORE_INDEX, GPTConfig
from gpt1_ds.tasks import Encoded, TaskData, collate, encode, main_metric, metrics
from gpt1_ds.train import (
    PREEMPTED_EXIT,
    Preemption,
    apply_ds_overrides,
    build_engine,
    dropout_seed,
    memory_metrics,
    parse_launch_args,
    setup_logging,
)

log = logging.getLogger("gpt1_ds.finetune")

DEFAULT_DS_CONFIG = "ds_configs/finetune.json"


class TaskModel(nn.Module):
    """GPT plus a linear head on the ``<extract>`` state: one head for all four framings.

    Input [B, K, T] (K sequences per example); the extract states [B, K, C] go to the head:
    classification / entailment: K = 1, scores [B, classes]; similarity: K = 2 orders,
    states added, scores [B, 1 or 2]; multiple choice: one score per choice, [B, K].
    """

    def __init__(self, gpt: GPT, data: TaskData, lm_coef: float, clf_pdrop: float) -> None:
        super().__init__()
        self.gpt = gpt
        self.kind, self.regression, self.lm_coef = data.kind, data.regression, lm_coef
        self.clf_dropout = nn.Dropout(clf_pdrop)
        self.head = nn.Linear(gpt.config.n_embd, data.num_outputs)
        nn.init.normal_(self.head.weight, std=gpt.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def scores(self, h: torch.Tensor, extract_pos: torch.Tensor) -> torch.Tensor:
        """Head outputs from the hidden states h [B*K, T, C] at extract_pos [B, K]."""
        B, K = extract_pos.shape
        C = h.size(-1)
        idx = extract_pos.reshape(B * K, 1, 1).expand(-1, 1, C)  # [B*K, 1, C]
        feats = self.clf_dropout(h.gather(1, idx).view(B, K, C))  # [B, K, C]
        if self.kind == "multiple_choice":
            return self.head(feats).squeeze(-1)  # [B, K]
        if self.kind == "similarity":
            return self.head(feats.sum(1))  # [B, 1 or 2]: both orders added
        return self.head(feats[:, 0])  # [B, classes]

    def forward(
        self,
        input_ids: torch.Tensor,
        extract_pos: torch.Tensor,
        lm_targets: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Scores; with labels also (scores, loss, task loss, LM loss), loss = task + lm_coef × LM."""
        B, K, T = input_ids.shape
        h = self.gpt.hidden_states(input_ids.view(B * K, T))  # [B*K, T, C]
        scores = self.scores(h, extract_pos)
        if labels is None:
            return (scores,)
        if self.regression:
            task_loss = F.mse_loss(scores.float().squeeze(-1), labels.float())
        else:
            task_loss = F.cross_entropy(scores.float(), labels)
        lm_loss = torch.zeros((), device=h.device)
        if self.lm_coef > 0 and lm_targets is not None:
            logits = self.gpt.lm_head(h)  # [B*K, T, V]
            lm_loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), lm_targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        loss = task_loss + self.lm_coef * lm_loss
        return scores, loss, task_loss.detach(), lm_loss.detach()


def predictions(scores: torch.Tensor, regression: bool) -> torch.Tensor:
    """Class (or choice) indices, or the regression scores."""
    return scores.float().squeeze(-1) if regression else scores.argmax(-1)


def epoch_batches(n: int, micro: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch: a seeded shuffle, dealt round-robin to the ranks;
    every rank gets the same number (the remainder is left out, a different one each epoch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch)).tolist()
    count = n // world // micro * micro
    mine = perm[rank::world][:count]
    return [mine[i : i + micro] for i in range(0, count, micro)]


def evaluate(
    engine: Any, dev: list[Encoded], data: TaskData, batch: int, pad_id: int, device: torch.device
) -> dict[str, float]:
    """Dev metrics (and the task loss) over every rank's share; every rank gets the same numbers."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(dev), world))
    chunks = [mine[i : i + batch] for i in range(0, len(mine), batch)]
    n = torch.tensor([len(chunks)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)  # every rank runs as many forwards (ZeRO-3 gathers)
    engine.eval()
    out: list[tuple[int, float, float]] = []  # (index, prediction, task loss)
    with torch.no_grad():
        for i in range(int(n.item())):
            idx = chunks[i] if i < len(chunks) else [0]
            b = {k: v.to(device) for k, v in collate([dev[j] for j in idx], pad_id, data.regression).items()}
            (scores,) = engine(b["input_ids"], b["extract_pos"])
            if i >= len(chunks):
                continue
            pred = predictions(scores, data.regression).tolist()
            scores, labels = scores.float(), b["labels"]
            losses = (
                F.mse_loss(scores.squeeze(-1), labels.float(), reduction="none")
                if data.regression
                else F.cross_entropy(scores, labels, reduction="none")
            ).tolist()
            out += zip(idx, map(float, pred), losses, strict=True)
    engine.train()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, out)
    rows = sorted(r for part in gathered for r in part)
    preds = np.array([r[1] for r in rows])
    labels = np.array([dev[r[0]].label for r in rows])
    result = metrics(preds, labels, data)
    result["loss"] = float(np.mean([r[2] for r in rows]))
    return result


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], list[str]]:
    flags = ("task", "train", "dev", "init", "run_dir", "tokenizer")
    return parse_launch_args(
        argv,
        "gpt1_ds.finetune",
        __doc__,
        DEFAULT_DS_CONFIG,
        "fine-tuning config YAML (FinetuneConfig fields)",
        {flag: f"the config's {flag}" for flag in flags},
    )


def load_backbone(cfg: FinetuneConfig) -> tuple[GPT, Tokenizer, Path]:
    """The pretrained GPT (or a random one), its tokenizer and the tokenizer's path, checked
    against each other."""
    if cfg.init == "none":
        gpt, found = GPT(GPTConfig.from_preset(cfg.model, **cfg.model_overrides)), None
    else:
        gpt, found = load_model(cfg.init)
    path = cfg.tokenizer or found
    if path is None:
        raise ValueError(f"no tokenizer.model found with {cfg.init!r}: pass --tokenizer")
    tok = Tokenizer(path)
    if tok.sp.get_piece_size() > gpt.config.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tok.sp.get_piece_size()} pieces, the model's vocab_size is "
            f"{gpt.config.vocab_size}"
        )
    return gpt.train(), tok, Path(path)


def main(argv: list[str] | None = None) -> int:
    preempt = Preemption()
    args, over, ds_over = parse_args(argv)
    cfg = FinetuneConfig.from_yaml(args.config, over)

    rank, world, local_rank = distributed.init()
    setup_logging(rank)
    device = distributed.device(local_rank)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"

    # ---- data, model and config are checked before any compute ---------------------------
    data = TaskData(cfg.task, cfg.fields, cfg.label_field, cfg.labels, cfg.similarity, cfg.on_error)
    train_examples = data.read(cfg.train, train=True)[: cfg.max_train_examples]
    dev_examples = data.read(cfg.dev)
    torch.manual_seed(cfg.seed)
    gpt, tok, tok_path = load_backbone(cfg)
    n_ctx = gpt.config.n_positions
    train_set = encode(train_examples, data, tok, n_ctx)
    dev_set = encode(dev_examples, data, tok, n_ctx)
    ds_raw = load_ds_config(args.ds_config)
    apply_ds_overrides(ds_raw, ds_over)
    per_rank = len(train_set) // world // cfg.micro_batch_size
    ds_cfg = resolve_ds_config(
        ds_raw, cfg, world, lambda accum: per_rank // accum, args.ds_config, device.type
    )
    accum = ds_cfg["gradient_accumulation_steps"]
    steps_per_epoch = per_rank // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"{cfg.train}: {len(train_set)} examples make no full step of {ds_cfg['train_batch_size']}"
        )
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    layout = {
        "world_size": world,
        "micro_batch_size": cfg.micro_batch_size,
        "accumulation": accum,
        "train_examples": len(train_set),
        "labels": data.labels,
    }
    model = TaskModel(gpt, data, cfg.lm_coef, cfg.clf_pdrop)
    engine, scheduler = build_engine(model, ds_cfg)

    # ---- resume --------------------------------------------------------------------------
    found = [checkpoint.find_resume(ckpt_dir, cfg.resume) if rank == 0 else None]
    dist.broadcast_object_list(found)
    step, history, best = 0, [], None
    if found[0] is not None:
        client = checkpoint.load(engine, *found[0])
        if client.get("layout") != layout:
            raise ValueError(
                f"checkpoint {found[0][0] / found[0][1]} was written with {client.get('layout')}, this "
                f"run has {layout}: the epochs would not line up; resume with the same settings or "
                "resume=none"
            )
        step, history, best = client["step"], client["history"], client["best"]
        log.info("resumed from %s at step %d", found[0][0] / found[0][1], step)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tok_path.resolve() != (run_dir / MODEL_NAME).resolve():  # the run's models carry their tokenizer
            shutil.copyfile(tok_path, run_dir / MODEL_NAME)
        checkpoint.clear_preempted(run_dir)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2))
    monitor = Monitor(
        str(run_dir / "tensorboard") if rank == 0 else None, purge_step=step + 1 if step else None
    )
    counts = Counter(int(e.label) for e in train_examples) if not data.regression else None
    majority = None
    if counts and data.kind != "multiple_choice":
        top = counts.most_common(1)[0][0]
        majority = float(np.mean([int(e.label) == top for e in dev_examples]))
    log.info(
        "fine-tuning %s (%s): %d train / %d dev examples%s; init %s; %d ranks × micro-batch %d "
        "× accumulation %d = %d; %d steps (%d per epoch); lm_coef %g; majority class on dev %s",
        cfg.task,
        data.kind,
        len(train_set),
        len(dev_set),
        f" ({data.skipped} malformed rows skipped)" if data.skipped else "",
        cfg.init,
        world,
        cfg.micro_batch_size,
        accum,
        ds_cfg["train_batch_size"],
        total_steps,
        steps_per_epoch,
        cfg.lm_coef,
        f"{100 * majority:.1f}%" if majority is not None else "n/a",
    )
    key = main_metric(data)

    def client_state() -> dict[str, Any]:
        return {
            "step": step,
            "history": history,
            "best": best,
            "layout": layout,
            "rng": {"scheme": "dropout_seed(seed, rank, step, micro)", "seed": cfg.seed},
            "config": {
                "finetune": asdict(cfg),
                "model_config": gpt.config.to_dict(),
                "task": {"kind": data.kind, "labels": data.labels, "num_outputs": data.num_outputs},
            },
        }

    def write_json(name: str, value: Any) -> None:
        if rank == 0:
            tmp = run_dir / f".{name}.tmp"
            tmp.write_text(json.dumps(value, indent=2) + "\n")
            os.replace(tmp, run_dir / name)

    order: list[list[int]] = []
    order_epoch = -1
    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", disable=rank != 0, leave=False)
    flags = torch.zeros(2, device=device)
    window = torch.zeros(3, device=device)  # loss, task loss, LM loss sums
    window_steps, window_time, exit_code = 0, 0.0, 0
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order = epoch_batches(len(train_set), cfg.micro_batch_size, rank, world, cfg.seed, epoch)
            order_epoch = epoch
        start = time.perf_counter()
        for micro in range(accum):
            idx = order[within * accum + micro]
            b = {
                k: v.to(device)
                for k, v in collate([train_set[i] for i in idx], tok.pad_id, data.regression).items()
            }
            torch.manual_seed(dropout_seed(cfg.seed, rank, step, micro))
            _, loss, task_loss, lm_loss = engine(
                b["input_ids"], b["extract_pos"], b["lm_targets"], b["labels"]
            )
            engine.backward(loss)
            engine.step()
            window += torch.stack([loss.detach().float(), task_loss.float(), lm_loss.float()]) / accum
        step += 1
        window_steps += 1
        window_time += time.perf_counter() - start
        bar.update(1)
        flags[0] = float(not bool(torch.isfinite(window).all()))
        flags[1] = float(preempt.signal is not None)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            log.error("step %d: the loss is not finite; stopping", step)
            exit_code = 1
            break
        if step % cfg.log_interval == 0 or step == total_steps:
            dist.all_reduce(window)
            loss_v, task_v, lm_v = (window / (world * window_steps)).tolist()
            lr = scheduler.get_last_lr()[0] if scheduler is not None else engine.get_lr()[0]
            monitor.scalars(
                {
                    "finetune/loss": loss_v,
                    "finetune/task_loss": task_v,
                    "finetune/lm_loss": lm_v,
                    "finetune/lr": lr,
                    "finetune/step_time": window_time / window_steps,
                    **memory_metrics(device),
                },
                step,
            )
            if rank == 0:
                tqdm.write(
                    f"step {step}/{total_steps} | epoch {epoch + 1} | loss {loss_v:.4f} (task {task_v:.4f}, "
                    f"LM {lm_v:.4f}) | lr {lr:.3e} | {window_time / window_steps:.3f} s/step"
                )
            window.zero_()
            window_steps, window_time = 0, 0.0
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if end_of_epoch:
            result = evaluate(engine, dev_set, data, 2 * cfg.micro_batch_size, tok.pad_id, device)
            history.append({"step": step, "epoch": (step - 1) // steps_per_epoch + 1, **result})
            monitor.scalars({f"dev/{k}": v for k, v in result.items()}, step)
            improved = best is None or result[key] > best[key]
            if improved:
                best = {"step": step, "tag": checkpoint.tag_for(step), **result}
            log.info(
                "epoch %d (step %d): dev %s%s",
                history[-1]["epoch"],
                step,
                ", ".join(f"{k} {v:.4f}" for k, v in result.items()),
                " (best)" if improved else "",
            )
        if end_of_epoch or flags[1]:
            tag = checkpoint.save(
                engine, ckpt_dir, step, client_state(), cfg.keep_checkpoints, best and best["tag"]
            )
            log.info("checkpoint %s (%s)", ckpt_dir / tag, "signal" if flags[1] else "end of epoch")
            write_json(
                "results.json", {"task": cfg.task, "majority_dev": majority, "history": history, "best": best}
            )
            if best is not None:
                write_json("best.json", best)
        monitor.flush()
        if flags[1]:
            exit_code = PREEMPTED_EXIT
            if rank == 0:
                checkpoint.mark_preempted(run_dir, step)
            break
    bar.close()
    monitor.close()
    if exit_code == PREEMPTED_EXIT:
        log.warning("preempted at step %d: checkpoint saved, exiting with %d", step, PREEMPTED_EXIT)
    elif exit_code == 0 and best is not None:
        log.info(
            "done: best dev %s %.4f at step %d (%s)%s; results in %s",
            key,
            best[key],
            best["step"],
            ckpt_dir / best["tag"],
            f"; majority class {majority:.4f}" if majority is not None else "",
            run_dir / "results.json",
        )
    dist.barrier()
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    distributed.exit_now(main())
