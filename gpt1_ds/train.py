"""Pretrain GPT-1 with DeepSpeed.

    deepspeed gpt1_ds/train.py --deepspeed_config ds_configs/zero1.json \\
        --config configs/gpt1.yaml --data DIR --run-dir RUN [key=value ...] [ds.key.path=value ...]

The same script runs under ``torchrun``, ``srun``, ``mpirun`` and as a plain
``python -m gpt1_ds.train`` (one process); see ``gpt1_ds.distributed``.
``key=value`` overrides the run config (``max_steps=100``,
``model_overrides.n_layer=6``); ``ds.a.b=value`` overrides the DeepSpeed JSON
(``ds.scheduler.params.warmup_num_steps=100``). Output: ``RUN/config.yaml``,
``RUN/ds_config.json`` (the resolved JSON), ``RUN/checkpoints/``,
``RUN/tensorboard/``.

Exit codes: 0 done; 75 preempted (SIGUSR1 or SIGTERM: the steps up to the next
log line were finished and a checkpoint saved; rerun with ``resume=auto`` to continue);
1 on error (e.g. a NaN/Inf loss, named with its step).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from gpt1_ds import distributed, ds_config, metrics, runner
from gpt1_ds.checkpoint import ClientState
from gpt1_ds.config import RunConfig
from gpt1_ds.data import EvalLoader, TrainLoader, open_dataset
from gpt1_ds.generate import sample
from gpt1_ds.loading import init_from
from gpt1_ds.metrics import device_peak_flops, flops_per_token
from gpt1_ds.model import GPT, IGNORE_INDEX, GPTConfig
from gpt1_ds.tokenizer import MODEL_NAME, Tokenizer, load_tokenizer

log = logging.getLogger("gpt1_ds.train")


def validation_loss(engine: Any, loader: EvalLoader, device: torch.device) -> tuple[float, float]:
    """Mean next-token loss and perplexity over the validation batches of every rank."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target count
    with torch.no_grad():
        for batch in runner.in_lockstep(loader, len(loader), device):
            if batch is None:  # this rank has fewer sequences: a forward that counts nothing
                x = torch.zeros(1, loader.seq_len, dtype=torch.long)
                y = torch.full_like(x, IGNORE_INDEX)
            else:
                x, y = batch["input_ids"], batch["targets"]
            x, y = x.to(device), y.to(device)
            logits = engine(x)
            count = (y != IGNORE_INDEX).sum()
            if count:
                flat = logits.float().view(-1, logits.size(-1))
                loss = F.cross_entropy(flat, y.view(-1), ignore_index=IGNORE_INDEX, reduction="sum")
                total += torch.stack([loss.double(), count.double()])
    dist.all_reduce(total)
    engine.train()
    mean = (total[0] / total[1]).item()
    return mean, math.exp(min(mean, 50.0))


def generate_text(engine: Any, tok: Tokenizer, run: RunConfig, device: torch.device, step: int) -> str:
    """A sample from the current model (every rank runs it: ZeRO-3 needs every rank's part)."""
    prompt = torch.tensor([tok.encode(tok.normalize(run.sample_prompt))], dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(run.seed + step)
    opts = dict(temperature=0.8, top_k=40, generator=gen, stop_id=tok.end_id, vocab_limit=tok.vocab_size)
    out = sample(engine.module, prompt, run.sample_tokens, **opts)
    return tok.decode([i for i in out[0].tolist() if i != tok.eod_id])


def build_engine(
    run: RunConfig, model_cfg: GPTConfig, ds_cfg: dict[str, Any], tok: Tokenizer
) -> tuple[Any, Any]:
    """The model (initialised from ``run.init`` if set) under DeepSpeed's engine, and its scheduler."""
    import deepspeed

    if run.activation_checkpointing and "activation_checkpointing" in ds_cfg:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_cfg)
    torch.manual_seed(run.seed)
    model = GPT(model_cfg)
    model.loss_chunk = run.loss_chunk_size
    if run.init:
        init_from(model, run.init, tok)
    engine, scheduler = runner.build_engine(model, ds_cfg)
    if run.compile:
        engine.compile()  # in place, after ZeRO has wrapped the parameters (not torch.compile(model))
    return engine, scheduler


class Pretraining(runner.Loop):
    """GPT-1's language-modelling loop over the dataset's shards."""

    name, prog, config_class = "train", "gpt1_ds.train", RunConfig
    default_ds_config = "ds_configs/zero1.json"
    """GPT-1's: ZeRO-1, the fastest step for a 117M model (docs/SCALING.md, "The host's share")."""
    config_help = "run config YAML (configs/gpt1.yaml, configs/tiny-cpu.yaml)"
    flags: ClassVar[dict[str, str]] = {
        "data": "dataset directory (the config's data)",
        "run_dir": "run directory (the config's run_dir)",
    }

    def __init__(self, run: RunConfig, ctx: runner.Context, ds_path: str, ds_raw: dict[str, Any]) -> None:
        """Everything that can contradict is checked before any compute: dataset, tokenizer,
        model, DeepSpeed config, world size."""
        data_dir = Path(run.data)
        tok, model_cfg = load_tokenizer(data_dir / MODEL_NAME), run.model_config()
        common = dict(rank=ctx.rank, world_size=ctx.world, seq_len=model_cfg.n_positions)
        train_set = open_dataset(data_dir / "train", tok.sha256, model_cfg.vocab_size, model_cfg.n_positions)
        steps_per_epoch = lambda batch, _accum: train_set.total_sequences // batch  # noqa: E731
        ds_cfg, steps = ds_config.deepspeed_config(
            ds_raw, ds_path, run, ctx, steps_per_epoch, f"{data_dir}/train"
        )
        self.train_loader = TrainLoader(
            train_set,
            run.micro_batch_size,
            global_batch=ds_cfg["train_batch_size"],
            num_workers=run.num_workers,
            pin_memory=ctx.device.type == "cuda",
            seed=run.seed,
            shuffle_window=run.shuffle_window,
            on_error=run.data_on_error,
            **common,
        )
        self.val_loader = EvalLoader(
            data_dir / "val",
            run.micro_batch_size,
            max_batches=run.eval_batches,
            vocab_size=model_cfg.vocab_size,
            tokenizer_sha256=tok.sha256,
            **common,
        )
        engine, scheduler = build_engine(run, model_cfg, ds_cfg, tok)
        state = ClientState("pretrain", seed=run.seed, config=asdict(run), model_config=model_cfg.to_dict())
        super().__init__(run, ctx, runner.Built(engine, scheduler, ds_cfg, tok, steps, state))
        self.model_cfg, self.seq_len = model_cfg, model_cfg.n_positions
        self.tokens_per_step = ds_cfg["train_batch_size"] * self.seq_len
        self.first_ppl: float | None = None
        gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else ""
        peak = run.peak_flops or device_peak_flops(gpu)
        self.peak_flops = peak * ctx.world if peak else None
        self.flops_per_token = flops_per_token(model_cfg, model_cfg.n_positions)

    def check_saved(self, state: ClientState, path: Path) -> None:
        if state.model_config is not None:
            # Through GPTConfig: a checkpoint from before a field existed has its default.
            saved, ours = GPTConfig.from_dict(state.model_config).to_dict(), self.state.model_config
            differ = {
                k: (saved[k], ours[k])
                for k in ours
                if k != "activation_checkpointing" and saved[k] != ours[k]
            }
            if differ:
                raise ValueError(
                    f"checkpoint {path} holds another model than the run config asks for: {differ} "
                    "(checkpoint, run config)"
                )
        self.check_resume(state, path)  # the data order too, before any rank loads the checkpoint

    def check_resume(self, state: ClientState, path: Path) -> None:
        try:
            self.train_loader.load_state_dict(state.loader)
        except ValueError as e:
            raise ValueError(f"{path}: {e}".replace("init=CHECKPOINT", f"init={path}")) from None

    def describe(self) -> None:
        ds, ctx, cfg = self.ds_cfg, self.ctx, self.cfg
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        log.info(
            f"gpt1-ds: {cfg.model}, {ctx.world} ranks ({runner.where(ctx)}), micro-batch "
            f"{cfg.micro_batch_size} × accumulation {self.accum} × {ctx.world} ranks = "
            f"{ds['train_batch_size']} sequences of {self.seq_len}; {self.total_steps} steps "
            f"({self.steps_per_epoch} per epoch); ZeRO stage {stage}; {ds_config.precision(ds)}; "
            f"optimizer {runner.optimizer_name(self.engine)}"
            + (
                "; model compiled (torch.compile, inductor)"
                if getattr(self.engine, "is_compiled", False)
                else ""
            )
            + (f"; loss in chunks of {cfg.loss_chunk_size} positions" if cfg.loss_chunk_size else "")
        )

    def token_scale(self, batches: list[dict[str, Any]]) -> torch.Tensor:
        """accumulation × world size / the step's targets on all ranks, on the device: a micro-batch's
        summed loss times it, averaged by DeepSpeed over micro-batches and ranks, is the step's loss
        averaged over its tokens (a sequence padded at a document's end weighs what it holds)."""
        count = sum(b["counted"] for b in batches)  # counted by the loader: no tensor read
        total = torch.tensor([float(count)]).to(self.ctx.device, non_blocking=True)
        if self.ctx.world > 1:
            dist.all_reduce(total)
        return self.accum * self.ctx.world / total.clamp(min=1.0)

    def loss(self, batch: dict[str, torch.Tensor], scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.ctx.device
        x, y = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "targets"))
        _, summed = self.engine(x, y, reduction="sum")
        loss = summed * scale
        return loss, loss.detach().float().reshape(1)

    def train_step(self) -> torch.Tensor:
        batches = self.train_loader.next_step()
        scale = self.token_scale(batches)
        values = self.micro_steps(batches.__getitem__, lambda b: self.loss(b, scale))
        self.state.tokens_seen += self.tokens_per_step
        return values

    def log_window(self, means: list[float], step_time: float) -> None:
        (loss,) = means
        step, total = self.state.step, self.total_steps
        tps = self.tokens_per_step / step_time
        mfu = metrics.mfu(tps, self.model_cfg, self.seq_len, self.peak_flops) if self.peak_flops else None
        grad_norm = self.engine.get_global_grad_norm()
        self.monitor.scalars(
            {
                "train/loss": loss,
                "train/ppl": math.exp(min(loss, 50.0)),
                "train/lr": self.lr(),
                "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                "train/tokens_per_sec": tps,
                "train/tflops": tps * self.flops_per_token / 1e12,
                "train/mfu": mfu,
                "train/step_time": step_time,
                "train/tokens_seen": self.state.tokens_seen,
                **runner.memory_metrics(self.ctx.device),
            },
            step,
        )
        if self.ctx.rank == 0:
            tqdm.write(
                f"step {step}/{total} | loss {loss:.4f} | lr {self.lr():.3e} | {tps:,.0f} tok/s"
                + f" | {1000 * step_time:.1f} ms/step"
                + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                + f" | ETA {timedelta(seconds=int((total - step) * step_time))}"
            )

    def begin(self) -> None:
        if self.state.step == 0:
            self.validate()

    def validate(self) -> None:
        val_loss, self.state.val_ppl = validation_loss(self.engine, self.val_loader, self.ctx.device)
        step = self.state.step
        values = {"val/loss": val_loss, "val/ppl": self.state.val_ppl}
        # The split's bytes per token (its manifest) turn nats per token into bits per byte, the
        # figure gpt1_ds.evaluate gives and the one that compares tokenizers.
        manifest = self.val_loader.dataset.manifest
        if manifest.get("text_bytes") and manifest.get("total_tokens"):
            values["val/bits_per_byte"] = (
                val_loss * manifest["total_tokens"] / manifest["text_bytes"] / math.log(2)
            )
        self.monitor.scalars(values, step)
        bpb = f", {values['val/bits_per_byte']:.4f} bits/byte" if "val/bits_per_byte" in values else ""
        log.info("step %d: val loss %.4f, ppl %.2f%s", step, val_loss, self.state.val_ppl, bpb)
        if step == 0:
            self.first_ppl = self.state.val_ppl

    def actions(self) -> list[str]:
        run = self.cfg
        due = {
            "validate": self.due(run.eval_interval),
            "sample": bool(run.sample_interval) and self.due(run.sample_interval),
            "save": self.due(run.checkpoint_interval),
        }
        return [action for action, now in due.items() if now]

    def after_step(self, actions: list[str], preempted: bool) -> None:
        run, step = self.cfg, self.state.step
        if "validate" in actions:
            self.validate()
        if "sample" in actions:
            try:  # an auxiliary step: a failure is logged, never the end of the run
                text = generate_text(self.engine, self.tok, run, self.ctx.device, step)
                self.monitor.text("sample", text, step)
                log.info("step %d sample: %s", step, text.replace("\n", " / "))
            except Exception as e:
                log.warning("step %d: no sample (%s: %s); training goes on", step, type(e).__name__, e)
        if preempted:
            self.save(f"signal {self.preempt.signal}" if self.preempt.signal else "signal on another rank")
        elif "save" in actions:
            self.save("interval" if step < self.total_steps else "end")

    def save(self, reason: str) -> str:
        self.state.loader = self.train_loader.state_dict()
        return super().save(reason)

    def report(self, code: int) -> None:
        if code != 0:
            return
        state = self.state
        log.info("done: %d steps, %s tokens", state.step, f"{state.tokens_seen:,}")
        if self.first_ppl is not None and state.val_ppl is not None:
            ppl = f"{self.first_ppl:.1f} at step 0 → {state.val_ppl:.1f} at step {state.step}"
            log.info("validation perplexity: %s", ppl)
        log.info("TensorBoard: tensorboard --logdir %s", self.run_dir.tensorboard)


def main(argv: list[str] | None = None) -> int:
    return Pretraining.main(argv, __doc__)


if __name__ == "__main__":
    distributed.run_rank(main)
