"""The whole chain: raw books → clean → tokenizer → shards → verify.

    python -m data_prep.prepare --input PATH [PATH ...] --out DIR \\
        [--vocab-size 40478] [--seq-len 512] [--val-fraction F] [--test-fraction F]
    mpirun -np N python -m data_prep.prepare ...      # clean and shard in parallel

Writes ``DIR/clean/``, ``DIR/tokenizer.model`` (+ ``tokenizer_info.json``) and
``DIR/{train,val,test}/`` with shards and ``manifest.json``. Each step's flags
are those of ``python -m data_prep.clean|tokenizer|shard --help``. A rerun with the
same inputs and settings keeps the tokenizer and every shard that are still up to
date. ``DIR`` holding a dataset made from other inputs or settings (or files that are
no dataset) is refused before any work, naming the difference; ``--force`` replaces it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from argparse import Namespace
from pathlib import Path

from data_prep import clean, shard, tokenizer, verify
from data_prep.common import launch, run_command, step_parser
from gpt1_ds.manifest import MANIFEST_NAME, SPLITS_NAME, read_manifest, read_splits
from gpt1_ds.tokenizer import MODEL_NAME, info_file

log = logging.getLogger("data_prep.prepare")


def main(argv: list[str] | None = None) -> int:
    """The command (``gpt1-ds prepare``): its exit code, bad input in one line (``run_command``)."""
    return run_command(lambda: prepare(argv))


def prepare(argv: list[str] | None = None) -> None:
    adders = (clean.add_arguments, tokenizer.add_arguments, shard.add_arguments)
    parser = step_parser("data_prep.prepare", __doc__, *adders)
    parser.add_argument(
        "--force",
        action="store_true",
        help="redo every step (retrain the tokenizer, rewrite every shard), replacing a dataset in --out "
        "made from other inputs or settings",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-verify", action="store_true", help="skip the final verification")
    args, comm = launch(parser, argv)
    args.data = args.out
    t0 = time.perf_counter()
    check_out(args)

    clean.run(args, comm)
    comm.barrier()
    tokenizer.run(args, comm)
    written = shard.run(args, comm)
    if comm.is_root and not args.no_verify:
        problems = verify.verify(args.out, list(written))  # the splits that have documents
        for p in problems:
            log.error("verify: %s", p)
        if problems:
            sys.exit(1)
        log.info("prepared and verified %s in %.1f s", args.out, time.perf_counter() - t0)


def check_out(args: Namespace) -> None:
    """Refuse ``--out`` where it holds files that are no dataset, or a dataset made from other
    inputs or settings (naming the differences), unless ``--force``; before any work."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    found = differences(out, args)
    if found is None:
        problem = "is not empty and holds no dataset"
    elif found:
        problem = f"holds a dataset made from other inputs or settings ({'; '.join(found)})"
    else:
        return  # the same dataset: the rerun keeps what is up to date
    if not args.force:
        raise ValueError(f"--out {out} {problem}: choose another --out, or replace it with --force")
    log.warning("--out %s %s: replacing it (--force)", out, problem)


def differences(out: Path, args: Namespace) -> list[str] | None:
    """How the dataset in ``out`` differs from what ``args`` would make (empty: the same), from
    what its steps recorded; None where ``out`` holds no dataset."""
    splits_file = out / "clean" / SPLITS_NAME
    manifests = [out / split / MANIFEST_NAME for split in ("train", "val", "test")]
    info = info_file(out)
    if not ((out / "clean").is_dir() or (out / MODEL_NAME).is_file() or any(m.is_file() for m in manifests)):
        return None
    found = []
    if splits_file.is_file():
        splits = read_splits(out)
        report = out / "clean" / "report.json"
        skipped = json.loads(report.read_text())["skipped"] if report.is_file() else []
        had = {Path(d["source"]).name for d in splits["docs"].values()} | {
            Path(s["file"]).name for s in skipped
        }
        given = {f.name for f in clean.expand_inputs(args.input)}
        found += _changed("inputs", sorted(had - given), sorted(given - had))
        found += _settings(splits["settings"], args, clean.SETTINGS)
    if info is not None:
        settings = json.loads(info.read_text()).get("settings", {})
        found += _settings(settings, args, tokenizer.SETTINGS)
    for manifest in filter(Path.is_file, manifests):
        found += _settings(read_manifest(manifest.parent), args, ("seq_len", "sequences_per_sample"))
    return list(dict.fromkeys(found))


def _changed(what: str, gone: list[str], new: list[str]) -> list[str]:
    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    parts = ([f"{len(gone)} not given now ({some(gone)})"] if gone else []) + (
        [f"{len(new)} new ({some(new)})"] if new else []
    )
    return [f"{what}: {', '.join(parts)}"] if parts else []


def _settings(recorded: dict, args: Namespace, keys: tuple[str, ...]) -> list[str]:
    return [
        f"--{k.replace('_', '-')} {recorded[k]} then, {getattr(args, k)} now"
        for k in keys
        if k in recorded and recorded[k] != getattr(args, k)
    ]


if __name__ == "__main__":
    sys.exit(main())
