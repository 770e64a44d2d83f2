"""Data-prep throughput: clean, tokenize+shard and the whole chain, 1 and 2 MPI ranks.

    python benchmarks/bench_prep.py --corpus ../shared/corpus/books --list ../shared/corpus/books_small.txt
    python benchmarks/bench_prep.py --corpus ../shared/corpus/books          # all files
    python benchmarks/bench_prep.py --corpus data/sample                     # the embedded sample

Measured in one run on the same text: (1) each step in one process; (2) the
baseline, plain ``sentencepiece`` encoding of the same cleaned text in one process
with the same model; (3) ``clean`` + ``shard`` as commands under ``mpirun -np 1``
and ``-np 2`` (wall time, start-up included) for the scaling; (4) tokenizer
training time; (5) shard bytes over raw uint16 token bytes. MB are 10^6 bytes of
raw input text (for ``tokenize``: of cleaned text). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import sentencepiece as spm

from data_prep import clean, shard, tokenizer
from data_prep.common import Comm
from data_prep.manifest import read_manifest

REPO = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def namespace(parser_fn, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser_fn(parser)
    args = parser.parse_args(argv)
    args.quiet = True
    return args


def run_cmd(cmd: list[str], ranks: int) -> float:
    mpirun = Path(sys.executable).parent / "mpirun"
    full = [str(mpirun), "--allow-run-as-root", "--oversubscribe", "-np", str(ranks), sys.executable, *cmd]
    start = time.perf_counter()
    subprocess.run(full, check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--corpus", required=True, help="directory of books")
    parser.add_argument("--list", help="file naming the books to take (one a line), e.g. books_small.txt")
    parser.add_argument("--vocab-size", type=int, default=40478)
    parser.add_argument(
        "--tokenizer-sample-bytes",
        type=int,
        default=20_000_000,
        help="text the tokenizer trains on (bounds its time)",
    )
    parser.add_argument(
        "--shard-bytes", type=int, default=4 * 2**20, help="small enough that both ranks get many shards"
    )
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    corpus = Path(args.corpus)
    inputs = [str(corpus / n) for n in Path(args.list).read_text().split()] if args.list else [str(corpus)]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_prep_"))
    ds = work / "ds"
    shutil.rmtree(ds, ignore_errors=True)
    common = ["--val-fraction", "0.01", "--test-fraction", "0.01"]
    clean_args = namespace(clean.add_arguments, ["--input", *inputs, "--out", str(ds), *common])
    shard_args = namespace(shard.add_arguments, ["--shard-bytes", str(args.shard_bytes), "--force"])
    shard_args.data = str(ds)

    t_clean, report = timed(lambda: clean.run(clean_args, Comm()))
    raw_mb, clean_mb = report["bytes_in"] / 1e6, report["bytes_out"] / 1e6
    t_tok, tok = timed(
        lambda: tokenizer.ensure_tokenizer(
            ds, force=True, vocab_size=args.vocab_size, sample_bytes=args.tokenizer_sample_bytes
        )
    )
    t_shard, manifests = timed(lambda: shard.run(shard_args, Comm()))

    # Baseline: sentencepiece alone on the same cleaned text, one process.
    sp = spm.SentencePieceProcessor(model_file=str(ds / tokenizer.MODEL_NAME))
    texts = [p.read_text(encoding="utf-8") for p in sorted((ds / "clean" / "docs").glob("*.txt"))]
    t_raw, _ = timed(lambda: [sp.encode(t.split("\n"), num_threads=1) for t in texts])

    # Scaling: the clean and shard commands under mpirun -np 1 and -np 2.
    clean_cmd = ["-m", "data_prep.clean", "--input", *inputs, "--out", str(ds), *common, "--quiet"]
    shard_cmd = [
        "-m",
        "data_prep.shard",
        "--data",
        str(ds),
        "--shard-bytes",
        str(args.shard_bytes),
        "--force",
        "--quiet",
    ]
    wall = {n: run_cmd(clean_cmd, n) + run_cmd(shard_cmd, n) for n in (1, 2)}

    totals = {s: read_manifest(ds / s) for s in manifests}
    tokens = sum(m["total_tokens"] for m in totals.values())
    token_bytes = sum(2 * m["total_sequences"] * (m["seq_len"] + 1) for m in totals.values())
    shard_bytes = sum(m["total_bytes"] for m in totals.values())
    chain = raw_mb / (t_clean + t_shard)
    raw_rate = clean_mb / t_raw
    rows = [
        ("clean (1 process)", f"{raw_mb / t_clean:.1f} MB/s", f"{t_clean:.1f} s"),
        ("tokenize + pack + write (1 process)", f"{clean_mb / t_shard:.1f} MB/s", f"{t_shard:.1f} s"),
        ("baseline: sentencepiece encode alone (1 process)", f"{raw_rate:.1f} MB/s", f"{t_raw:.1f} s"),
        ("whole chain, clean + shard (1 process)", f"{chain:.1f} MB/s", f"{t_clean + t_shard:.1f} s"),
        ("whole chain / baseline encode", f"{chain / raw_rate:.2f}×", ""),
        ("commands, mpirun -np 1", f"{raw_mb / wall[1]:.1f} MB/s", f"{wall[1]:.1f} s"),
        ("commands, mpirun -np 2", f"{raw_mb / wall[2]:.1f} MB/s", f"{wall[2]:.1f} s"),
        ("speed-up with 2 ranks", f"{wall[1] / wall[2]:.2f}×", ""),
        (
            f"tokenizer training ({tok.vocab_size:,} pieces, "
            f"{args.tokenizer_sample_bytes / 1e6:.0f} MB sample)",
            "",
            f"{t_tok:.1f} s",
        ),
        ("shard bytes over raw uint16 token bytes", f"+{100 * (shard_bytes / token_bytes - 1):.2f}%", ""),
        (
            "shard bytes over 2 bytes per token of the stream",
            f"+{100 * (shard_bytes / (2 * tokens) - 1):.2f}%",
            "",
        ),
    ]
    print(
        f"\ndata prep: {len(texts)} books, {raw_mb:.1f} MB raw → {clean_mb:.1f} MB clean → "
        f"{tokens:,} tokens; "
        f"{cpu_name()}, {os.cpu_count()} cores; {date.today()}\n"
    )
    print("| measure | rate | time |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "books": len(texts),
                    "raw_mb": raw_mb,
                    "tokens": tokens,
                    "date": str(date.today()),
                },
                indent=1,
            )
        )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
