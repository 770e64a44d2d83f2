"""One command for everything: ``gpt1-ds VERB [ARGS...]`` (or ``python -m gpt1_ds VERB ...``).

Each verb runs its module exactly as ``python -m MODULE ARGS...`` does (its own flags,
``--help`` and exit code), so ``deepspeed gpt1_ds/train.py ...`` and the module commands keep
working beside it. The verbs are found by module name and described by the first line of the
module's docstring, read without importing it: ``gpt1-ds`` alone lists them at once, and the
library never imports ``data_prep`` for the verbs that run it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import runpy
import sys
from pathlib import Path

VERBS = {
    "prepare": "data_prep.prepare",
    "clean": "data_prep.clean",
    "tokenizer": "data_prep.tokenizer",
    "shard": "data_prep.shard",
    "verify": "data_prep.verify",
    "preflight": "gpt1_ds.preflight",
    "train": "gpt1_ds.train",
    "finetune": "gpt1_ds.finetune",
    "suite": "gpt1_ds.suite",
    "export": "gpt1_ds.export",
    "generate": "gpt1_ds.generate",
    "evaluate": "gpt1_ds.evaluate",
    "plot": "gpt1_ds.plot",
    "openai-bpe": "gpt1_ds.openai_bpe",
    "ops": "gpt1_ds.ops",
    "model": "gpt1_ds.model",
}
"""Verb → the module it runs, in the order of the data's flow."""

EXIT_CODES = {
    0: "done",
    1: "failed: an error during the work (a non-finite loss named with its step, a checkpoint that could "
    "not be saved, an out-of-memory named with what shrinks the model)",
    2: "refused: bad input or settings, named in one line before any compute; nothing was changed",
    75: "preempted (SIGUSR1 or SIGTERM): a checkpoint was saved; rerun with resume=auto (EX_TEMPFAIL)",
    76: "hung: a rank stalled or a collective timed out; the run directory's HUNG file says which",
}
"""Every exit code a gpt1-ds command ends with (``distributed.PREEMPTED_EXIT``, ``runner.SETUP_ERROR_EXIT``,
``watchdog.HUNG_EXIT``); the README's table is this one."""


def summary(module: str) -> str:
    """The first line of ``module``'s docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return "(not installed)"
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    first = " ".join(doc.split("\n\n")[0].split())  # the first paragraph, on one line
    return first.split(". ")[0].rstrip(".").replace("``", "")


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {verb:<{width}}  {summary(module)}" for verb, module in VERBS.items()]
    codes = [f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items()]
    return "\n".join(
        [
            "usage: gpt1-ds VERB [ARGS...]   (python -m gpt1_ds VERB ...; gpt1-ds VERB --help for its flags)",
            "",
            "verbs:",
            *lines,
            "",
            "several ranks: deepspeed gpt1_ds/train.py ..., torchrun, srun or mpirun (README, 'Launchers')",
            "",
            "exit codes:",
            *codes,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        near = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        print(f"gpt1-ds: unknown verb {verb!r}; {hint}gpt1-ds --help lists them", file=sys.stderr)
        return 2
    sys.argv = [f"gpt1-ds {verb}", *rest]
    try:
        runpy.run_module(VERBS[verb], run_name="__main__", alter_sys=True)
    except SystemExit as e:  # as Python ends: a number is the code, a message is printed with 1
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0
