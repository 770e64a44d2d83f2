"""The runtime tokenizer: what training, fine-tuning, generation and data prep encode with.

``Tokenizer`` is the interface (encode, decode, special ids, vocab size, sha256);
``SentencePieceTokenizer`` implements it for the sentencepiece BPE model that
``data_prep.tokenizer`` trains; ``load_tokenizer`` opens one from its file. A second
kind, GPT-1's own BPE (``gpt1_ds.openai_bpe.OpenAIBPETokenizer``), implements the same few members.

Reserved ids of a gpt1-ds sentencepiece model: ``<pad>`` 0, ``<unk>`` 1, ``<eod>`` 2 (end of
document), then the fine-tuning control tokens ``<start>``, ``<delim>``, ``<extract>`` (never
produced from text), then ``\\n`` as a piece of its own (the paragraph separator).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from itertools import chain
from pathlib import Path
from typing import Protocol

import numpy as np

from gpt1_ds.openai_bpe import MERGES_NAME, VOCAB_NAME, OpenAIBPETokenizer
from gpt1_ds.text import cut_at_spaces, normalize

MODEL_NAME = "tokenizer.model"
"""The sentencepiece model, in a dataset, a run directory and an export."""
INFO_NAME = "tokenizer_info.json"
"""gpt1-ds's metadata of a tokenizer (sha256, settings, special ids), beside the model."""
LEGACY_INFO_NAME = "tokenizer.json"
"""Where older datasets, runs and exports keep that metadata. The name is Hugging Face's
``tokenizers`` file, which an HF export holds (``gpt1_ds.hf.export_hf_tokenizer``); these are read."""
PAD, UNK, EOD = "<pad>", "<unk>", "<eod>"
CONTROL = ("<start>", "<delim>", "<extract>")
NEWLINE = "\n"
GPT1_VOCAB_SIZE = 40478
"""GPT-1's vocabulary: 40,000 BPE merges plus the base symbols (the ``gpt1`` preset's vocab_size)."""


class Tokenizer(Protocol):
    """What the rest of gpt1-ds needs of a tokenizer."""

    path: Path
    kind: str
    """``"sentencepiece"`` or ``"openai-bpe"`` (``gpt1_ds.openai_bpe``)."""
    sha256: str
    vocab_size: int
    base_size: int
    """Ids the tokenizer's own vocabulary holds; ids from ``base_size`` to ``vocab_size`` are ``appended``."""
    appended: tuple[int, ...]
    """Ids added after the vocabulary (GPT-1's fine-tuning tokens); empty for sentencepiece."""
    pad_id: int
    eod_id: int
    end_id: int | None
    """The id that ends a generated text (``<eod>``), or None where the tokenizer has none."""
    newline_id: int
    start_id: int
    delim_id: int
    extract_id: int

    def encode(self, text: str) -> list[int]: ...

    def normalize(self, text: str) -> str: ...

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]: ...

    def decode(self, ids: list[int] | np.ndarray) -> str: ...

    def special_ids(self) -> dict[str, int]: ...


class SentencePieceTokenizer:
    """A gpt1-ds sentencepiece model: encode/decode with exact round trips, and its special ids."""

    kind = "sentencepiece"
    appended: tuple[int, ...] = ()

    def __init__(self, model_path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no tokenizer model")
        data = self.path.read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, TypeError, ValueError) as e:  # sentencepiece names neither file nor field
            raise ValueError(f"{self.path}: not a sentencepiece model ({type(e).__name__}: {e})") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size = self.base_size = self.sp.get_piece_size()
        ids = {p: self.sp.piece_to_id(p) for p in (PAD, EOD, *CONTROL, NEWLINE)}
        if ids[PAD] != 0 or ids[EOD] != 2 or ids[NEWLINE] == self.sp.unk_id():
            raise ValueError(f"{self.path}: not a gpt1-ds tokenizer (special pieces missing)")
        self.pad_id, self.eod_id, self.newline_id = ids[PAD], ids[EOD], ids[NEWLINE]
        self.end_id: int | None = self.eod_id
        self.start_id, self.delim_id, self.extract_id = (ids[c] for c in CONTROL)
        self.text = self._text_settings()

    def _text_settings(self) -> dict | None:
        """How its training text was prepared (``text`` in the metadata beside it), if recorded
        for this very model."""
        found = info_file(self.path.parent)
        try:
            info = json.loads(found.read_text(encoding="utf-8")) if found else {}
        except (OSError, ValueError):
            return None
        text = info.get("text") if isinstance(info, dict) and info.get("sha256") == self.sha256 else None
        return text if isinstance(text, dict) else None

    def normalize(self, text: str) -> str:
        """``text`` prepared as the tokenizer's training text was (``gpt1_ds.text.normalize``:
        ftfy, and lower-casing when the corpus was lower-cased), for text that did not go through
        data prep: fine-tuning examples, prompts, zero-shot sentences. Unchanged for a tokenizer
        whose metadata does not say."""
        if self.text is None:
            return text
        return normalize(text, bool(self.text.get("lowercase")))

    def special_ids(self) -> dict[str, int]:
        names = ("pad", "unk", "eod", "start", "delim", "extract", "newline")
        ids = (self.pad_id, self.sp.unk_id(), self.eod_id, self.start_id, self.delim_id, self.extract_id)
        return dict(zip(names, (*ids, self.newline_id), strict=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; each line is encoded on its own, joined by the newline id."""
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Ids of each text as a uint32 array (newline-joined lines, as ``encode``)."""
        # A long line is encoded in pieces cut at single spaces: the same ids (pieces never span
        # a space, and each piece's dummy prefix stands for the space cut), in time linear in it.
        pieces, joins, counts = [], [], []  # joins[k]: the id between piece k-1 and k, or None
        for text in texts:
            count = 0
            for j, line in enumerate(text.split("\n")):
                cut = cut_at_spaces(line)
                pieces += cut
                joins += [self.newline_id if j else None] + [None] * (len(cut) - 1)
                count += len(cut)
            counts.append(count)
        encoded = self.sp.encode(pieces, num_threads=num_threads)
        out, i = [], 0
        for n in counts:
            parts = []
            for k in range(i, i + n):
                if joins[k] is not None:
                    parts.append([joins[k]])
                parts.append(encoded[k])
            i += n
            out.append(np.fromiter(chain.from_iterable(parts), dtype=np.uint32))
        return out

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Text of ``ids``; special ids other than newline are dropped."""
        lines: list[list[int]] = [[]]
        for i in map(int, ids):
            if i == self.newline_id:
                lines.append([])
            else:
                lines[-1].append(i)
        return "\n".join(self.sp.decode(line) for line in lines)


def info_file(folder: str | Path) -> Path | None:
    """The tokenizer metadata in ``folder``: ``INFO_NAME``, else a legacy ``tokenizer.json`` that is
    ours (it has a ``sha256``, which HF's ``tokenizers`` file has not), else None."""
    folder = Path(folder)
    if (folder / INFO_NAME).is_file():
        return folder / INFO_NAME
    legacy = folder / LEGACY_INFO_NAME
    try:
        return legacy if "sha256" in json.loads(legacy.read_text(encoding="utf-8")) else None
    except (OSError, ValueError, TypeError):
        return None


def copy_tokenizer(model: Path, folder: Path) -> None:
    """Copy the tokenizer at ``model`` into ``folder``: a sentencepiece model with its metadata
    (as ``INFO_NAME``), or GPT-1's ``vocab.json`` and ``merges.txt`` (``model`` their folder)."""
    if model.is_dir():
        sources: dict[str, Path | None] = {name: model / name for name in (VOCAB_NAME, MERGES_NAME)}
    else:
        sources = {MODEL_NAME: model, INFO_NAME: info_file(model.parent)}
    for name, src in sources.items():
        dst = folder / name
        if src is not None and src.is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)


def find_in(folder: str | Path) -> Path | None:
    """The tokenizer in ``folder``: its ``tokenizer.model``, else the folder itself when it holds
    GPT-1's ``vocab.json`` or ``merges.txt`` (an ``openai-gpt`` directory), else None."""
    folder = Path(folder)
    if (folder / MODEL_NAME).is_file():
        return folder / MODEL_NAME
    return folder if any((folder / name).is_file() for name in (VOCAB_NAME, MERGES_NAME)) else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored at ``path``: a ``tokenizer.model`` file (sentencepiece), or a folder
    with GPT-1's ``vocab.json`` and ``merges.txt`` (``gpt1_ds.openai_bpe``) or a ``tokenizer.model``."""
    path = Path(path)
    if path.is_dir():
        found = find_in(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no tokenizer: neither {MODEL_NAME} nor vocab.json + merges.txt")
        path = found
    if path.is_dir():
        return OpenAIBPETokenizer(path)
    return SentencePieceTokenizer(path)
