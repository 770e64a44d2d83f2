"""Models from what gpt1-ds writes: a training or fine-tuning run's DeepSpeed checkpoint, an HF
directory, or our safetensors export; each with the tokenizer that belongs to it.

A checkpoint of any ZeRO stage and world size becomes one fp32 state dict:

- ZeRO-2 and ZeRO-3: DeepSpeed's own ``zero_to_fp32`` merges the fp32 master partitions;
- ZeRO-1 with bf16 (DeepSpeed's ``BF16_Optimizer``) and stage 0 with bf16 keep their fp32
  masters in layouts that ``zero_to_fp32`` does not read; they are merged here from the
  same metadata (``param_slice_mappings``, ``param_shapes``);
- stage 0 in fp32: the module's own weights.

The LM head is tied to the token table: it is restored from the table, and a checkpoint
whose head differs from it is refused. A fine-tuned checkpoint gives its GPT
(``gpt1_ds.heads.TaskModel``'s ``gpt``). ``gpt1_ds.export`` writes what is read here.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gpt1_ds import checkpoint
from gpt1_ds.checkpoint import CheckpointError, ClientState, RunDir
from gpt1_ds.heads import BACKBONE, TaskModel
from gpt1_ds.hf import CONFIG_NAME, WEIGHTS_NAME, import_hf
from gpt1_ds.model import GPT, LM_HEAD, TOKENS_EMBED, GPTConfig, param_groups, with_vocab
from gpt1_ds.tokenizer import Tokenizer, find_in, load_tokenizer

log = logging.getLogger(__name__)

OWN_CONFIG_NAME = "gpt1_config.json"
"""Our safetensors export's config (``GPTConfig.to_dict()``), beside ``model.safetensors``."""


def resolve_tag(source: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints dir, tag) for ``RUN``, ``RUN/checkpoints`` or ``RUN/checkpoints/TAG``.
    Without ``tag``: the newest complete one. A tag without its COMPLETE marker is refused."""
    path = Path(source)
    if RunDir(path).checkpoints.is_dir() and not (path / checkpoint.COMPLETE).exists():
        path = RunDir(path).checkpoints
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


def _deepspeed_types() -> list[type]:
    """The classes DeepSpeed pickles into a checkpoint beside tensors and plain values."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load(file: Path) -> dict[str, Any]:
    """A checkpoint file read as data (``weights_only``: tensors, plain values and DeepSpeed's few
    types): a file that names any other object (a pickle that could run code) is refused."""
    torch.serialization.add_safe_globals(_deepspeed_types())
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{file}: unreadable checkpoint file (UnpicklingError: {e})") from None
        unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(file)) or "unknown objects"
        raise CheckpointError(
            f"{file}: holds {unsafe}, which a gpt1-ds checkpoint never does: not unpickled "
            "(a checkpoint is a pickle that could run code; read only those you trust)"
        ) from None
    except Exception as e:  # truncated or overwritten files fail in many ways inside torch.load
        raise CheckpointError(f"{file}: unreadable checkpoint file ({type(e).__name__}: {e})") from None


def model_states(tag_dir: Path) -> dict[str, Any]:
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


def _group_shapes(states: dict[str, Any], client: ClientState, where: Path) -> list[dict[str, torch.Size]]:
    """Names and shapes of the optimiser's parameter groups, in order. Stage 0 does not save
    them: they follow from the model (``TaskModel`` for a fine-tuned one) and ``param_groups``."""
    if states.get("param_shapes"):
        return states["param_shapes"]
    with torch.device("meta"):
        config = _config_of(client, where)
        model = GPT(config) if client.task is None else TaskModel.skeleton(config, client.task)
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)]: p.shape for p in g["params"]} for g in param_groups(model, 0.0)]


def _config_of(client: ClientState, where: Path | str) -> GPTConfig:
    if client.model_config is None:
        raise CheckpointError(f"{where}: the client state holds no model_config")
    return GPTConfig.from_dict({**client.model_config, "activation_checkpointing": False})


def _rank_of(file: Path) -> int:
    return int(file.name.split("_rank_")[1].split("_")[0])


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint tag and its client state."""

    directory: Path
    """The checkpoints directory (``RUN/checkpoints``)."""
    tag: str
    state: ClientState

    @property
    def path(self) -> Path:
        return self.directory / self.tag

    @property
    def run_dir(self) -> RunDir:
        return RunDir.of_checkpoints(self.directory)


def _fp32_weights(
    ckpt_dir: Path, tag: str, states: dict[str, Any], client: ClientState
) -> dict[str, torch.Tensor]:
    """The fp32 weights of a tag, whichever layout its ZeRO stage and precision wrote."""
    tag_dir = ckpt_dir / tag
    optimizer = states.get("optimizer") or {}
    stage = (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if any(tag_dir.glob("zero_pp_rank_*optim_states.pt")) or stage >= 2:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        for file in sorted(tag_dir.glob("*.pt")):  # DeepSpeed unpickles them all: data only first
            _load(file)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
        except Exception as e:
            raise CheckpointError(
                f"{tag_dir}: DeepSpeed could not consolidate it ({type(e).__name__}: {e})"
            ) from None
    if any(tag_dir.glob("bf16_zero_pp_rank_*optim_states.pt")):
        return _bf16_optimizer_weights(tag_dir, states)
    if isinstance(optimizer, dict) and "fp32_groups_flat" in optimizer:  # stage 0, bf16
        weights = {}
        groups = _group_shapes(states, client, tag_dir)
        for flat, shapes in zip(optimizer["fp32_groups_flat"], groups, strict=True):
            weights.update(_split_flat(flat, shapes, tag_dir))
        return weights
    return {k: v.float() for k, v in states["module"].items()}  # stage 0 in fp32: the module's


def consolidate(source: str | Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], Checkpoint]:
    """fp32 weights (gpt1-ds names, ``lm_head.weight`` tied) of a checkpoint, and the checkpoint."""
    ckpt_dir, tag = resolve_tag(source, tag)
    states = model_states(ckpt_dir / tag)
    client = ClientState.from_dict(states, ckpt_dir / tag)
    weights = _fp32_weights(ckpt_dir, tag, states, client)
    for name, other in (states.get("shared_params") or {}).items():  # tied tensors, stored once
        if name not in weights and other in weights:
            weights[name] = weights[other]
    return weights, Checkpoint(ckpt_dir, tag, client)


def _gpt_weights(weights: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The GPT part of a pretraining or fine-tuning state dict, with the head tied."""
    prefix = BACKBONE + "."
    if any(k.startswith(prefix) for k in weights):
        weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    if TOKENS_EMBED not in weights:
        raise CheckpointError(f"{where}: no {TOKENS_EMBED} in the checkpoint")
    head = weights.get(LM_HEAD)
    if head is not None and not torch.equal(head, weights[TOKENS_EMBED]):
        raise CheckpointError(f"{where}: {LM_HEAD} differs from {TOKENS_EMBED}; GPT-1 ties them")
    return {**weights, LM_HEAD: weights[TOKENS_EMBED]}


def model_from_checkpoint(source: str | Path, tag: str | None = None) -> tuple[GPT, Checkpoint]:
    """A GPT (fp32, eval mode, CPU) from a DeepSpeed checkpoint, and the checkpoint."""
    weights, ckpt = consolidate(source, tag)
    config = _config_of(ckpt.state, ckpt.path)
    model = GPT(config)
    try:
        model.load_state_dict(_gpt_weights(weights, str(ckpt.path)))
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path}: weights do not fit {config}: {e}") from None
    return model.eval(), ckpt


def find_tokenizer(folder: str | Path, ckpt: Checkpoint | None = None) -> Path | None:
    """The tokenizer of a model (``tokenizer.find_in``: a ``tokenizer.model``, or a folder with
    GPT-1's ``vocab.json`` and ``merges.txt``): in ``folder`` (an HF directory or our export), or for
    a checkpoint in its run directory or the dataset its run config names."""
    candidates = [Path(folder)]
    if ckpt is not None:
        candidates = [
            ckpt.run_dir.path,
            *([Path(ckpt.state.config["data"])] if ckpt.state.config.get("data") else []),
        ]
    return next((found for c in candidates if (found := find_in(c)) is not None), None)


def fit_vocab(model: GPT, tok: Tokenizer, append: bool = False) -> GPT:
    """``model`` checked against ``tok``: every id the tokenizer makes from text needs a row. GPT-1's
    own tokenizer appends its task tokens after its vocabulary: a model without their rows (a
    released ``openai-gpt`` directory) gets them when ``append`` (new rows, N(0, 0.02), as the
    original appended them at fine-tuning; before any padding rows). A vocabulary that does not fit
    the table is an error naming the tokenizer and both sizes."""
    rows = model.config.vocab_size
    if tok.appended and rows == tok.base_size:
        return with_vocab(model, tok.vocab_size, model.config.vocab_multiple) if append else model
    if tok.vocab_size > rows or (tok.appended and rows != tok.vocab_size):
        sizes = f"{tok.base_size:,} ids" + (f" + {len(tok.appended)} task tokens" if tok.appended else "")
        raise ValueError(
            f"{tok.path}: the tokenizer ({tok.kind}) has {sizes}, but the model's token table has "
            f"{rows:,} rows: they do not belong together"
        )
    return model


def load_model(source: str | Path, tag: str | None = None) -> tuple[GPT, Path | None]:
    """A GPT (fp32, eval mode, CPU) from an HF directory, our safetensors export, or a
    run's checkpoints; and the tokenizer.model found for it (or None)."""
    path = Path(source)
    if (path / OWN_CONFIG_NAME).is_file():
        config = GPTConfig.from_dict(json.loads((path / OWN_CONFIG_NAME).read_text()))
        model = GPT(config)
        model.load_state_dict(_gpt_weights(load_file(str(path / WEIGHTS_NAME)), str(path)))
        return model.eval(), find_tokenizer(path)
    if (path / CONFIG_NAME).is_file():
        return import_hf(path).eval(), find_tokenizer(path)
    model, ckpt = model_from_checkpoint(path, tag)
    return model, find_tokenizer(path, ckpt)


def init_from(model: GPT, source: str, tok: Tokenizer) -> None:
    """Copy the weights of ``source`` (``load_model``) into ``model``; the shapes and the
    tokenizer must be the same."""
    pretrained, tokenizer = load_model(source)
    shape = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
    ours, theirs = model.config.to_dict(), pretrained.config.to_dict()
    differ = {k: (theirs[k], ours[k]) for k in shape if ours[k] != theirs[k]}
    if differ:
        raise ValueError(f"init={source}: the model differs from the run config's: {differ} (init, run)")
    if tokenizer is not None and (theirs := load_tokenizer(tokenizer)).sha256 != tok.sha256:
        raise ValueError(
            f"init={source}: its tokenizer {tokenizer} ({theirs.kind}, sha256 {theirs.sha256[:12]}) is not "
            f"the dataset's {tok.path} ({tok.kind}, sha256 {tok.sha256[:12]})"
        )
    model.load_state_dict(with_vocab(pretrained, ours["vocab_size"], ours["vocab_multiple"]).state_dict())
    log.info("initialised from %s", source)
