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

import json
import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from gpt1_ds import distributed, ds_config, runner
from gpt1_ds.checkpoint import ClientState, tag_for
from gpt1_ds.config import FinetuneConfig
from gpt1_ds.files import atomic_write_text
from gpt1_ds.heads import TaskModel, predictions, task_loss_of
from gpt1_ds.loading import fit_vocab, load_model
from gpt1_ds.model import GPT, GPTConfig
from gpt1_ds.tasks import Encoded, TaskData, collate, encode, main_metric, scores
from gpt1_ds.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("gpt1_ds.finetune")


def epoch_batches(n: int, micro: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch: a seeded shuffle, dealt round-robin to the ranks;
    every rank gets the same number (the remainder is left out, a different one each epoch)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch)).tolist()
    count = n // world // micro * micro
    mine = perm[rank::world][:count]
    return [mine[i : i + micro] for i in range(0, count, micro)]


def dev_scores(
    engine: Any, dev: list[Encoded], data: TaskData, batch: int, pad_id: int, device: torch.device
) -> dict[str, float]:
    """Dev metrics (and the task loss) over every rank's share; every rank gets the same numbers."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(dev), world))
    chunks = [mine[i : i + batch] for i in range(0, len(mine), batch)]
    engine.eval()
    out: list[tuple[int, float, float]] = []  # (index, prediction, task loss)
    with torch.no_grad():
        for chunk in runner.in_lockstep(chunks, len(chunks), device):
            idx = chunk or [0]  # None: a forward that counts nothing
            b = {k: v.to(device) for k, v in collate([dev[j] for j in idx], pad_id, data.regression).items()}
            (outputs,) = engine(b["input_ids"], b["extract_pos"])
            if chunk is None:
                continue
            pred = predictions(outputs, data.regression).tolist()
            losses = task_loss_of(outputs, b["labels"], data.regression, reduction="none").tolist()
            out += zip(idx, map(float, pred), losses, strict=True)
    engine.train()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, out)
    rows = sorted(r for part in gathered for r in part)
    preds = np.array([r[1] for r in rows])
    labels = np.array([dev[r[0]].label for r in rows])
    result = scores(preds, labels, data)
    result["loss"] = float(np.mean([r[2] for r in rows]))
    return result


def load_backbone(cfg: FinetuneConfig) -> tuple[GPT, Tokenizer]:
    """The pretrained GPT (or a random one) and its tokenizer, checked against each other."""
    if cfg.init == "none":
        gpt, found = GPT(GPTConfig.from_preset(cfg.model, **cfg.model_overrides)), None
    else:
        gpt, found = load_model(cfg.init)
    path = cfg.tokenizer or found
    if path is None:
        raise ValueError(
            f"{cfg.init}: a model without a tokenizer (neither tokenizer.model nor vocab.json + "
            "merges.txt beside it): pass --tokenizer"
        )
    tok = load_tokenizer(path)
    if cfg.tokenizer and found is not None and (own := load_tokenizer(found)).sha256 != tok.sha256:
        raise ValueError(
            f"--tokenizer {path} ({tok.kind}, sha256 {tok.sha256[:12]}) is not the tokenizer of "
            f"{cfg.init}: {found} ({own.kind}, sha256 {own.sha256[:12]})"
        )
    appended = tok.appended and gpt.config.vocab_size == tok.base_size
    gpt = fit_vocab(gpt, tok, append=True)  # GPT-1's task tokens: new rows after its vocabulary
    if appended:
        log.info("%s: task tokens appended as new rows %s (N(0, 0.02))", cfg.init, list(tok.appended))
    elif cfg.init != "none" and cfg.task_tokens == "new":
        renew_task_tokens(gpt, tok)
    return gpt.train(), tok


def renew_task_tokens(gpt: GPT, tok: Tokenizer) -> None:
    """GPT-1's task tokens were new rows at fine-tuning, N(0, 0.02): draw ours afresh the same way
    (the tied head's columns with them). docs/FIDELITY.md."""
    rows = torch.tensor([tok.start_id, tok.delim_id, tok.extract_id])
    with torch.no_grad():
        table = gpt.tokens_embed.weight
        table[rows] = torch.randn(len(rows), table.size(1)) * gpt.config.initializer_range


RULES_BEFORE = {"truncation": "shared", "lm_loss_average": "token", "clf_dropout_mask": "sequence"}
"""The fine-tuning rules a resume must keep, with the behaviour of checkpoints that predate them."""


class Finetuning(runner.Loop):
    """GPT-1's fine-tuning loop: epochs over the task's examples, dev metrics after each."""

    name, prog, config_class = "finetune", "gpt1_ds.finetune", FinetuneConfig
    default_ds_config = "ds_configs/finetune.json"
    config_help = "fine-tuning config YAML (FinetuneConfig fields, configs/tiny-cpu-finetune.yaml)"
    flags: ClassVar[dict[str, str]] = {
        flag: f"the config's {flag}" for flag in ("task", "train", "dev", "init", "run_dir", "tokenizer")
    }

    def __init__(
        self, cfg: FinetuneConfig, ctx: runner.Context, ds_path: str, ds_raw: dict[str, Any]
    ) -> None:
        """Data, model and config are checked before any compute."""
        self.data = TaskData(cfg.task, cfg.fields, cfg.label_field, cfg.labels, cfg.similarity, cfg.on_error)
        self.train_examples = self.data.read(cfg.train, train=True)[: cfg.max_train_examples]
        self.dev_examples = self.data.read(cfg.dev)
        torch.manual_seed(cfg.seed)
        gpt, tok = load_backbone(cfg)
        n_ctx = gpt.config.n_positions
        self.train_set = encode(self.train_examples, self.data, tok, n_ctx, cfg.truncation)
        self.dev_set = encode(self.dev_examples, self.data, tok, n_ctx, cfg.truncation)
        self.extra_dev = {
            name: encode(self.data.read(path), self.data, tok, n_ctx, cfg.truncation)
            for name, path in cfg.extra_dev.items()
        }
        per_rank = len(self.train_set) // ctx.world // cfg.micro_batch_size
        ds_cfg, steps = ds_config.deepspeed_config(
            ds_raw, ds_path, cfg, ctx, lambda _batch, accum: per_rank // accum, cfg.train
        )
        model = TaskModel(
            gpt, self.data, cfg.lm_coef, cfg.clf_pdrop, cfg.lm_loss_average, cfg.clf_dropout_mask
        )
        engine, scheduler = runner.build_engine(model, ds_cfg)
        layout = {
            "world_size": ctx.world,
            "micro_batch_size": cfg.micro_batch_size,
            "accumulation": ds_cfg["gradient_accumulation_steps"],
            "train_examples": len(self.train_set),
            "labels": self.data.labels,
        }
        task = {"kind": self.data.kind, "labels": self.data.labels, "num_outputs": self.data.num_outputs}
        state = ClientState(
            "finetune",
            seed=cfg.seed,
            config=asdict(cfg),
            model_config=gpt.config.to_dict(),
            task=task,
            layout=layout,
        )
        super().__init__(cfg, ctx, runner.Built(engine, scheduler, ds_cfg, tok, steps, state))
        self.order: list[list[int]] = []
        self.order_epoch = -1
        self.key = main_metric(self.data)
        self.majority = self._majority()

    def _majority(self) -> float | None:
        """Dev accuracy of always answering the most frequent training class."""
        if self.data.regression or self.data.kind == "multiple_choice":
            return None
        top = Counter(int(e.label) for e in self.train_examples).most_common(1)[0][0]
        return float(np.mean([int(e.label) == top for e in self.dev_examples]))

    def check_saved(self, state: ClientState, path: Path) -> None:
        """The rules that shape this task's examples and loss must be the checkpoint's. A checkpoint
        from before a rule existed was written with ``RULES_BEFORE``'s value."""
        kind = self.data.kind
        rules = [
            *(["truncation"] if kind != "classification" else []),  # one segment: both rules agree
            *(["lm_loss_average"] if self.cfg.lm_coef > 0 else []),
            *(["clf_dropout_mask"] if kind in ("similarity", "multiple_choice") else []),  # K > 1
        ]
        saved = {k: state.config.get(k, RULES_BEFORE[k]) for k in rules}
        differ = {k: (v, getattr(self.cfg, k)) for k, v in saved.items() if v != getattr(self.cfg, k)}
        if differ:
            fix = " ".join(f"{k}={v[0]}" for k, v in differ.items())
            raise ValueError(
                f"checkpoint {path} was written with other fine-tuning rules: {differ} (checkpoint, this "
                f"run); resume with {fix}, or start afresh with resume=new (this run moved aside)"
            )

    def check_resume(self, state: ClientState, path: Path) -> None:
        if state.layout != self.state.layout:
            raise ValueError(
                f"checkpoint {path} was written with {state.layout}, this run has {self.state.layout}: the "
                "epochs would not line up; resume with the same settings, or start afresh with "
                "resume=new (this run moved aside)"
            )

    def describe(self) -> None:
        cfg, data, skipped = self.cfg, self.data, self.data.skipped
        majority = f"{100 * self.majority:.1f}%" if self.majority is not None else "n/a"
        examples = f"{len(self.train_set)} train / {len(self.dev_set)} dev examples"
        log.info(
            f"fine-tuning {cfg.task} ({data.kind}): {examples}"
            + (f" ({skipped} malformed rows skipped)" if skipped else "")
            + f"; init {cfg.init}; {self.ctx.world} ranks ({runner.where(self.ctx)}) × micro-batch "
            f"{cfg.micro_batch_size} × accumulation {self.accum} = {self.ds_cfg['train_batch_size']}; "
            f"{self.total_steps} steps ({self.steps_per_epoch} per epoch); optimizer "
            f"{runner.optimizer_name(self.engine)}; lm_coef {cfg.lm_coef:g} (mean per "
            f"{cfg.lm_loss_average}); truncation {cfg.truncation}; classifier dropout mask per "
            f"{cfg.clf_dropout_mask}; majority class on dev {majority}"
        )

    @property
    def epoch(self) -> int:
        """The epoch (from 1) of the step in flight, or of the last one done."""
        return max(self.state.step - 1, 0) // self.steps_per_epoch + 1

    def next_batch(self, micro: int) -> dict[str, torch.Tensor]:
        epoch, within = divmod(self.state.step, self.steps_per_epoch)
        if epoch != self.order_epoch:
            cfg, ctx = self.cfg, self.ctx
            self.order = epoch_batches(
                len(self.train_set), cfg.micro_batch_size, ctx.rank, ctx.world, cfg.seed, epoch
            )
            self.order_epoch = epoch
        idx = self.order[within * self.accum + micro]
        batch = collate([self.train_set[i] for i in idx], self.tok.pad_id, self.data.regression)
        return {k: v.to(self.ctx.device) for k, v in batch.items()}

    def loss(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        _, loss, task_loss, lm_loss = self.engine(
            b["input_ids"], b["extract_pos"], b["lm_targets"], b["labels"]
        )
        return loss, torch.stack([loss.detach().float(), task_loss.float(), lm_loss.float()])

    def train_step(self) -> torch.Tensor:
        return self.micro_steps(self.next_batch, self.loss)

    def log_window(self, means: list[float], step_time: float) -> None:
        loss, task, lm = means
        step, lr = self.state.step, self.lr()
        self.monitor.scalars(
            {
                "finetune/loss": loss,
                "finetune/task_loss": task,
                "finetune/lm_loss": lm,
                "finetune/lr": lr,
                "finetune/step_time": step_time,
                **runner.memory_metrics(self.ctx.device),
            },
            step,
        )
        if self.ctx.rank == 0:
            tqdm.write(
                f"step {step}/{self.total_steps} | epoch {self.epoch} | loss {loss:.4f} (task {task:.4f}, "
                f"LM {lm:.4f}) | lr {lr:.3e} | {step_time:.3f} s/step"
            )

    def validate(self) -> None:
        def score(examples: list[Encoded]) -> dict[str, float]:
            batch = 2 * self.cfg.micro_batch_size
            return dev_scores(self.engine, examples, self.data, batch, self.tok.pad_id, self.ctx.device)

        result = score(self.dev_set)
        for name, examples in self.extra_dev.items():
            result.update({f"{name}/{k}": v for k, v in score(examples).items()})
        step, best = self.state.step, self.state.best
        self.state.history.append({"step": step, "epoch": self.epoch, **result})
        self.monitor.scalars({f"dev/{k}": v for k, v in result.items()}, step)
        improved = best is None or result[self.key] > best[self.key]
        if improved:
            self.state.best = {"step": step, "tag": tag_for(step), **result}
        metrics_text = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        log.info(
            "epoch %d (step %d): dev %s%s", self.epoch, step, metrics_text, " (best)" if improved else ""
        )

    def actions(self) -> list[str]:
        return ["validate", "save"] if self.due(self.steps_per_epoch) else []

    def after_step(self, actions: list[str], preempted: bool) -> None:
        end_of_epoch = "validate" in actions
        if end_of_epoch:
            self.validate()
        if not (end_of_epoch or preempted):
            return
        best = self.state.best
        self.save("signal" if preempted else "end of epoch", best and best["tag"])
        if self.ctx.rank == 0:
            examples = {"train_examples": len(self.train_set), "dev_examples": len(self.dev_set)}
            results = {"task": self.cfg.task, **examples, "majority_dev": self.majority}
            results["history"] = self.state.history
            try:  # the checkpoint holds them too: a failed write is logged, not the end of the run
                atomic_write_text(self.run_dir.path / "results.json", _json({**results, "best": best}))
                if best is not None:
                    atomic_write_text(self.run_dir.path / "best.json", _json(best))
            except OSError as e:
                log.warning("results.json not written (%s); the run goes on", e)

    def report(self, code: int) -> None:
        best, majority = self.state.best, self.majority
        if code != 0 or best is None:
            return
        log.info(
            f"done: best dev {self.key} {best[self.key]:.4f} at step {best['step']} "
            f"({self.run_dir.checkpoints / best['tag']})"
            + (f"; majority class {majority:.4f}" if majority is not None else "")
            + f"; results in {self.run_dir.path / 'results.json'}"
        )


def _json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    return Finetuning.main(argv, __doc__)


if __name__ == "__main__":
    distributed.run_rank(main)
