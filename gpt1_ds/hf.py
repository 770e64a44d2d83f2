"""Conversion between ``gpt1_ds.model.GPT`` and Hugging Face's ``OpenAIGPTLMHeadModel``.

The two networks are the same; only the layout differs. HF keeps its linear layers as ``Conv1D``
with weights ``[in, out]`` (the transpose of ``nn.Linear``), prefixes the body with ``transformer.``,
ties ``lm_head.weight`` to the token table, and old checkpoints carry ``h.{i}.attn.bias`` causal-mask
buffers, which are ignored on import. Writing and reading a directory needs only ``safetensors``;
``transformers`` is needed only to load the result with ``from_pretrained``.

``export_hf_tokenizer`` writes the tokenizer of the same directory for ``AutoTokenizer``: our
sentencepiece BPE model restated as a ``tokenizers`` file that gives the same ids and the same text.
Each line is encoded on its own (``\\n`` is a token of its own, between which the text is
normalised: ``▁`` for spaces and one in front), pieces never cross a ``▁``, the merges are the
vocabulary's pieces in id order, and unknown characters fall back to bytes. Decoding keeps the
space that a text's first ``▁`` stands for (``decode(encode("It was"))`` is ``" It was"``), so that
a continuation decodes with the space that joins it to its prompt, as ``pipeline`` does it;
``gpt1_ds.tokenizer`` drops that space.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from gpt1_ds.files import atomic_write_bytes, atomic_write_text
from gpt1_ds.model import GPT, LM_HEAD, TOKENS_EMBED, GPTConfig
from gpt1_ds.openai_bpe import TASK_TOKENS
from gpt1_ds.tokenizer import EOD, NEWLINE, PAD, UNK, SentencePieceTokenizer

HF_PREFIX = "transformer."
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_TOKENIZER_NAME = "tokenizer.json"
"""The ``tokenizers`` serialisation (with ``tokenizer_config.json`` beside it)."""
HF_TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SPACE = "\u2581"  # sentencepiece's word-start mark
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"

# Keys whose weights are Conv1D in HF ([in, out]) and nn.Linear here ([out, in]).
_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Non-persistent buffers that some HF checkpoints hold and this model does not need.
_IGNORED = re.compile(r"^(h\.\d+\.attn\.bias|h\.\d+\.attn\.masked_bias|position_ids)$")
# config.json keys copied as they are: the shape, then (with HF's defaults) dropout and init.
_SHAPE = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_DEFAULTS = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5}
_DEFAULTS["initializer_range"] = 0.02


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The ``config.json`` of an ``OpenAIGPTLMHeadModel`` with this shape."""
    if config.n_inner != 4 * config.n_embd:
        raise ValueError(
            f"OpenAIGPT fixes the MLP width at 4 × n_embd ({4 * config.n_embd}); "
            f"GPTConfig.n_inner is {config.n_inner}"
        )
    return {
        "architectures": ["OpenAIGPTLMHeadModel"],
        "model_type": "openai-gpt",
        **{key: getattr(config, key) for key in _SHAPE},
        "afn": "gelu",  # HF's "gelu" for OpenAIGPT is the tanh form (gelu_new)
        **{key: getattr(config, key) for key in _DEFAULTS},
        "tie_word_embeddings": True,
    }


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """A ``GPTConfig`` from an OpenAIGPT ``config.json`` dict."""
    if (afn := hf.get("afn", "gelu")) != "gelu":
        raise ValueError(f"config.json: afn={afn!r}; GPT-1 uses 'gelu' (the tanh form)")
    if hf.get("tie_word_embeddings", True) is False:
        raise ValueError("config.json: tie_word_embeddings=false; GPT-1 ties the LM head")
    try:
        n_inner = 4 * hf["n_embd"]
        shape = {key: hf[key] for key in _SHAPE}
    except KeyError as e:
        raise ValueError(f"config.json: missing key {e.args[0]!r}") from None
    return GPTConfig(**shape, n_inner=n_inner, **{key: hf.get(key, d) for key, d in _DEFAULTS.items()})


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict in HF layout, ``lm_head.weight`` included (it is the token table), without
    the table's padding rows (``GPTConfig.vocab_multiple``)."""
    state = model.state_dict()
    state[TOKENS_EMBED] = state[TOKENS_EMBED][: model.config.vocab_size]
    out = {HF_PREFIX + k: v.t() if _CONV1D.match(k) else v for k, v in state.items() if k != LM_HEAD}
    out[LM_HEAD] = out[HF_PREFIX + TOKENS_EMBED]
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """An HF OpenAIGPT state dict (with or without ``transformer.``) in our layout.

    Mask buffers are dropped; missing, unexpected or misshapen tensors are an error
    naming the keys; an ``lm_head.weight`` that differs from the token table is refused.
    """
    lm_head = state.get(LM_HEAD)
    named = {key.removeprefix(HF_PREFIX): value for key, value in state.items() if key != LM_HEAD}
    ours = {k: v.t() if _CONV1D.match(k) else v for k, v in named.items() if not _IGNORED.match(k)}
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items() if k != LM_HEAD}
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise ValueError(f"HF state dict does not fit GPT-1: missing {missing}, unexpected {unexpected}")
    for key, shape in expected.items():
        if ours[key].shape != shape:
            raise ValueError(f"HF tensor {key!r} has shape {tuple(ours[key].shape)}, expected {tuple(shape)}")
    if lm_head is not None and not torch.equal(lm_head, ours[TOKENS_EMBED]):
        raise ValueError("HF lm_head.weight differs from tokens_embed.weight: GPT-1 ties them")
    ours[LM_HEAD] = ours[TOKENS_EMBED]
    return ours


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``safetensors.torch.save`` with its JSON header's keys sorted: the same tensors and metadata
    give the same bytes (safetensors writes the metadata in the order of a hash map, which
    changes from process to process)."""
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data stays aligned to 8 bytes, as safetensors pads it
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def export_hf(model: GPT, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that
    ``OpenAIGPTLMHeadModel.from_pretrained(path)`` loads. Files appear whole or not at all."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    del tensors[LM_HEAD]  # tied: safetensors stores each tensor once; HF re-ties on load
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path / WEIGHTS_NAME, safetensors_bytes(state, {"format": "pt", **(metadata or {})}))
    atomic_write_text(path / CONFIG_NAME, json.dumps(config_to_hf(model.config), indent=2) + "\n")
    return path


def _bpe_merges(sp: Any, normal: set[str], ids: dict[str, int]) -> list[list[str]]:
    """Every split of every normal piece into two normal pieces, ordered by the piece's id (a
    sentencepiece BPE model numbers its pieces in merge order), then by the parts' ids."""
    merges = []
    for piece in sorted(normal, key=ids.__getitem__):
        parts = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        found = [p for p in parts if p[0] in normal and p[1] in normal]
        merges += [list(p) for p in sorted(found, key=lambda p: (ids[p[0]], ids[p[1]]))]
    return merges


def tokenizers_json(tok: SentencePieceTokenizer) -> dict[str, Any]:
    """Our tokenizer as a Hugging Face ``tokenizers`` serialisation (``tokenizer.json``)."""
    sp = tok.sp
    ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = {i for i in ids.values() if sp.is_control(i) or sp.is_unknown(i)}
    normal = {p for p, i in ids.items() if not (i in special or sp.is_byte(i) or p == NEWLINE)}

    def added(i: int, is_special: bool) -> dict[str, Any]:
        return dict(
            id=i,
            content=sp.id_to_piece(i),
            single_word=False,
            lstrip=False,
            rstrip=False,
            normalized=False,
            special=is_special,
        )

    space = {"String": " "}
    split = {"behavior": "MergedWithNext", "invert": False}  # a piece starts at each ▁
    # A corpus prepared lower-cased (recorded with the tokenizer): HF lower-cases as we do
    # (Tokenizer.normalize); ftfy has no tokenizers equivalent and is left to the caller.
    lower = [{"type": "Lowercase"}] if tok.text and tok.text.get("lowercase") else []
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(i, True) for i in sorted(special)] + [added(tok.newline_id, False)],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                *lower,
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": space, "content": SPACE},
            ],
        },
        "pre_tokenizer": {"type": "Split", "pattern": {"String": SPACE}, **split},
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Replace", "pattern": {"String": "\n "}, "content": "\n"},  # each line's own ▁
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": ids,
            "merges": _bpe_merges(sp, normal, ids),
        },
    }


def export_hf_tokenizer(tok: SentencePieceTokenizer, path: str | Path, n_positions: int) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` so that
    ``AutoTokenizer.from_pretrained(path)`` gives our ids and ``pipeline("text-generation")`` stops
    at ``<eod>``: ``<unk>``, ``<pad>``, ``<eod>`` are the unk, pad and eos tokens, the control
    tokens additional special tokens. No BOS is added (GPT-1 has none)."""
    path = Path(path)
    controls = [tok.sp.id_to_piece(i) for i in (tok.start_id, tok.delim_id, tok.extract_id)]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK,
        "pad_token": PAD,
        "eos_token": EOD,
        "bos_token": None,
        "additional_special_tokens": controls,
        "extra_special_tokens": controls,
        "model_max_length": n_positions,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "gpt1_ds_tokenizer_sha256": tok.sha256,
    }
    generation = {"eos_token_id": tok.eod_id, "pad_token_id": tok.pad_id, "bos_token_id": None}
    atomic_write_text(path / HF_TOKENIZER_NAME, json.dumps(tokenizers_json(tok), ensure_ascii=False) + "\n")
    atomic_write_text(path / HF_TOKENIZER_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    atomic_write_text(path / GENERATION_CONFIG_NAME, json.dumps(generation, indent=2) + "\n")
    return path


def export_openai_tokenizer(tok: Any, path: str | Path, n_positions: int) -> Path:
    """Write ``tokenizer_config.json`` for GPT-1's own tokenizer (``gpt1_ds.openai_bpe``, whose
    ``vocab.json`` and ``merges.txt`` lie in ``path``), so that ``AutoTokenizer.from_pretrained(path)``
    opens transformers' ``OpenAIGPTTokenizer`` on them, with the appended task tokens as special
    tokens at their ids. transformers' tokenizer splits words its own way, not by GPT-1's pipeline:
    ``python -m gpt1_ds.openai_bpe compare`` measures how often the ids differ."""
    path = Path(path)
    names = dict(zip(tok.appended, TASK_TOKENS, strict=True))
    added = {
        str(i): {"content": name, "special": True, "lstrip": False, "rstrip": False, "normalized": False}
        for i, name in sorted(names.items())
    }
    config = {
        "tokenizer_class": "OpenAIGPTTokenizer",
        "unk_token": UNK,
        "model_max_length": n_positions,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(names.values()),
        "gpt1_ds_tokenizer_sha256": tok.sha256,
    }
    atomic_write_text(path / HF_TOKENIZER_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return path


def import_hf(source: str | Path | Any) -> GPT:
    """A ``GPT`` from an HF directory (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``) or from an ``OpenAIGPTLMHeadModel`` / ``OpenAIGPTModel`` object."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: no config.json in the HF directory")
        try:
            config = config_from_hf(json.loads(config_file.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: invalid JSON: {e}") from None
        if (path / WEIGHTS_NAME).is_file():
            state = load_file(str(path / WEIGHTS_NAME))
        elif (path / LEGACY_WEIGHTS_NAME).is_file():
            state = torch.load(path / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} found")
    else:
        config = config_from_hf(source.config.to_dict())
        state = source.state_dict()
    model = GPT(config)
    model.load_state_dict(from_hf_state_dict(state, config))
    return model
