"""Data-prep throughput: clean, tokenize+shard and the whole chain, 1 and 2 MPI ranks.

    python benchmarks/bench_prep.py --corpus ../shared/corpus/books --list ../shared/corpus/books_small.txt
    python benchmarks/bench_prep.py --corpus ../shared/corpus/books          # all files
    python benchmarks/bench_prep.py --corpus data/sample                     # the embedded sample

Measured in one run on the same text: (1) each step in one process; (2) the
baseline, plain ``sentencepiece`` encoding of the same cleaned text in one process
with the same model; (3) ``clean`` + ``shard`` as commands under ``mpirun -np 1``
and ``-np 2`` (wall time, start-up included) for the scaling; (4) tokenizer
training time; (5) shard bytes over raw uint16 token bytes; (6) the same text as a
book of paragraphs and as one long line at ``--line-mb`` sizes (4, 8, 16, 50 MB): each
step's time, seconds per MB and their ratio. MB are 10^6 bytes of raw input text (for
``tokenize``: of cleaned text). Prints a markdown table;
``--json PATH`` writes it as JSON too (``benchmarks/benchlib.py``). ``--quick``:
a 2,000-piece tokenizer from 2 MB, 200 kB shards, books of 0.5 and 1 MB for (6).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import sentencepiece as spm

from data_prep import clean, shard, tokenizer
from data_prep.common import Comm
from gpt1_ds.manifest import read_manifest
from gpt1_ds.tokenizer import GPT1_VOCAB_SIZE, MODEL_NAME

REPO = Path(__file__).resolve().parent.parent


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


QUICK = {
    "vocab_size": 2000,
    "tokenizer_sample_bytes": 2_000_000,
    "shard_bytes": 200_000,
    "line_mb": [0.5, 1.0],
}


def prepare_in_process(
    inputs: list[str], ds: Path, vocab_size: int, sample_bytes: int, shard_bytes: int
) -> dict:
    """``prepare``'s steps in this process (clean, tokenizer, shard): each step's seconds."""
    common = ["--val-fraction", "0", "--test-fraction", "0"]
    clean_args = namespace(clean.add_arguments, ["--input", *inputs, "--out", str(ds), *common])
    shard_args = namespace(shard.add_arguments, ["--shard-bytes", str(shard_bytes)])
    shard_args.force = True
    shard_args.data = str(ds)
    steps = {
        "clean": lambda: clean.run(clean_args, Comm()),
        "tokenizer": lambda: tokenizer.ensure_tokenizer(
            ds, force=True, vocab_size=vocab_size, sample_bytes=sample_bytes
        ),
        "shard": lambda: shard.run(shard_args, Comm()),
    }
    return {name: timed(step)[0] for name, step in steps.items()}


def line_length_table(
    texts: list[str], sizes: list[float], work: Path, args: argparse.Namespace
) -> benchlib.Table:
    """The same text as a book of paragraphs and as one line, at each size: seconds per MB of each
    and their ratio (a book that is one long line must cost what ordinary books do)."""
    paragraphs = "\n\n".join(texts)
    rows: list[list[benchlib.Cell]] = []
    for mb in sizes:
        size = int(mb * 1e6)
        text = (paragraphs * (size // len(paragraphs) + 1))[:size]
        per_mb = {}
        for shape, body in (("paragraphs", text), ("one line", " ".join(text.split()))):
            book = work / f"line_{mb:g}_{shape.replace(' ', '_')}"
            shutil.rmtree(book, ignore_errors=True)
            (book / "in").mkdir(parents=True)
            (book / "in" / "book.txt").write_text(body, encoding="utf-8")
            steps = prepare_in_process(
                [str(book / "in")],
                book / "ds",
                args.vocab_size,
                args.tokenizer_sample_bytes,
                args.shard_bytes,
            )
            per_mb[shape] = sum(steps.values()) / mb
            rows.append(
                [
                    f"{mb:g} MB, {shape}",
                    *(steps[k] for k in ("clean", "tokenizer", "shard")),
                    per_mb[shape],
                    None,
                ]
            )
            shutil.rmtree(book, ignore_errors=True)
        rows[-1][-1] = per_mb["one line"] / per_mb["paragraphs"]
    return benchlib.table(
        "One book as paragraphs and as one long line: `prepare`'s steps in one process",
        {
            "text": "{}",
            "clean (s)": "{:.2f}",
            "tokenizer (s)": "{:.2f}",
            "shard (s)": "{:.2f}",
            "s/MB": "{:.3f}",
            "one line / paragraphs": "{:.2f}×",
        },
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--corpus", help="directory of books (default: the embedded sample, data/sample)")
    parser.add_argument("--list", help="file naming the books to take (one a line), e.g. books_small.txt")
    parser.add_argument("--vocab-size", type=int, default=GPT1_VOCAB_SIZE)
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
    parser.add_argument(
        "--line-mb",
        type=float,
        nargs="+",
        default=[4, 8, 16, 50],
        help="sizes (MB) of the book timed as paragraphs and as one line",
    )
    args = benchlib.parse_args(parser, QUICK)

    corpus = Path(args.corpus) if args.corpus else REPO / "data" / "sample"
    inputs = [str(corpus / n) for n in Path(args.list).read_text().split()] if args.list else [str(corpus)]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_prep_"))
    ds = work / "ds"
    shutil.rmtree(ds, ignore_errors=True)
    common = ["--val-fraction", "0.01", "--test-fraction", "0.01"]
    clean_args = namespace(clean.add_arguments, ["--input", *inputs, "--out", str(ds), *common])
    shard_args = namespace(shard.add_arguments, ["--shard-bytes", str(args.shard_bytes)])
    shard_args.force = True
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
    sp = spm.SentencePieceProcessor(model_file=str(ds / MODEL_NAME))
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
    rows: list[list[benchlib.Cell]] = [
        ["clean (1 process)", raw_mb / t_clean, "MB/s", t_clean],
        ["tokenize + pack + write (1 process)", clean_mb / t_shard, "MB/s", t_shard],
        ["baseline: sentencepiece encode alone (1 process)", raw_rate, "MB/s", t_raw],
        ["whole chain, clean + shard (1 process)", chain, "MB/s", t_clean + t_shard],
        ["whole chain / baseline encode", chain / raw_rate, "×", None],
        ["commands, mpirun -np 1", raw_mb / wall[1], "MB/s", wall[1]],
        ["commands, mpirun -np 2", raw_mb / wall[2], "MB/s", wall[2]],
        ["speed-up with 2 ranks", wall[1] / wall[2], "×", None],
        [
            f"tokenizer training ({tok.vocab_size:,} pieces, "
            f"{args.tokenizer_sample_bytes / 1e6:g} MB sample)",
            None,
            "",
            t_tok,
        ],
        ["shard bytes over raw uint16 token bytes", 100 * (shard_bytes / token_bytes - 1), "% more", None],
        [
            "shard bytes over 2 bytes per token of the stream",
            100 * (shard_bytes / (2 * tokens) - 1),
            "% more",
            None,
        ],
    ]
    source = f"`{args.corpus or 'data/sample'}`" + (f" (the books of `{args.list}`)" if args.list else "")
    result = benchlib.result(
        "prep",
        "Data prep: clean, tokenize + shard, the whole chain, 1 and 2 MPI ranks",
        f"{benchlib.cpu_name()}, {os.cpu_count()} cores",
        [
            benchlib.table(
                f"{len(texts)} books of {source}: {raw_mb:.1f} MB raw → {clean_mb:.1f} MB clean → "
                f"{tokens:,} tokens; {tok.vocab_size:,}-piece tokenizer, "
                f"`--shard-bytes` {args.shard_bytes:,}",
                {"measure": "{}", "value": "{:.2f}", "unit": "{}", "time (s)": "{:.1f}"},
                rows,
            ),
            line_length_table(texts, args.line_mb, work, args),
        ],
        [
            "MB are 10^6 bytes of raw input text (for tokenize: of cleaned text). The baseline is plain "
            "`sentencepiece` encoding of the same cleaned text with the same model in one process; the "
            "`mpirun` rows time the `clean` and `shard` commands, start-up included.",
            "The second table: the cleaned books repeated to each size, written as one book of "
            "paragraphs and as the same words on one line; per MB of either, the sum of the three steps.",
        ],
        quick=args.quick,
    )
    benchlib.emit(result, args.json)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
