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

import logging
import sys
import time

from data_prep import clean, shard, tokenizer, verify
from data_prep.common import launch, step_parser

log = logging.getLogger("data_prep.prepare")


def main(argv: list[str] | None = None) -> None:
    adders = (clean.add_arguments, tokenizer.add_arguments, shard.add_arguments)
    parser = step_parser("data_prep.prepare", __doc__, *adders)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-verify", action="store_true", help="skip the final verification")
    args, comm = launch(parser, argv)
    args.data = args.out
    t0 = time.perf_counter()

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


if __name__ == "__main__":
    main()
