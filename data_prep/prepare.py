"""The whole chain: raw books → clean → tokenizer → shards → verify.

    python -m data_prep.prepare --input PATH [PATH ...] --out DIR \\
        [--vocab-size 40478] [--seq-len 512] [--val-fraction F] [--test-fraction F]
    mpirun -np N python -m data_prep.prepare ...      # clean and shard in parallel

Writes ``DIR/clean/``, ``DIR/tokenizer.model`` (+ ``tokenizer.json``) and
``DIR/{train,val,test}/`` with shards and ``manifest.json``. Each step's flags
are those of ``python -m data_prep.clean|tokenizer|shard --help``. A rerun keeps
the tokenizer and every shard that are still up to date.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from data_prep import clean, shard, tokenizer, verify
from data_prep.common import get_comm
from gpt1_ds.env import setup_logging

log = logging.getLogger("data_prep.prepare")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    clean.add_arguments(parser)
    tokenizer.add_arguments(parser)
    shard.add_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-verify", action="store_true", help="skip the final verification")
    args = parser.parse_args(argv)
    args.data = args.out
    comm = get_comm()
    setup_logging(comm.rank, comm.size)
    start = time.perf_counter()

    clean.run(args, comm)
    comm.barrier()
    if comm.is_root:
        tokenizer.ensure_tokenizer(args.out, force=args.force, **tokenizer.tokenizer_settings(args))
    comm.barrier()
    shard.run(args, comm)
    if comm.is_root and not args.no_verify:
        problems = verify.verify(args.out, args.splits)
        for p in problems:
            log.error("verify: %s", p)
        if problems:
            sys.exit(1)
        log.info("prepared and verified %s in %.1f s", args.out, time.perf_counter() - start)


if __name__ == "__main__":
    main()
