"""DeepSpeed's compiled ops, built once per node (``make setup`` builds those of a CPU run).

FusedAdam (CUDA's, or the CPU's build), CPU Adam for optimiser offload, and on the CPU the
shared-memory collectives op ``init_distributed`` loads.

DeepSpeed compiles an op the first time a process needs it, into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, often on a home directory that
every node shares). Started by every rank at once, the builds queue on one lock file in one build
directory; a rank killed while it holds the lock (a preemption, a time limit) leaves the file behind
and every later run waits on it forever. So here the first rank of each node loads the op (building
it if the cache has none) while the node's other ranks wait at a barrier, then they load the cached
build; and a lock older than ``STALE_LOCK_SECONDS`` is removed with a warning naming it.

Where a CUDA toolchain exists, ``make setup`` builds the ops into DeepSpeed itself instead
(``DS_BUILD_FUSED_ADAM=1``, ``DS_BUILD_CPU_ADAM=1``); elsewhere it runs ``python -m gpt1_ds.ops``,
which builds into the cache every op the CPU path loads: nothing is compiled at run time.

A build's compilers run with USR1 held (``signals_held``): SLURM signals every process of a job
step, and a preemption request arriving during start-up would otherwise kill ``ninja`` and with
it the run; held, it reaches the run's handler once the build is done.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import platform
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt1_ds.env import quiet_libraries

log = logging.getLogger(__name__)

STALE_LOCK_SECONDS = 1800
"""A build lock this old was left by a killed build (an op compiles in a few minutes)."""


BUILDERS = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder", "shm_comm": "ShareMemCommBuilder"}
"""Our names of the ops, and the builder class the accelerator (CUDA or CPU) makes for each."""


def needed(ds_cfg: dict[str, Any], device_type: str) -> list[str]:
    """The ops DeepSpeed will load for this config: ``fused_adam`` (Adam(W), unless ``torch_adam``;
    on the CPU its CPU build), ``cpu_adam`` (optimiser offload)."""
    optimizer = ds_cfg.get("optimizer") or {}
    adam = str(optimizer.get("type", "")).lower() in ("adam", "adamw")
    offload = ((ds_cfg.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    if adam and offload in ("cpu", "nvme"):
        return ["cpu_adam"]
    if adam and not (optimizer.get("params") or {}).get("torch_adam"):
        return ["fused_adam"]
    return []


PROC_CPUINFO = Path("/proc/cpuinfo")
ARCHES = {"x86_64": ("X86_64", "flags"), "aarch64": ("ARM_8", "Features")}
"""Linux's machine name → py-cpuinfo's ``arch`` and the ``/proc/cpuinfo`` line listing the flags."""


def proc_cpu_info() -> dict[str, Any] | None:
    """The two fields of py-cpuinfo's answer that DeepSpeed's op builders read (``arch``, ``flags``:
    ``-march``, and AVX-512, AVX2, SVE or NEON code), from ``/proc/cpuinfo``; None where that file
    or this architecture's line is missing."""
    arch, key = ARCHES.get(platform.machine(), (None, None))
    try:
        lines = PROC_CPUINFO.read_text().splitlines() if arch else []
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() == key:
            return {"arch": arch, "flags": value.split()}
    return None


def quick_cpu_info() -> None:
    """Make py-cpuinfo's ``get_cpu_info`` (which DeepSpeed's builders import on each call) answer
    from ``proc_cpu_info`` or, where that has no answer, from one call of its own per process."""
    try:
        import cpuinfo  # DeepSpeed's dependency; without it DeepSpeed runs lscpu instead
    except ImportError:
        return
    if getattr(cpuinfo.get_cpu_info, "quick", False):
        return
    slow, answer = cpuinfo.get_cpu_info, proc_cpu_info()

    def get_cpu_info() -> dict[str, Any]:
        nonlocal answer
        if answer is None:
            answer = slow()
        return {**answer, "flags": list(answer["flags"])}

    get_cpu_info.quick = True  # type: ignore[attr-defined]
    cpuinfo.get_cpu_info = get_cpu_info


MUON = "deepspeed.runtime.zero.muon.original_muon"
"""DeepSpeed's Muon optimizer, which ZeRO imports to check any optimizer it is given."""


def compile_on_first_call(fn: Any = None, **kwargs: Any) -> Any:
    """``torch.compile(fn, **kwargs)`` made on ``fn``'s first call: ``torch.compile`` defers the
    compilation itself to the first call too, but imports torch's compiler at once."""
    if fn is None:  # @torch.compile(mode=...)
        return functools.partial(compile_on_first_call, **kwargs)
    compiled = None

    @functools.wraps(fn)
    def call(*args: Any, **kw: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, **kwargs)
        return compiled(*args, **kw)

    return call


def defer_muon_compile() -> None:
    """Import ``MUON`` with ``compile_on_first_call`` for its ``@torch.compile`` decorations:
    decorating imports torch's inductor, about 1.5 s of every process's start-up, for an
    optimizer that no run here uses."""
    if MUON in sys.modules:
        return
    real = torch.compile
    torch.compile = compile_on_first_call  # type: ignore[assignment]
    try:
        importlib.import_module(MUON)
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        torch.compile = real


DYNAMO_WRAPPED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")
"""The methods of ``torch.optim.Optimizer`` that torch wraps with ``torch._disable_dynamo``."""


def eager_optimizer_methods() -> list[str]:
    """Let ``DYNAMO_WRAPPED`` run as they are written; the names changed.

    torch wraps them so that code it compiles does not trace into them, and makes the wrapper
    (``torch._dynamo.disable``) on the first call, importing its compiler: about 1.7 s of every
    rank's start-up, since every optimizer's constructor calls ``add_param_group``. A run that
    compiles no code calling the optimizer never uses the wrapper: here it is cached as the method
    itself, in the attribute where ``torch._compile._disable_dynamo`` caches the one it makes.
    Methods wrapped some other way (another torch) are left as they are."""
    import torch._compile

    changed = []
    for name in DYNAMO_WRAPPED:
        method = getattr(torch.optim.Optimizer, name)
        code, fn = getattr(method, "__code__", None), getattr(method, "__wrapped__", None)
        ours = code is not None and code.co_filename == torch._compile.__file__ and code.co_name == "inner"
        if ours and fn is not None and getattr(fn, "__dynamo_disable", None) is None:
            setattr(fn, "__dynamo_disable", fn)
            changed.append(name)
    return changed


def _builder(name: str) -> Any:
    from deepspeed.accelerator import get_accelerator

    quick_cpu_info()
    return get_accelerator().create_op_builder(BUILDERS[name])


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """USR1 held (pending) inside the block, in this process and the compilers it starts (they
    inherit the mask); delivered to the run's handler when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def clear_stale_lock(name: str, max_age: float = STALE_LOCK_SECONDS) -> Path | None:
    """Remove the op's build lock when it is older than ``max_age`` seconds; returns it if removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(_builder(name).NAME, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return None
    if age < max_age:
        return None
    log.warning(
        "removing %s: a build of %s killed %.0f min ago left it, and it blocks every build",
        lock,
        name,
        age / 60,
    )
    lock.unlink(missing_ok=True)
    return lock


def load(name: str) -> str | None:
    """Load (building if needed) one op; why it cannot be, or None."""
    try:
        with signals_held():
            _builder(name).load(verbose=False)
    except Exception as e:  # no nvcc, a compiler error, a missing header: any of them means no op
        return f"{type(e).__name__}: {str(e).strip()[:300]}"
    return None


def build_once(names: list[str], node_leader: bool, device: torch.device) -> dict[str, str | None]:
    """Load ``names`` on the node's first rank, then on the others; every rank gets the same
    answer per op: None (loaded) or why not (when it failed on any rank)."""
    failed: dict[str, str | None] = {}
    for name in names:
        if node_leader:
            clear_stale_lock(name)
            start = time.perf_counter()
            failed[name] = load(name)
            log.info(
                "DeepSpeed op %s: %s in %.1f s", name, failed[name] or "loaded", time.perf_counter() - start
            )
        if dist.is_initialized():
            dist.barrier()
        if not node_leader:
            failed[name] = load(name)
        if dist.is_initialized():
            flag = torch.tensor([float(failed[name] is not None)], dtype=torch.float64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and failed[name] is None:
                failed[name] = "it could not be loaded on another rank"
    return failed


def prebuild() -> int:
    """Build into the cache every op a CPU run loads (``make setup`` where torch has no CUDA):
    the shared-memory collectives, FusedAdam's and CPU Adam's CPU builds; the exit code."""
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = ["shm_comm", "fused_adam", "cpu_adam"] if not torch.cuda.is_available() else []
    failed = {}
    for name in names:
        start = time.perf_counter()
        clear_stale_lock(name)
        failed[name] = load(name)
        log.info("DeepSpeed op %s: %s in %.1f s", name, failed[name] or "built", time.perf_counter() - start)
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(prebuild())
