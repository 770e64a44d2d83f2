"""A DeepSpeed JSON's keys checked against what the installed DeepSpeed reads, before any compute.

DeepSpeed ignores a top-level key it does not know (``zero_optimisation`` runs without ZeRO's
settings) and passes ``optimizer.params`` to the optimizer's constructor (``lrr`` ends in a
``TypeError`` deep in ``initialize``). ``check_ds_keys`` refuses both in one line with the
nearest valid key:

- top-level keys: those DeepSpeed's own ``DeepSpeedConfig`` reads (recorded while it parses the
  config) and the names in ``deepspeed.runtime.constants``;
- sections (``zero_optimization``, ``bf16``, ``fp16``, ``compile``, the monitors, …): DeepSpeed's own
  pydantic models, which forbid unknown keys; their other errors (a wrong type) are named too;
- ``optimizer.params`` of Adam and AdamW: the signature of the optimizer DeepSpeed will build
  (FusedAdam, DeepSpeedCPUAdam under optimizer offload, torch's with ``torch_adam``) and the keys
  DeepSpeed takes out first; ``scheduler.params``: the signature of DeepSpeed's scheduler class.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
from collections.abc import Iterable
from typing import Any

ADAM_KEYS_TAKEN = ("adam_w_mode", "torch_adam", "fp32_optimizer_states")
"""``optimizer.params`` DeepSpeed takes out before building Adam (``engine.get_optimizer_configuration``)."""


class _Reads(dict):
    """A dict that records the keys read from it (DeepSpeed copies it shallowly: the copy is itself)."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def __copy__(self) -> _Reads:
        return self

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` with the known name nearest to ``key``, or ``""`` if none is near."""
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _model_fields(model: type) -> dict[str, Any]:
    """A pydantic model's fields by name and by alias."""
    fields = {}
    for name, info in model.model_fields.items():
        fields[name] = info
        if info.alias:
            fields[info.alias] = info
    return fields


def _pydantic_message(error: Any, ds: dict[str, Any]) -> str:
    """One line for a DeepSpeed section's ``ValidationError``: the dotted key and what is wrong."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    models, todo = {}, [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        models[cls.__name__] = cls
        todo += cls.__subclasses__()
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    section = next((k for k, v in ds.items() if isinstance(v, dict) and _has_path(v, loc)), None)
    key = ".".join([section, *loc] if section else loc)
    if first["type"] != "extra_forbidden":
        return f"{key}: {first['msg']} (got {first.get('input')!r})"
    model, known = models.get(error.title), None
    for part in loc[:-1]:  # the nested model that holds the key
        field = _model_fields(model).get(part) if model else None
        model = _nested_model(field.annotation) if field else None
    if model is not None:
        known = _model_fields(model)
    return f"{key}: not a key DeepSpeed knows{did_you_mean(loc[-1], known or ())}"


def _has_path(node: dict[str, Any], path: list[str]) -> bool:
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _nested_model(annotation: Any) -> type | None:
    """The pydantic model in a field's annotation (``Model``, ``Optional[Model]``), if any."""
    from typing import get_args

    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
            return candidate
    return None


def _top_level(ds: dict[str, Any]) -> tuple[set[str], str | None]:
    """(the top-level keys DeepSpeed read or names as constants, a section's error or None)."""
    import deepspeed.runtime.constants as constants
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = _Reads(copy.deepcopy(ds))
    # Batch sizes are checked for the run's world size elsewhere: here one sequence a rank.
    probe.pop("train_batch_size", None)
    probe.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    problem = None
    ds_log = logging.getLogger("DeepSpeed")
    level = ds_log.level
    ds_log.setLevel(logging.ERROR)
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as e:
        problem = _pydantic_message(e, ds)
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        problem = f"DeepSpeed refuses it: {e}"
    finally:
        ds_log.setLevel(level)
    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    return probe.read | names, problem


def _adam_class(ds: dict[str, Any]) -> type:
    """The Adam DeepSpeed builds for this config (``engine.get_optimizer_configuration``)."""
    params = ds.get("optimizer", {}).get("params") or {}
    if params.get("torch_adam"):
        import torch

        return torch.optim.AdamW
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device") in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam


def _signature_keys(cls: type, skip: Iterable[str]) -> set[str]:
    names = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    return names - set(skip)


def _section_params(ds: dict[str, Any]) -> str | None:
    """The first unknown ``optimizer.params`` or ``scheduler.params`` key, as a message, or None."""
    from deepspeed.runtime import lr_schedules

    checks = []
    optimizer = ds.get("optimizer") or {}
    if str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        cls = _adam_class(ds)
        given_by_ds = ("adam_w_mode", "adamw_mode", "fp32_optimizer_states", "foreach")
        known = _signature_keys(cls, ("params", "model_params", *given_by_ds)) | set(ADAM_KEYS_TAKEN)
        checks.append(("optimizer", optimizer, known, cls.__name__))
    scheduler = ds.get("scheduler") or {}
    cls = getattr(lr_schedules, str(scheduler.get("type")), None)
    if scheduler.get("type") in lr_schedules.VALID_LR_SCHEDULES and isinstance(cls, type):
        checks.append(("scheduler", scheduler, _signature_keys(cls, ("optimizer",)), cls.__name__))
    for section, node, known, name in checks:
        for key in node.get("params") or {}:
            if key not in known:
                return f"{section}.params.{key}: {name} takes no such argument{did_you_mean(key, known)}"
    return None


def check_ds_keys(ds: dict[str, Any], where: str, overrides: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` naming the first key of ``ds`` that DeepSpeed does not read or refuses
    (``where``: the JSON's path; ``overrides``: the dotted ``ds.`` keys given, named when at fault)."""
    known, problem = _top_level(ds)  # a section DeepSpeed refuses first: it stopped reading there
    unknown = [k for k in ds if k not in known]
    if problem is None and unknown:
        problem = f"{unknown[0]}: not a key DeepSpeed reads{did_you_mean(unknown[0], known)}"
    problem = problem or _section_params(ds)
    if problem is None:
        return
    bad = problem.split(":", 1)[0]
    given = next(
        (k for k in overrides if bad == k or bad.startswith(k + ".") or k.startswith(bad + ".")), None
    )
    source = f" (set by ds.{given})" if given else ""
    raise ValueError(f"{where}: {problem}{source}")
