"""Step 2: a sentencepiece BPE tokenizer trained on the train split (used through ``gpt1_ds.tokenizer``).

GPT-1 used spaCy tokenisation plus 40,000 BPE merges (40,478 tokens in all);
here one sentencepiece BPE model of ``--vocab-size`` pieces (default 40,478)
replaces both. ``byte_fallback`` spells any character the vocabulary lacks as
bytes, so no input is ever unknown. The text is not normalised (identity rule,
whitespace kept) so that decoding gives back the cleaned text exactly.

The reserved ids are listed in ``gpt1_ds.tokenizer``.

Training reads paragraphs of the train documents: a deterministic sample
(``--seed``) bounded by ``--max-sentences`` and ``--sample-bytes``, so memory
and time stay bounded whatever the corpus size. Output: ``OUT/tokenizer.model``
and ``OUT/tokenizer_info.json`` (sha256, vocab size, special ids, settings).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import re
import sys
import time
from pathlib import Path

import sentencepiece as spm

from data_prep.common import Comm, launch, positive_int, run_command, step_parser
from gpt1_ds.files import atomic_write_bytes, atomic_write_text
from gpt1_ds.manifest import read_splits, train_docs
from gpt1_ds.tokenizer import (
    CONTROL,
    EOD,
    GPT1_VOCAB_SIZE,
    INFO_NAME,
    MODEL_NAME,
    NEWLINE,
    PAD,
    UNK,
    SentencePieceTokenizer,
    info_file,
)

log = logging.getLogger("data_prep.tokenizer")

FORMAT_VERSION = 1
SETTINGS = ("vocab_size", "max_sentences", "sample_bytes", "seed")
"""The flags recorded in the tokenizer's info (``settings``)."""
MAX_SENTENCE_BYTES = 4096  # sentencepiece skips longer training sentences; longer paragraphs are cut


def _chunks(paragraph: str, limit: int = MAX_SENTENCE_BYTES // 4) -> list[str]:
    """The paragraph cut at spaces into pieces of at most ``limit`` characters (≤ 4 bytes each)."""
    out, start, end = [], 0, len(paragraph)
    while end - start > limit:  # indices, not slices of the rest: linear in the paragraph
        cut = paragraph.rfind(" ", start, start + limit)
        cut = cut if cut > start else start + limit
        out.append(paragraph[start:cut])
        start = cut
        while start < end and paragraph[start] == " ":
            start += 1
    return [*out, paragraph[start:]] if start < end else out


def training_sentences(docs: list[Path], max_sentences: int, sample_bytes: int, seed: int) -> list[str]:
    """A deterministic sample of paragraphs of the given documents, in a seeded order of documents."""
    order = sorted(docs)
    random.Random(seed).shuffle(order)
    sentences: list[str] = []
    total = 0
    for path in order:
        for para in path.read_text(encoding="utf-8").split("\n"):
            chunks = _chunks(para)
            sentences += chunks
            total += sum(map(len, chunks))
        if len(sentences) >= max_sentences or total >= sample_bytes:
            break
    return sentences[:max_sentences]


def train(
    docs: list[Path],
    out_dir: Path,
    vocab_size: int = GPT1_VOCAB_SIZE,
    max_sentences: int = 2_000_000,
    sample_bytes: int = 200_000_000,
    seed: int = 0,
    num_threads: int = 1,
    fingerprint: str = "",
    text: dict | None = None,
) -> SentencePieceTokenizer:
    """Train the BPE model on ``docs``; writes tokenizer.model and tokenizer_info.json atomically."""
    start = time.perf_counter()
    sentences = training_sentences(docs, max_sentences, sample_bytes, seed)
    if not sentences:
        raise ValueError("no training text: the train split is empty")
    log.info(
        "tokenizer: training %d pieces on %d paragraphs (%.1f MB)…",
        vocab_size,
        len(sentences),
        sum(map(len, sentences)) / 1e6,
    )
    model = _train_bytes(sentences, vocab_size, seed, num_threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / MODEL_NAME, model)
    tok = SentencePieceTokenizer(out_dir / MODEL_NAME)
    settings = dict(vocab_size=vocab_size, max_sentences=max_sentences, sample_bytes=sample_bytes, seed=seed)
    settings.update(sentences=len(sentences), model_type="bpe", byte_fallback=True)
    info = {
        "format_version": FORMAT_VERSION,
        "sha256": tok.sha256,
        "train_fingerprint": fingerprint,
        "vocab_size": tok.vocab_size,
        "special_ids": tok.special_ids(),
        "settings": settings,
        "text": text or text_settings(False),
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_text(out_dir / INFO_NAME, json.dumps(info, indent=1))
    log.info(
        "tokenizer: %d pieces from %d paragraphs (%.1f MB) in %.1f s, sha256 %s",
        tok.vocab_size,
        len(sentences),
        sum(len(s) for s in sentences) / 1e6,
        info["train_seconds"],
        tok.sha256[:12],
    )
    return tok


def _train_bytes(sentences: list[str], vocab_size: int, seed: int, num_threads: int) -> bytes:
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        _train_sentencepiece(sentences, vocab_size, num_threads, writer)
    except RuntimeError as e:
        raise ValueError(_training_error(str(e), vocab_size)) from None
    return writer.getvalue()


def _training_error(message: str, vocab_size: int) -> str:
    """sentencepiece's refusal in the words of this command's flags."""
    if small := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return (
            f"--vocab-size {vocab_size} is too small for this text: its characters and the reserved "
            f"pieces need at least {small[1]} (GPT-1: {GPT1_VOCAB_SIZE:,})"
        )
    if large := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return (
            f"--vocab-size {vocab_size} is more pieces than this text can make (at most {large[1]}): "
            "give more text or a smaller --vocab-size"
        )
    return f"tokenizer training failed: {message.splitlines()[-1] if message else 'no reason given'}"


def _train_sentencepiece(sentences: list[str], vocab_size: int, num_threads: int, writer: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=False,
        pad_id=0,
        pad_piece=PAD,
        unk_id=1,
        unk_piece=UNK,
        eos_id=2,
        eos_piece=EOD,
        bos_id=-1,
        control_symbols=list(CONTROL),
        user_defined_symbols=[NEWLINE],
        input_sentence_size=0,  # sampling is ours (deterministic and bounded)
        shuffle_input_sentence=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=num_threads,
        minloglevel=2,
    )


def text_settings(lowercase: bool) -> dict:
    """How the training text was prepared, recorded with the tokenizer (``text`` in its info), so
    that text encoded later (fine-tuning) is prepared the same way (``gpt1_ds.tokenizer``)."""
    return {"normalize": "gpt1_ds.text.normalize", "lowercase": bool(lowercase)}


def ensure_tokenizer(dataset_dir: str | Path, force: bool = False, **settings) -> SentencePieceTokenizer:
    """The dataset's tokenizer: the one on disk when it was trained on the same train split
    with the same settings, else a newly trained one."""
    dataset_dir = Path(dataset_dir)
    docs, fingerprint = train_docs(dataset_dir)
    text = text_settings(read_splits(dataset_dir)["settings"].get("lowercase", False))
    if not force and (dataset_dir / MODEL_NAME).is_file():
        try:  # a missing or unreadable model or info means: train again
            info_path = info_file(dataset_dir)
            info = json.loads(info_path.read_text()) if info_path else {}
            tok = SentencePieceTokenizer(dataset_dir / MODEL_NAME)
        except (OSError, ValueError):
            info, tok = {}, None
        if not isinstance(info, dict) or not isinstance(info.get("settings", {}), dict):
            info = {}  # not what data_prep.tokenizer writes
        have = info.get("settings", {})
        same = tok is not None and all(have.get(k) == v for k, v in settings.items() if k != "num_threads")
        if same and (info.get("sha256"), info.get("train_fingerprint")) == (tok.sha256, fingerprint):
            log.info("tokenizer: %s is up to date (sha256 %s)", tok.path, tok.sha256[:12])
            if info.get("text") != text:  # prepared before the text settings were recorded
                atomic_write_text(info_path, json.dumps({**info, "text": text}, indent=1))
                tok = SentencePieceTokenizer(dataset_dir / MODEL_NAME)
            return tok
    return train(docs, dataset_dir, fingerprint=fingerprint, text=text, **settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vocab-size",
        type=vocab_size,
        default=GPT1_VOCAB_SIZE,
        help=f"pieces of the BPE tokenizer (GPT-1: {GPT1_VOCAB_SIZE:,}; at most {2**16:,}, ids are uint16)",
    )
    parser.add_argument(
        "--max-sentences", type=positive_int, default=2_000_000, help="most paragraphs to train on"
    )
    parser.add_argument(
        "--sample-bytes", type=positive_int, default=200_000_000, help="most bytes of text to train on"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the training sample's order")
    parser.add_argument(
        "--train-threads", type=positive_int, default=1, help="sentencepiece training threads"
    )


def vocab_size(text: str) -> int:
    """An argparse type: a vocabulary size whose ids fit the shards' uint16."""
    value = int(text)
    if not 1 <= value <= 2**16:
        raise argparse.ArgumentTypeError(
            f"must lie in 1..{2**16} (token ids are stored as uint16), got {text}"
        )
    return value


def run(args: argparse.Namespace, comm: Comm) -> None:
    """Rank 0 trains the tokenizer unless the one on disk is up to date; every rank waits for it."""
    if comm.is_root:
        settings = {k: getattr(args, k) for k in SETTINGS}
        ensure_tokenizer(args.out, force=args.force, num_threads=args.train_threads, **settings)
    comm.barrier()


def main(argv: list[str] | None = None) -> None:
    parser = step_parser("data_prep.tokenizer", __doc__)
    parser.add_argument("--out", required=True, help="dataset directory (holds clean/)")
    parser.add_argument("--force", action="store_true", help="train even if an up-to-date model exists")
    add_arguments(parser)
    run(*launch(parser, argv))


if __name__ == "__main__":
    sys.exit(run_command(main))
