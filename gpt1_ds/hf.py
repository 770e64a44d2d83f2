"""Conversion between ``gpt1_ds.model.GPT`` and Hugging Face's ``OpenAIGPTLMHeadModel``.

The two networks are the same; only the layout differs. HF keeps its linear layers as ``Conv1D``
with weights ``[in, out]`` (the transpose of ``nn.Linear``), prefixes the body with ``transformer.``,
ties ``lm_head.weight`` to the token table, and old checkpoints carry ``h.{i}.attn.bias`` causal-mask
buffers, which are ignored on import. Writing and reading a directory needs only ``safetensors``;
``transformers`` is needed only to load the result with ``from_pretrained``.
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

HF_PREFIX = "transformer."
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
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
    """Our state dict in HF layout, ``lm_head.weight`` included (it is the token table)."""
    state = model.state_dict()
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


def export_hf(model: GPT, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that
    ``OpenAIGPTLMHeadModel.from_pretrained(path)`` loads. Files appear whole or not at all."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    del tensors[LM_HEAD]  # tied: safetensors stores each tensor once; HF re-ties on load
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path / WEIGHTS_NAME, save(state, metadata={"format": "pt", **(metadata or {})}))
    atomic_write_text(path / CONFIG_NAME, json.dumps(config_to_hf(model.config), indent=2) + "\n")
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
