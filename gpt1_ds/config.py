"""Run configuration: a typed dataclass, read from YAML, overridden by ``key=value``.

DeepSpeed owns what its JSON holds (batch, optimiser, schedule, precision, ZeRO,
activation checkpointing; ``gpt1_ds.ds_config`` reads and resolves it); this config
owns the model and the run. Any contradiction between the two, the world size and
the dataset's manifest is an error before any compute, naming the values.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import logging
import textwrap
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from gpt1_ds.ds_keys import did_you_mean
from gpt1_ds.heads import CLF_DROPOUT_MASKS, LM_LOSS_AVERAGES
from gpt1_ds.model import GPTConfig
from gpt1_ds.tasks import TRUNCATIONS

log = logging.getLogger(__name__)


@dataclass
class Safeguards:
    """The settings of both configs that guard a run on a cluster (versions, hangs)."""

    allow_untested_versions: bool = False
    """Run with a torch or DeepSpeed release other than the tested ones (``gpt1_ds.env.TESTED``)."""
    collective_timeout: int = 600
    """Seconds a collective may wait for the other ranks before it fails and the rank exits with 76
    (``gpt1_ds.watchdog``): a dead or stuck rank ends the job instead of holding it."""
    stall_timeout: int = 900
    """Seconds without a finished step (or evaluation, checkpoint) before a rank logs its stacks and
    exits with 76, saving nothing; SLURM jobs are then requeued from the last complete checkpoint.
    0: no watchdog."""


@dataclass
class Settings(Safeguards):
    """The settings pretraining and fine-tuning share, declared once (a config overrides a default),
    and what both do with them: YAML in and out, ``key=value`` overrides, checks."""

    what: ClassVar[str] = "run"
    positive: ClassVar[tuple[str, ...]] = ()
    """Fields that must be positive integers."""

    model: str = "gpt1"
    """Model preset (``GPTConfig.from_preset``): ``gpt1`` or ``tiny``; fine-tuning: of a random init."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """GPTConfig fields to change from the preset, e.g. ``{n_layer: 6}`` (fine-tuning: random init only)."""
    run_dir: str = "runs/gpt1"
    """Where checkpoints/, tensorboard/ and config.yaml go (fine-tuning: and results.json)."""
    micro_batch_size: int | str = "auto"
    """Sequences (fine-tuning: examples) per rank per forward pass (the JSON's
    ``train_micro_batch_size_per_gpu``); ``auto``: the largest that divides the global batch per rank
    and is at most ``max_micro_batch_size`` (``resolve_batch``)."""
    max_micro_batch_size: int | None = None
    """The most sequences (examples) one forward pass may hold on a device, for ``micro_batch_size:
    auto``; None: the preset's (``default_max_micro_batch``)."""
    global_batch_size: int | None = None
    """Change the recipe's global batch (the JSON's ``train_batch_size``), e.g. for a world size
    that does not divide it; the learning rate is scaled by √(new / old) (``resolve_batch``)."""
    epochs: int = 100
    """Passes over the training data (GPT-1: 100 in pretraining, 3 in fine-tuning); ``max_steps``
    wins when set."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (overrides ``epochs``)."""
    log_interval: int = 10
    """Steps between console lines and TensorBoard training scalars."""
    keep_checkpoints: int = 3
    """Newest complete checkpoints kept (fine-tuning: besides the best one); older ones are deleted."""
    seed: int = 1234
    """Seed of the initialisation (fine-tuning: the head's), the data order and the dropout masks."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in run_dir, else start), ``none`` (start afresh; refused
    where run_dir holds checkpoints), ``new`` (move run_dir's contents into ``run_dir/previous-N/``,
    then start afresh), or a checkpoint path."""
    ds: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed JSON values this profile changes, by dotted key; ``ds.key=value`` come after."""

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> Any:
        """The YAML file (if any) with ``key=value`` overrides (``model_overrides.n_layer=2``)."""
        config = cls(**read_settings(cls, path, overrides))
        config.validate()
        return config

    def validate(self) -> None:
        run_dir = Path(self.run_dir)
        if blocked := next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None):
            raise ValueError(f"{self.what} setting run_dir {run_dir}: {blocked} is a file, not a directory")
        for name in (*self.positive, "max_steps", "max_micro_batch_size", "global_batch_size"):
            value = getattr(self, name)
            if (name == "micro_batch_size" and value == "auto") or (
                name.endswith("batch_size") and value is None
            ):
                continue
            if (value is not None or name != "max_steps") and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{self.what} setting {name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.stall_timeout, bool)
            or not isinstance(self.stall_timeout, int)
            or self.stall_timeout < 0
        ):
            raise ValueError(
                f"{self.what} setting stall_timeout must be 0 (off) or seconds, got {self.stall_timeout!r}"
            )

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)

    def total_steps(self, per_epoch: int) -> int:
        """Optimiser steps of the run: ``max_steps``, else ``epochs`` × ``per_epoch``."""
        return self.max_steps if self.max_steps is not None else self.epochs * per_epoch


@dataclass
class RunConfig(Settings):
    """Everything about a pretraining run that is not in the DeepSpeed JSON."""

    positive = (
        "micro_batch_size",
        "epochs",
        "log_interval",
        "eval_interval",
        "checkpoint_interval",
        "keep_checkpoints",
        "collective_timeout",
    )

    data: str = ""
    """Dataset directory: ``tokenizer.model``, ``train/``, ``val/`` (from ``data_prep.prepare``)."""
    run_dir: str = "runs/gpt1"
    """Where checkpoints/, tensorboard/ and config.yaml go."""
    epochs: int = 100
    """Passes over the train split (GPT-1: 100); ``max_steps`` wins when set."""
    eval_interval: int = 1000
    """Steps between validation passes (also one at the start and one at the end)."""
    eval_batches: int = 50
    """Validation micro-batches per rank per pass (at most the split)."""
    checkpoint_interval: int = 1000
    """Steps between checkpoints (also one at the end, and on SIGUSR1/SIGTERM)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept; older ones are deleted."""
    init: str | None = None
    """Start from these weights instead of a random init (continued pretraining): an HF
    directory, our safetensors export, or a run's checkpoints. Weights only: step, optimiser
    and data order start afresh. A checkpoint of this run (``resume``) takes precedence."""
    sample_interval: int = 1000
    """Steps between generated samples written to TensorBoard (0: never)."""
    sample_prompt: str = "The"
    """Prompt of the generated samples."""
    sample_tokens: int = 48
    """Tokens generated per sample."""
    num_workers: int = 0
    """DataLoader workers per rank; 0: the training process reads the shards itself. A batch
    through a worker costs the training process about 1 ms of inter-process transfer, a batch read
    in-process GPT-1's 8 sequences per rank a few tens of µs (``benchmarks/bench_step.py``,
    ``bench_loader.py``); workers pay off only where reading stalls (remote shards, slow disks)."""
    shuffle_window: int = 4096
    """Sequences shuffled together in the loader, over the global batch's slots (each slot shuffles
    windows of ``shuffle_window / train_batch_size``). A step's sequences do not depend on the world
    size, micro-batch or workers, so a run resumes exactly on any world size that splits the batch."""
    data_on_error: str = "raise"
    """A training shard that cannot be read (missing, truncated, a member failing its checksum or
    holding ids outside the vocabulary): ``raise`` (an error naming rank, worker, shard and member)
    or ``skip`` (logged, counted; its sequences replaced by another shard's, steps unchanged)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass (DeepSpeed's checkpointing when configured)."""
    compile: bool = False
    """``torch.compile`` the model under the engine (DeepSpeed's ``engine.compile()``: the module's
    forward compiled in place with inductor, ZeRO's gradient hooks left eager, parameter names
    unchanged, so checkpoints and exports are the same). The first steps are slow while it compiles."""
    loss_chunk_size: int = 0
    """Compute the training loss this many positions at a time, recomputing each chunk's logits in
    the backward pass, so that the [B·T, vocab] fp32 logits never exist whole (gpt1, micro-batch 8:
    663 MB); 0: all at once. The same loss and gradients (``model.chunked_lm_loss``)."""
    peak_flops: float | None = None
    """Device peak FLOP/s for MFU; None: from the device name (H100, H200, A100), else no MFU."""
    prep: list[str] = field(default_factory=list)
    """The ``data_prep.prepare`` flags that make ``data`` for this profile (``make demo`` and the
    benchmarks prepare with them; training itself reads the dataset's manifest)."""

    def validate(self) -> None:
        super().validate()
        if self.data_on_error not in ("raise", "skip"):
            raise ValueError(f"run setting data_on_error must be raise or skip, got {self.data_on_error!r}")
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            raise ValueError(f"run setting loss_chunk_size must be 0 or more, got {self.loss_chunk_size!r}")
        self.model_config()  # unknown presets and bad model fields fail here

    def model_config(self) -> GPTConfig:
        overrides = {**self.model_overrides, "activation_checkpointing": self.activation_checkpointing}
        return GPTConfig.from_preset(self.model, **overrides)


def read_settings(cls: type, path: str | Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """Settings for dataclass ``cls`` from a YAML file (if any) and ``key=value`` overrides
    (``outer.inner=value`` sets one key of a mapping); unknown keys are an error naming them."""
    data: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
    given = set()  # the settings the command line sets
    for key, value in parse_overrides(overrides or []).items():
        outer, dot, inner = key.partition(".")
        if dot and not isinstance(data.setdefault(outer, {}), dict):
            raise ValueError(f"override {key}=...: {outer} is not a mapping")
        data[outer] = {**data[outer], inner: value} if dot else value
        given.add(outer)

    def source(name: str) -> str:
        return "given on the command line" if name in given or not path else f"in {path}"

    known = [f.name for f in fields(cls)]
    for name in data:
        if name in REMOVED:
            raise ValueError(f"setting {name!r} ({source(name)}) is gone: {REMOVED[name]}")
        if name not in known:
            raise ValueError(f"unknown setting {name!r} ({source(name)}){unknown_hint(name, known)}")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in data and not _fits(data[f.name], hints[f.name]):
            raise ValueError(f"setting {f.name} ({source(f.name)}) must be {f.type}, got {data[f.name]!r}")
    return data


REMOVED = {
    "data_slots": "a step's sequences depend on train_batch_size alone now, and a run resumes exactly "
    "on any world size that splits it; remove the setting",
}
"""Settings that no longer exist, with what to do instead."""


def unknown_hint(name: str, known: list[str]) -> str:
    """The nearest setting, or the model field ``name`` is (``model_overrides.NAME``), and where
    every setting is listed."""
    model_fields = [f.name for f in fields(GPTConfig)]
    if name in model_fields:
        return f"; it is a model field: model_overrides.{name}=VALUE"
    near = did_you_mean(name, known)
    if not near and (field_hint := did_you_mean(name, model_fields)):
        near = field_hint.replace("mean '", "mean 'model_overrides.")
    return f"{near or ';'} every setting: --help"


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string after its line), over ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            body = ast.parse(inspect.getsource(klass).strip()).body[0].body
        except (OSError, TypeError, IndexError, AttributeError):
            continue
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


def settings_help(cls: type, heading: str) -> str:
    """Every field of dataclass ``cls``: name, type, default and its doc, for ``--help``."""
    docs, lines = field_docs(cls), [heading]
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name}: {f.type} = {default!r}")
        if f.name in docs:
            lines.append(textwrap.fill(docs[f.name], 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a setting's value has its field's type (an int is a float, a bool is not an int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    kind = origin or hint
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass
class FinetuneConfig(Settings):
    """A fine-tuning run (``gpt1_ds.finetune``); GPT-1's recipe by default. Batch, learning rate
    (6.25e-5), schedule and precision are in the DeepSpeed JSON (ds_configs/finetune.json)."""

    task: str = "sst2"
    """A task of the paper read from its official files (``gpt1_ds.paper_tasks``: snli, mnli, qnli,
    scitail, rte, storycloze, race, cola, sst2, mrpc, stsb, qqp: each with its labels, framing and
    metric), or a framing over jsonl/tsv files: classification | entailment | similarity |
    multiple_choice."""
    train: str = ""
    """Training file as the task's release ships it (RACE: a folder, e.g. ``RACE/train``; sst2 also the
    embedded ``LABEL SENTENCE`` lines; a framing: jsonl, or tsv with a header)."""
    dev: str = ""
    """Development file, evaluated after each epoch."""
    extra_dev: dict[str, str] = field(default_factory=dict)
    """More development sets scored with ``dev`` after each epoch, by name (``extra_dev.mismatched=
    MNLI/dev_mismatched.tsv``; RACE's ``middle`` and ``high``): their metrics go into the history as
    ``NAME/metric``; the best checkpoint is still chosen on ``dev``."""
    init: str = "none"
    """Pretrained model: ``RUN/checkpoints`` (or a tag in it), an HF directory, or ``none`` (random)."""
    run_dir: str = "runs/finetune"
    """Where checkpoints/, tensorboard/, config.yaml and results.json go."""
    tokenizer: str | None = None
    """tokenizer.model; default: the one found with the pretrained model."""
    fields: list[str] | None = None
    """Text fields of jsonl/tsv rows; default per task (text; premise, hypothesis; ...)."""
    label_field: str = "label"
    """Field holding the label."""
    labels: list[str] | None = None
    """Class names in head order; default: the sorted labels of the training file."""
    similarity: str = "regression"
    """Similarity head: ``regression`` (one score, MSE) or ``binary``."""
    on_error: str = "raise"
    """Malformed rows: ``raise`` (error naming file and line) or ``skip`` (counted)."""
    task_tokens: str = "new"
    """The rows of ``<start>``, ``<delim>``, ``<extract>`` in a pretrained model: ``new`` (GPT-1: drawn
    afresh from N(0, initializer_range) before fine-tuning, as the original appended them then) or
    ``keep`` (the rows as pretraining left them). A random init or a resume is not affected."""
    lm_coef: float = 0.5
    """Weight of the auxiliary language-modelling loss (GPT-1: 0.5; 0 turns it off)."""
    clf_pdrop: float = 0.1
    """Dropout on the extract token's state before the head."""
    truncation: str = "gpt1"
    """How a framed example longer than the context is cut, each segment keeping its beginning: ``gpt1``
    (GPT-1's rule: each segment to its own fixed share of the context less the control tokens,
    ``(n_ctx - k - 1) // k`` of k segments, 254 tokens each of a pair in 512; room a short segment leaves
    goes unused) or ``shared`` (one budget for the whole example: a short segment leaves its room to the
    longer ones)."""
    lm_loss_average: str = "token"
    """How the auxiliary LM loss is averaged: ``token`` (over every counted token of the batch, as in
    pretraining) or ``sequence`` (GPT-1: each sequence's mean over its own tokens, then the mean over the
    sequences, so a short sequence weighs as much as a long one)."""
    clf_dropout_mask: str = "sequence"
    """Classifier dropout masks: ``sequence`` (an independent mask for each of an example's sequences) or
    ``example`` (GPT-1: one mask per example, shared by its choices or its two orders)."""
    epochs: int = 3
    """Passes over the training file (GPT-1: 3)."""
    warmup_fraction: float = 0.002
    """Warm-up as a fraction of all steps (GPT-1: 0.2%), for ``warmup_num_steps: "auto"``."""
    max_train_examples: int | None = None
    """Use only the first N training examples (quick runs, learning curves)."""
    keep_checkpoints: int = 1
    """Newest complete checkpoints kept besides the best one."""

    what = "fine-tuning"
    positive = ("micro_batch_size", "epochs", "log_interval", "keep_checkpoints", "collective_timeout")

    def validate(self) -> None:
        super().validate()
        if not self.train or not self.dev:
            raise ValueError("fine-tuning needs a training file and a dev file (--train, --dev)")
        if self.lm_coef < 0 or not 0 <= self.clf_pdrop < 1 or not 0 <= self.warmup_fraction < 1:
            raise ValueError("lm_coef must be >= 0, clf_pdrop and warmup_fraction in [0, 1)")
        for name, allowed in (
            ("task_tokens", ("new", "keep")),
            ("truncation", TRUNCATIONS),
            ("lm_loss_average", LM_LOSS_AVERAGES),
            ("clf_dropout_mask", CLF_DROPOUT_MASKS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"fine-tuning setting {name} must be {' or '.join(allowed)}, got {value!r}")


def parse_value(text: str) -> Any:
    """A command-line value: JSON where it parses (``1e-3``, ``true``, ``[0.9, 0.95]``), else YAML
    (``gpt1``, ``null``). YAML alone would read ``1e-3`` as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text) if text else ""


def parse_overrides(items: list[str], prefix: str = "") -> dict[str, Any]:
    """``key=value`` strings as {key: parsed value}; ``prefix`` names them in errors."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {prefix}{item!r} is not {prefix}key=value")
        out[key] = parse_value(value)
    return out
