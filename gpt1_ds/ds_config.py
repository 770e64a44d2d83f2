"""A run's DeepSpeed JSON, in one place: read once (the file, then the profile's ``ds`` values, then
the command line's ``ds.key=value``), its keys checked against what DeepSpeed reads
(``gpt1_ds.ds_keys``), the global batch split over the world size, its ``"auto"`` values filled
and checked; the run writes the resolved copy into its directory (``RUN/ds_config.json``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gpt1_ds import ops
from gpt1_ds.config import Settings, parse_overrides
from gpt1_ds.ds_keys import check_ds_keys

log = logging.getLogger(__name__)


def read(path: str | Path, cfg: Settings, ds_over: list[str]) -> dict[str, Any]:
    """The JSON at ``path`` with the profile's ``ds`` values and the command line's ``ds.key=value``."""
    return load_ds_config(path, {**cfg.ds, **parse_overrides(ds_over, "ds.")})


def apply(ds: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": value}`` set into ``ds`` (in place), the missing sections made."""
    for key, value in overrides.items():
        node = ds
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return ds


def load_ds_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path`` with ``{"a.b": value}`` overrides applied, its keys checked
    against what DeepSpeed reads (``gpt1_ds.ds_keys``): a misspelt key is refused, not ignored."""
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such DeepSpeed config") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    apply(ds, overrides or {})
    check_ds_keys(ds, str(path), overrides or {})
    return ds


SQRT_RULE = "√(new / old), the square-root rule for Adam (Malladi et al., 2022, arXiv:2205.10287)"


def default_max_micro_batch(model: str, device: torch.device) -> int:
    """Sequences of 512 one device holds in one pass of ``model`` (bf16, no activation checkpointing).
    gpt1: about 0.35 GiB of activations and logits a sequence (Korthikanti et al. 2022: 34·d + 5·h·T
    bytes a token and layer, plus the fp32 logits of 40,478 words), so 64 on 80 GiB, 32 on 40,
    16 on 24, 8 below and on a CPU; tiny: 64."""
    if model == "tiny":
        return 64
    if device.type != "cuda":
        return 8
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return next((n for floor, n in ((75, 64), (38, 32), (22, 16)) if gib >= floor), 8)


def world_sizes_for(batch: int, limit: int = 1024) -> list[int]:
    """The world sizes over which ``batch`` sequences split evenly (its divisors up to ``limit``)."""
    return [n for n in range(1, min(batch, limit) + 1) if batch % n == 0]


def resolve_batch(
    run: Any, ds: dict[str, Any], world: int, cap: int, where: str
) -> tuple[int, dict[str, Any]]:
    """(micro-batch, the DeepSpeed overrides the run's batch settings make). ``global_batch_size``
    changes ``train_batch_size`` and scales the learning rate by ``SQRT_RULE``; ``micro_batch_size:
    auto`` is the largest divisor of the batch per rank that is at most ``cap``. A batch that
    the world size does not divide is an error naming the world sizes that can run it."""
    batch, extra = ds.get("train_batch_size"), {}
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{where}: train_batch_size must be a positive number (GPT-1: 64), got {batch!r}")
    if run.global_batch_size is not None and run.global_batch_size != batch:
        lr = ds.get("optimizer", {}).get("params", {}).get("lr")
        if not isinstance(lr, (int, float)):
            raise ValueError(f"{where}: global_batch_size needs a numeric optimizer.params.lr, got {lr!r}")
        new_lr = lr * math.sqrt(run.global_batch_size / batch)
        extra = {"train_batch_size": run.global_batch_size, "optimizer.params.lr": new_lr}
        log.warning(
            "the recipe changes: global batch %d → %d (global_batch_size), learning rate %.4g → %.4g by %s",
            batch, run.global_batch_size, lr, new_lr, SQRT_RULE,
        )  # fmt: skip
        batch = run.global_batch_size
    if batch % world:
        near = " or ".join(
            str(n) for n in sorted({world * (batch // world), world * (batch // world + 1)}) if n
        )
        raise ValueError(
            f"{where}: the global batch of {batch} sequences does not split over {world} ranks; world "
            f"sizes that can run it: {', '.join(map(str, world_sizes_for(batch)))}; or change the recipe "
            f"with global_batch_size={near} (multiples of {world}), which scales the learning rate by "
            "√(new / old)"
        )
    per_rank = batch // world
    micro = run.micro_batch_size
    if micro == "auto":
        micro = max(n for n in range(1, min(per_rank, cap) + 1) if per_rank % n == 0)
    return micro, extra


def batch_settings(
    cfg: Settings, raw: dict[str, Any], where: str, world: int, device: torch.device
) -> tuple[Any, dict[str, Any]]:
    """The run's micro-batch resolved for this world size (``resolve_batch``), and the JSON with
    what a changed global batch implies (its size, the scaled lr)."""
    cap = cfg.max_micro_batch_size or default_max_micro_batch(cfg.model, device)
    micro, extra = resolve_batch(cfg, raw, world, cap, where)
    return replace(cfg, micro_batch_size=micro), apply(copy.deepcopy(raw), extra)


def _fill(value: Any, computed: int, where: str) -> int:
    """An ``"auto"`` (or absent) value takes the computed one; an explicit one must equal it."""
    if value is None or value == "auto":
        return computed
    if value != computed:
        raise ValueError(f"{where} is {value}, but the run needs {computed}")
    return value


def resolve_ds_config(
    ds: dict[str, Any], run: Settings, world_size: int, steps_per_epoch_fn: Any, where: str, device: str
) -> dict[str, Any]:
    """A copy of the DeepSpeed config with its ``"auto"`` values filled and checked.

    ``steps_per_epoch_fn(accumulation)`` gives the optimiser steps per epoch (from the
    loader, hence the manifest), for ``total_num_steps``.
    """
    ds = copy.deepcopy(ds)
    global_batch = ds.get("train_batch_size")
    if not isinstance(global_batch, int):
        raise ValueError(f"{where}: train_batch_size must be a number (GPT-1: 64), got {global_batch!r}")
    where_micro = f"{where}: train_micro_batch_size_per_gpu (run setting micro_batch_size)"
    micro = _fill(ds.get("train_micro_batch_size_per_gpu"), run.micro_batch_size, where_micro)
    if global_batch % (micro * world_size):
        raise ValueError(
            f"{where}: train_batch_size {global_batch} is not a multiple of micro_batch_size {micro} "
            f"× world size {world_size}"
        )
    accum = global_batch // (micro * world_size)
    accum = _fill(ds.get("gradient_accumulation_steps"), accum, f"{where}: gradient_accumulation_steps")
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    total = run.total_steps(steps_per_epoch_fn(accum))
    sched = ds.get("scheduler", {}).get("params") or {}
    if "total_num_steps" in sched:
        sched["total_num_steps"] = _fill(
            sched["total_num_steps"], total, f"{where}: scheduler.total_num_steps"
        )
    if sched.get("warmup_max_lr") == "auto":  # WarmupDecayLR's peak is the optimiser's lr
        lr = ds.get("optimizer", {}).get("params", {}).get("lr")
        if not isinstance(lr, (int, float)):
            raise ValueError(f"{where}: scheduler.warmup_max_lr is auto, but optimizer.params.lr is {lr!r}")
        sched["warmup_max_lr"] = lr
    if sched.get("warmup_num_steps") == "auto":
        fraction = getattr(run, "warmup_fraction", None)
        if fraction is None:
            raise ValueError(
                f"{where}: scheduler.warmup_num_steps is auto, but this run sets no warm-up fraction"
            )
        sched["warmup_num_steps"] = max(1, math.ceil(fraction * total))
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"], why = native_bf16(device)
        if rank0:
            log.info("bf16.enabled auto: %s (%s)", "bf16" if ds["bf16"]["enabled"] else "fp32", why)
    if rank0 and isinstance(warmup := sched.get("warmup_num_steps"), int) and warmup > total:
        log.warning(
            "the warm-up (scheduler.params.warmup_num_steps=%d) is longer than the run's %d steps: "
            "the learning rate never reaches its peak",
            warmup,
            total,
        )
    if ds.get("fp16", {}).get("enabled") and device == "cpu":
        raise ValueError(f"{where}: fp16.enabled is true, but DeepSpeed has no fp16 on the CPU: use bf16")
    if ds.get("fp16", {}).get("enabled") and "initial_scale_power" not in ds["fp16"]:
        raise ValueError(f"{where}: fp16 needs an explicit initial_scale_power (e.g. 16)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 0 and ds.get("bf16", {}).get("enabled") and ds.get("data_types", {}).get("grad_accum_dtype"):
        raise ValueError(  # DeepSpeed's own error comes from deep inside initialize()
            f"{where}: ZeRO stage 0 with bf16 takes no data_types.grad_accum_dtype (DeepSpeed refuses the "
            "mix): remove it, as ds_configs/zero0.json does"
        )
    return ds


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""``/proc/cpuinfo`` flags of bf16 arithmetic in hardware (x86's AVX-512 BF16 and AMX, Arm's BF16)."""


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether ``bf16.enabled: auto`` trains in bf16 on this device, and why: on CUDA where the GPU
    has bf16; on a CPU where it computes in bf16 natively. Elsewhere bf16 is emulated, many times
    slower than fp32 (on a 2-core AMD EPYC without AVX-512: 20× a step of the test model)."""
    if device == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "the GPU has bf16" if ok else "this GPU has no bf16"
    flags = set((ops.proc_cpu_info() or {}).get("flags", []))
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"the CPU computes in bf16 ({', '.join(found)})"
    return False, f"the CPU has none of {', '.join(CPU_BF16_FLAGS)}: bf16 would be emulated, slower than fp32"


def deepspeed_config(
    raw: dict[str, Any],
    path: str,
    cfg: Settings,
    ctx: Any,
    steps_per_epoch: Callable[[int, int], int],
    source: str,
) -> tuple[dict[str, Any], int]:
    """``raw`` (``read``, ``batch_settings``; from ``path``) with its ``"auto"`` values filled and checked
    (``resolve_ds_config``), the ops it needs built; and the optimiser steps per epoch:
    ``steps_per_epoch(train_batch_size, accumulation)`` of ``source``."""
    per_epoch = lambda accum: steps_per_epoch(raw["train_batch_size"], accum)  # noqa: E731
    ds_cfg = resolve_ds_config(raw, cfg, ctx.world, per_epoch, path, ctx.device.type)
    batch, accum = ds_cfg["train_batch_size"], ds_cfg["gradient_accumulation_steps"]
    steps = steps_per_epoch(batch, accum)
    if steps < 1:
        raise ValueError(
            f"{source} holds less than one optimiser step of train_batch_size {batch} per epoch "
            f"({cfg.micro_batch_size} per micro-batch × accumulation {accum} × {ctx.world} ranks)"
        )
    failed = ops.build_once(ops.needed(ds_cfg, ctx.device.type), ctx.node_leader, ctx.device)
    if failed.get("cpu_adam"):
        raise RuntimeError(
            f"DeepSpeed's CPU Adam, which optimiser offload needs, cannot be built: {failed['cpu_adam']}"
        )
    return adam_fallback(ds_cfg, ctx.device.type, lambda: failed.get("fused_adam")), steps


def adam_fallback(
    ds_cfg: dict[str, Any], device_type: str, unavailable: Callable[[], str | None]
) -> dict[str, Any]:
    """The JSON to use: on CUDA, where DeepSpeed's FusedAdam cannot be built, its Adam(W) becomes
    torch's fused AdamW (DeepSpeed's own ``torch_adam``, with ``fused``), the same update; said
    in a warning. Unchanged on a CPU, with optimiser offload, or when ``torch_adam`` is set."""
    optimizer = ds_cfg.get("optimizer") or {}
    params = optimizer.get("params") or {}
    if device_type != "cuda" or "fused_adam" not in ops.needed(ds_cfg, device_type) or "torch_adam" in params:
        return ds_cfg
    reason = unavailable()
    if reason is None:
        return ds_cfg
    log.warning("DeepSpeed's FusedAdam cannot be built (%s): using torch.optim.AdamW(fused=True)", reason)
    return {**ds_cfg, "optimizer": {**optimizer, "params": {**params, "torch_adam": True, "fused": True}}}


def precision(ds_cfg: dict[str, Any]) -> str:
    """bf16, fp16 or fp32: what the config trains in (``bf16.enabled: auto`` decided on this machine)."""
    bf16 = ds_cfg.get("bf16", {}).get("enabled")
    if bf16 == "auto":
        bf16 = native_bf16("cuda" if torch.cuda.is_available() else "cpu")[0]
    if bf16:
        return "bf16"
    return "fp16" if ds_cfg.get("fp16", {}).get("enabled") else "fp32"
