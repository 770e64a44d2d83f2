"""Export a run's checkpoint: Hugging Face or plain safetensors.

    python -m gpt1_ds.export RUN/checkpoints --out HF_DIR [--tag TAG] [--format hf|safetensors]

The checkpoint (any ZeRO stage and world size, pretrained or fine-tuned) is consolidated
to fp32 by ``gpt1_ds.loading``. ``--format hf`` writes ``config.json``,
``model.safetensors`` (what ``OpenAIGPTLMHeadModel.from_pretrained`` loads), the
tokenizer files and a model card; ``--format safetensors`` writes our own layout
(``model.safetensors`` with gpt1-ds names and ``gpt1_config.json``).

``--out`` must be new, empty, or an earlier export (only the files an export writes, itself
recognised by its model card or ``gpt1_config.json``); anything else is refused before the
checkpoint is read, unless ``--force`` (which replaces the directory and all it holds). The
export is written into a temporary sibling and renamed into place, so a failed export leaves
``--out`` as it was; two exports of one checkpoint are the same bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from gpt1_ds.checkpoint import CheckpointError
from gpt1_ds.env import quiet_libraries
from gpt1_ds.files import atomic_write_bytes, atomic_write_text
from gpt1_ds.hf import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    HF_TOKENIZER_CONFIG_NAME,
    HF_TOKENIZER_NAME,
    WEIGHTS_NAME,
    export_hf,
    export_hf_tokenizer,
    export_openai_tokenizer,
    safetensors_bytes,
)
from gpt1_ds.loading import OWN_CONFIG_NAME, Checkpoint, find_tokenizer, model_from_checkpoint
from gpt1_ds.model import LM_HEAD, GPTConfig, with_vocab
from gpt1_ds.openai_bpe import MERGES_NAME, VOCAB_NAME
from gpt1_ds.tokenizer import INFO_NAME, MODEL_NAME, copy_tokenizer, load_tokenizer

log = logging.getLogger("gpt1_ds.export")


_TOKENIZER_LINES = {
    "sentencepiece": "(the same ids as the sentencepiece model `tokenizer.model`, which "
    "`gpt1_ds.tokenizer.load_tokenizer` opens).",
    "openai-bpe": "(transformers' `OpenAIGPTTokenizer` on GPT-1's `vocab.json` and `merges.txt`, with the "
    "task tokens at their appended ids; its word split is not GPT-1's spaCy pipeline, which "
    "`gpt1_ds.openai_bpe` reproduces).",
}


CARD_NAME = "README.md"
CARD_TITLE = "# GPT-1 (gpt1-ds)"
EXPORT_NAMES = frozenset(
    {
        CARD_NAME,
        CONFIG_NAME,
        WEIGHTS_NAME,
        GENERATION_CONFIG_NAME,
        HF_TOKENIZER_NAME,
        HF_TOKENIZER_CONFIG_NAME,
    }
    | {OWN_CONFIG_NAME, MODEL_NAME, INFO_NAME, VOCAB_NAME, MERGES_NAME}
)
"""Every file an export may write (either format, either tokenizer)."""


def check_out(out: Path, force: bool) -> None:
    """Refuse an ``out`` that holds anything but an earlier export, unless ``force``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a directory")
    if force or not out.is_dir() or not (entries := sorted(p.name for p in out.iterdir())):
        return
    others = [n for n in entries if n not in EXPORT_NAMES or not (out / n).is_file()]
    card = out / CARD_NAME
    ours = (out / OWN_CONFIG_NAME).is_file() or (card.is_file() and card.read_text().startswith(CARD_TITLE))
    if others or not ours:
        shown = ", ".join((others or entries)[:5]) + (" …" if len(others or entries) > 5 else "")
        raise ValueError(
            f"--out {out} holds files that are not an export of gpt1-ds ({shown}): name a new or empty "
            "directory, or pass --force to replace it and everything in it"
        )


def replace_dir(new: Path, out: Path) -> None:
    """``new`` renamed onto ``out``; an ``out`` there before is moved aside first, then removed."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)


def model_card(ckpt: Checkpoint, config: GPTConfig, n_params: int, tokenizer: str | None) -> str:
    """The export's README.md: what the model is, how to load it, how it was trained.
    ``tokenizer``: the kind of the tokenizer exported with it (None: none found)."""
    state = ckpt.state
    val = state.val_ppl
    if state.kind == "finetune":
        origin = f"fine-tuned with gpt1-ds on `{state.config.get('task')}` from `{state.config.get('init')}`"
        origin += " (the language model; the task head is not part of this export)"
    else:
        origin = "pretrained with gpt1-ds"
    tok_line = _TOKENIZER_LINES.get(tokenizer or "", "(no tokenizer was found with the checkpoint).")
    lines = [
        CARD_TITLE,
        "",
        f"A GPT-1 model (Radford et al., 2018) {origin}: post-LayerNorm, learned positions, tanh",
        "GELU, LM head tied to the token table. Load it with",
        "`transformers.AutoModelForCausalLM.from_pretrained(<this folder>)` and its tokenizer with",
        f"`transformers.AutoTokenizer.from_pretrained(<this folder>)` {tok_line}",
        "",
        f"- Shape: {config.n_layer} layers × {config.n_embd}, {config.n_head} heads, context "
        f"{config.n_positions}, vocab {config.vocab_size:,}: {n_params:,} parameters",
        f"- Data: `{state.config.get('data') or state.config.get('train') or 'unknown'}`",
        f"- Training: {state.step} steps"
        + (f", {state.tokens_seen:,} tokens" if state.tokens_seen else "")
        + f" (checkpoint `{ckpt.tag}`)",
        f"- Validation perplexity: {val:.2f}" if isinstance(val, float) else "- Validation perplexity: n/a",
        "",
    ]
    return "\n".join(lines)


def export(
    source: str | Path, out: str | Path, tag: str | None = None, fmt: str = "hf", force: bool = False
) -> Path:
    """Consolidate ``source`` and write it to ``out`` (``hf`` or ``safetensors``): into a temporary
    sibling, then renamed into place (``check_out`` first: ``force`` replaces whatever is there)."""
    if fmt not in ("hf", "safetensors"):
        raise ValueError(f"unknown format {fmt!r}: hf or safetensors")
    out = Path(out)
    check_out(out, force)
    model, ckpt = model_from_checkpoint(source, tag)
    model = with_vocab(model, model.config.vocab_size)  # the padding rows are not the model's
    found = find_tokenizer(source, ckpt)
    tok = load_tokenizer(found) if found is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if fmt == "hf":
            export_hf(model, tmp, metadata={"gpt1_ds_step": str(ckpt.state.step)})
            card = model_card(ckpt, model.config, model.num_parameters(), tok.kind if tok else None)
            atomic_write_text(tmp / CARD_NAME, card)
        else:
            state = {k: v.contiguous() for k, v in model.state_dict().items() if k != LM_HEAD}
            atomic_write_bytes(tmp / WEIGHTS_NAME, safetensors_bytes(state, {"format": "pt"}))
            atomic_write_text(tmp / OWN_CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2) + "\n")
        if found is not None and tok is not None:
            copy_tokenizer(found, tmp)
            if fmt == "hf":
                write = export_hf_tokenizer if tok.kind == "sentencepiece" else export_openai_tokenizer
                write(tok, tmp, model.config.n_positions)
        else:
            log.warning("no tokenizer found for %s: copy it into %s yourself", source, out)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (step %s) → %s (%s)", ckpt.path, ckpt.state.step, out, fmt)
    return out


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(
        prog="gpt1_ds.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", help="RUN, RUN/checkpoints or RUN/checkpoints/TAG")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--format", choices=("hf", "safetensors"), default="hf")
    parser.add_argument(
        "--force", action="store_true", help="replace --out even if it holds files no export wrote"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        export(args.checkpoints, args.out, args.tag, args.format, args.force)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
