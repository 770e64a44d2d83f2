"""Consolidate a DeepSpeed checkpoint and export it: Hugging Face or plain safetensors.

    python -m gpt1_ds.export RUN/checkpoints --out HF_DIR [--tag TAG] [--format hf|safetensors]

A checkpoint of any ZeRO stage and world size becomes one fp32 state dict:

- ZeRO-2 and ZeRO-3: DeepSpeed's own ``zero_to_fp32`` merges the fp32 master partitions;
- ZeRO-1 with bf16 (DeepSpeed's ``BF16_Optimizer``) and stage 0 with bf16 keep their fp32
  masters in layouts that ``zero_to_fp32`` does not read; they are merged here from the
  same metadata (``param_slice_mappings``, ``param_shapes``);
- stage 0 in fp32: the module's own weights.

The LM head is tied to the token table: it is restored from the table, and a checkpoint
whose head differs from it is refused. ``--format hf`` writes ``config.json``,
``model.safetensors`` (what ``OpenAIGPTLMHeadModel.from_pretrained`` loads), the
tokenizer files and a model card; ``--format safetensors`` writes our own layout
(``model.safetensors`` with gpt1-ds names and ``gpt1_config.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gpt1_ds import checkpoint
from gpt1_ds.hf import CONFIG_NAME, export_hf, import_hf
from gpt1_ds.model import GPT, GPTConfig, param_groups

log = logging.getLogger("gpt1_ds.export")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
OWN_CONFIG_NAME = "gpt1_config.json"
WEIGHTS_NAME = "model.safetensors"
LM_HEAD = "lm_head.weight"
TOKENS = "tokens_embed.weight"
TASK_PREFIX = "gpt."  # a fine-tuned model (gpt1_ds.finetune) holds its GPT under ``gpt``


class CheckpointError(ValueError):
    """A checkpoint that cannot be consolidated: incomplete, corrupted or inconsistent."""


def resolve_tag(source: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints dir, tag) for ``RUN``, ``RUN/checkpoints`` or ``RUN/checkpoints/TAG``.
    Without ``tag``: the newest complete one. A tag without its COMPLETE marker is refused."""
    path = Path(source)
    if (path / "checkpoints").is_dir() and not (path / checkpoint.COMPLETE).exists():
        path = path / "checkpoints"
    if tag is None and (path / checkpoint.COMPLETE).is_file():
        return path.parent, path.name
    if tag is None and any(path.glob("*model_states.pt")):
        raise CheckpointError(f"{path}: checkpoint is incomplete (no {checkpoint.COMPLETE} marker)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if tag is None:
        tags = checkpoint.complete_tags(path)
        if not tags:
            raise CheckpointError(f"{path}: no complete checkpoint (a tag needs {checkpoint.COMPLETE})")
        tag = tags[-1]
    if not (path / tag).is_dir():
        raise FileNotFoundError(f"{path / tag}: no such checkpoint tag")
    if not (path / tag / checkpoint.COMPLETE).is_file():
        raise CheckpointError(f"{path / tag}: checkpoint is incomplete (no {checkpoint.COMPLETE} marker)")
    return path, tag


def _load(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or overwritten files fail in many ways inside torch.load
        raise CheckpointError(f"{file}: unreadable checkpoint file ({type(e).__name__}: {e})") from None


def _model_states(tag_dir: Path) -> dict[str, Any]:
    """Rank 0's model-states file (any ZeRO stage)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return _load(tag_dir / name)
    raise CheckpointError(f"{tag_dir}: no model-states file (mp_rank_00_model_states.pt)")


def _split_flat(flat: torch.Tensor, shapes: dict[str, torch.Size], where: Path) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = shape.numel()
        if offset + n > flat.numel():
            raise CheckpointError(f"{where}: fp32 weights end before parameter {name!r}")
        out[name] = flat[offset : offset + n].view(shape).clone()
        offset += n
    if offset != flat.numel():
        raise CheckpointError(f"{where}: {flat.numel() - offset} fp32 values belong to no parameter")
    return out


def _bf16_optimizer_weights(tag_dir: Path, states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """fp32 masters of DeepSpeed's BF16_Optimizer (ZeRO-1 + bf16): each rank's partition holds
    fragments of parameters at the addresses in ``param_slice_mappings``."""
    files = sorted(tag_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    world = states.get("dp_world_size", len(files))
    if len(files) != world:
        raise CheckpointError(f"{tag_dir}: {len(files)} optimizer files for a world of {world} ranks")
    pieces: dict[str, list[torch.Tensor]] = {}
    for file in files:
        opt = _load(file)["optimizer_state_dict"]
        for flat, mapping in zip(
            opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"], strict=True
        ):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    shapes = {k: v for group in states["param_shapes"] for k, v in group.items()}
    out = {}
    for name, shape in shapes.items():
        if name not in pieces:
            raise CheckpointError(f"{tag_dir}: parameter {name!r} is in no rank's partition")
        full = torch.cat(pieces[name])
        if full.numel() != shape.numel():
            raise CheckpointError(f"{tag_dir}: parameter {name!r} has {full.numel()} values, not {shape}")
        out[name] = full.view(shape).clone()
    return out


def _group_shapes(states: dict[str, Any], where: Path) -> list[dict[str, torch.Size]]:
    """Names and shapes of the optimiser's parameter groups, in order. Stage 0 does not save
    them: they follow from the model config and ``param_groups`` (the order train.py used;
    a fine-tuned model, ``gpt1_ds.finetune.TaskModel``, holds its GPT as ``gpt`` and a ``head``)."""
    if states.get("param_shapes"):
        return states["param_shapes"]
    with torch.device("meta"):
        model: torch.nn.Module = GPT(_config_of(states, where))
        task = (states.get("config") or {}).get("task")
        if task is not None:
            model = torch.nn.ModuleDict(
                {"gpt": model, "head": torch.nn.Linear(model.config.n_embd, task["num_outputs"])}
            )
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)]: p.shape for p in g["params"]} for g in param_groups(model, 0.0)]


def _config_of(states: dict[str, Any], where: Path | str) -> GPTConfig:
    config = (states.get("config") or {}).get("model_config")
    if config is None:
        raise CheckpointError(f"{where}: the client state holds no model_config")
    return GPTConfig.from_dict({**config, "activation_checkpointing": False})


def _rank_of(file: Path) -> int:
    return int(file.name.split("_rank_")[1].split("_")[0])


def consolidate(source: str | Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 weights (gpt1-ds names, ``lm_head.weight`` tied) and the client state of a checkpoint."""
    ckpt_dir, tag = resolve_tag(source, tag)
    tag_dir = ckpt_dir / tag
    states = _model_states(tag_dir)
    optimizer = states.get("optimizer") or {}
    stage = (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if any(tag_dir.glob("zero_pp_rank_*optim_states.pt")) or stage >= 2:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except Exception as e:  # DeepSpeed reads every rank's files itself and does not name a bad one
            for file in sorted(tag_dir.glob("*.pt")):
                _load(file)  # raises, naming the first unreadable file
            raise CheckpointError(
                f"{tag_dir}: DeepSpeed could not consolidate it ({type(e).__name__}: {e})"
            ) from None
        weights = dict(weights)
    elif any(tag_dir.glob("bf16_zero_pp_rank_*optim_states.pt")):
        weights = _bf16_optimizer_weights(tag_dir, states)
    elif isinstance(optimizer, dict) and "fp32_groups_flat" in optimizer:  # stage 0, bf16
        weights = {}
        for flat, shapes in zip(optimizer["fp32_groups_flat"], _group_shapes(states, tag_dir), strict=True):
            weights.update(_split_flat(flat, shapes, tag_dir))
    else:  # stage 0 in fp32: the module holds the weights
        weights = {k: v.float() for k, v in states["module"].items()}
    for name, other in (states.get("shared_params") or {}).items():  # tied tensors, stored once
        if name not in weights and other in weights:
            weights[name] = weights[other]
    client = {k: states[k] for k in ("step", "tokens_seen", "val_ppl", "config") if k in states}
    client["tag"], client["checkpoint_dir"] = tag, str(ckpt_dir)
    return weights, client


def _gpt_weights(weights: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The GPT part of a pretraining or fine-tuning state dict, with the head tied."""
    if any(k.startswith(TASK_PREFIX) for k in weights):
        weights = {k[len(TASK_PREFIX) :]: v for k, v in weights.items() if k.startswith(TASK_PREFIX)}
    if TOKENS not in weights:
        raise CheckpointError(f"{where}: no {TOKENS} in the checkpoint")
    head = weights.get(LM_HEAD)
    if head is not None and not torch.equal(head, weights[TOKENS]):
        raise CheckpointError(f"{where}: {LM_HEAD} differs from {TOKENS}; GPT-1 ties them")
    return {**weights, LM_HEAD: weights[TOKENS]}


def model_from_checkpoint(source: str | Path, tag: str | None = None) -> tuple[GPT, dict[str, Any]]:
    """A GPT (fp32, eval mode, CPU) from a DeepSpeed checkpoint, and its client state."""
    weights, client = consolidate(source, tag)
    where = f"{client['checkpoint_dir']}/{client['tag']}"
    config = _config_of(client, where)
    model = GPT(config)
    try:
        model.load_state_dict(_gpt_weights(weights, where))
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not fit {config}: {e}") from None
    return model.eval(), client


def find_tokenizer(source: str | Path, client: dict[str, Any] | None = None) -> Path | None:
    """The tokenizer.model of a model: beside it (HF or our export), in its run directory,
    or in the dataset its run config names."""
    path = Path(source)
    candidates = [path, path.parent, path.parent.parent]
    data = ((client or {}).get("config") or {}).get("run", {}).get("data")
    if data:
        candidates.append(Path(data))
    for folder in candidates:
        if (folder / TOKENIZER_FILES[0]).is_file():
            return folder / TOKENIZER_FILES[0]
    return None


def load_model(source: str | Path, tag: str | None = None) -> tuple[GPT, Path | None]:
    """A GPT (fp32, eval mode, CPU) from an HF directory, our safetensors export, or a
    training run's checkpoints; and the tokenizer.model found for it (or None)."""
    path = Path(source)
    if (path / OWN_CONFIG_NAME).is_file():
        config = GPTConfig.from_dict(json.loads((path / OWN_CONFIG_NAME).read_text()))
        model = GPT(config)
        model.load_state_dict(_gpt_weights(load_file(str(path / WEIGHTS_NAME)), str(path)))
        return model.eval(), find_tokenizer(path)
    if (path / CONFIG_NAME).is_file():
        return import_hf(path).eval(), find_tokenizer(path)
    model, client = model_from_checkpoint(path, tag)
    return model, find_tokenizer(path, client)


def model_card(client: dict[str, Any], config: GPTConfig, n_params: int) -> str:
    run = (client.get("config") or {}).get("run", {})
    val = client.get("val_ppl")
    lines = [
        "# GPT-1 (gpt1-ds)",
        "",
        "A GPT-1 model (Radford et al., 2018) pretrained with gpt1-ds: post-LayerNorm, learned",
        "positions, tanh GELU, LM head tied to the token table. Load it with",
        "`transformers.OpenAIGPTLMHeadModel.from_pretrained(<this folder>)`; the tokenizer is the",
        "sentencepiece model `tokenizer.model` (`data_prep.tokenizer.Tokenizer`).",
        "",
        f"- Shape: {config.n_layer} layers × {config.n_embd}, {config.n_head} heads, context "
        f"{config.n_positions}, vocab {config.vocab_size:,}: {n_params:,} parameters",
        f"- Data: `{run.get('data', 'unknown')}`",
        f"- Training: {client.get('step', '?')} steps, {client.get('tokens_seen', 0):,} tokens "
        f"(checkpoint `{client.get('tag', '?')}`)",
        f"- Validation perplexity: {val:.2f}" if isinstance(val, float) else "- Validation perplexity: n/a",
        "",
    ]
    return "\n".join(lines)


def export(source: str | Path, out: str | Path, tag: str | None = None, fmt: str = "hf") -> Path:
    """Consolidate ``source`` and write it to ``out`` (``hf`` or ``safetensors``)."""
    out = Path(out)
    model, client = model_from_checkpoint(source, tag)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        export_hf(model, out, metadata={"gpt1_ds_step": str(client.get("step", ""))})
        (out / "README.md").write_text(model_card(client, model.config, model.num_parameters()))
    elif fmt == "safetensors":
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != LM_HEAD}
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / WEIGHTS_NAME)
        (out / OWN_CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}: hf or safetensors")
    tokenizer = find_tokenizer(source, client)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer.parent / name).is_file():
                shutil.copyfile(tokenizer.parent / name, out / name)
    else:
        log.warning("no tokenizer.model found for %s: copy it into %s yourself", source, out)
    log.info(
        "exported %s/%s (step %s) → %s (%s)",
        client["checkpoint_dir"],
        client["tag"],
        client.get("step"),
        out,
        fmt,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="gpt1_ds.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", help="RUN, RUN/checkpoints or RUN/checkpoints/TAG")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--format", choices=("hf", "safetensors"), default="hf")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        export(args.checkpoints, args.out, args.tag, args.format)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
