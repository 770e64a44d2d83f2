"""GPT-1 (Radford et al., 2018), as openai/finetune-transformer-lm built it; run, each preset's size.

Its embedding dropout applies to the summed embeddings, as in HF's port, not to the table
(docs/FIDELITY.md).

Post-LayerNorm blocks, learned token and position tables, tanh GELU, no final LayerNorm, LM head tied
to the token table, N(0, 0.02) init. With the ``gpt1`` preset the model has 116,534,784 parameters and
gives the same logits as ``transformers.OpenAIGPTLMHeadModel`` holding the same weights (``gpt1_ds.hf``).

Shapes: B batch, T sequence length, C = n_embd, H = n_head, D = C // H, V = vocab,
L positions already in a ``KVCache``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from gpt1_ds.tokenizer import GPT1_VOCAB_SIZE

IGNORE_INDEX = -100  # target value that the loss skips (padding, prompt tokens in fine-tuning)
TOKENS_EMBED = "tokens_embed.weight"  # state-dict name of the token table
LM_HEAD = "lm_head.weight"  # state-dict name of the LM head: the token table itself (tied), here and in HF


EMBD_DROPOUT = ("sum", "table")
"""``GPTConfig.embd_dropout``'s values."""


@dataclass(frozen=True)
class GPTConfig:
    """Sizes and regularisation of a GPT-1-style model."""

    vocab_size: int = GPT1_VOCAB_SIZE
    """Rows of the token table (and columns of the tied LM head)."""
    n_positions: int = 512
    """Rows of the learned position table: the longest sequence the model takes."""
    n_embd: int = 768
    """Width of the residual stream."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""
    n_inner: int = 3072
    """Hidden width of the MLP (4 × n_embd in GPT-1)."""
    embd_pdrop: float = 0.1
    """Dropout on the summed token + position embeddings."""
    attn_pdrop: float = 0.1
    """Dropout on the attention probabilities."""
    resid_pdrop: float = 0.1
    """Dropout on the attention and MLP outputs, before each residual sum."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""
    initializer_range: float = 0.02
    """Standard deviation of the normal init of every weight matrix and table."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (training only)."""
    vocab_multiple: int = 1
    """Round the token table up to a multiple of this many rows (64 or 128 suit GPU matrix
    multiplies): the rows past ``vocab_size`` are padding, zero at init, never an input, cut from
    the logits (so outside the softmax) and never exported (``with_vocab``). 1: no padding."""
    embd_dropout: str = "sum"
    """Where ``embd_pdrop`` acts in training: ``sum`` (the summed token + position embeddings of the
    batch, as HF's port) or ``table`` (GPT-1's code: the token and position tables themselves, so
    the tied head also sees the dropped table). docs/FIDELITY.md."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "vocab_multiple"):
            if not isinstance(value := getattr(self, name), int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})"
            )
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= (value := getattr(self, name)) < 1.0:
                raise ValueError(f"GPTConfig.{name} must lie in [0, 1), got {value!r}")
        if self.layer_norm_epsilon <= 0 or self.initializer_range <= 0:
            raise ValueError("GPTConfig.layer_norm_epsilon and initializer_range must be > 0")
        if self.embd_dropout not in EMBD_DROPOUT:
            raise ValueError(
                f"GPTConfig.embd_dropout must be one of {EMBD_DROPOUT}, got {self.embd_dropout!r}"
            )

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token table: ``vocab_size`` rounded up to ``vocab_multiple``."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def num_parameters(self, exclude_positions: bool = False) -> int:
        """``GPT(self).num_parameters(exclude_positions)`` from the shapes, without building the model:
        the tied token table once, per block two LayerNorms, attention's QKV and output projections
        and the MLP's two layers, all with biases."""
        d, f = self.n_embd, self.n_inner
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        positions = 0 if exclude_positions else self.n_positions * d
        return self.padded_vocab_size * d + positions + self.n_layer * block

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset (``gpt1`` or ``tiny``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        known = [f.name for f in fields(cls)]
        if unknown := sorted(set(overrides) - set(known)):
            near = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"unknown model field {unknown[0]!r}: {hint}the fields are {', '.join(known)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Build from a dict, refusing keys that are not fields."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown GPTConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, GPTConfig] = {
    # The paper's model: 12 × 768, 12 heads, FFN 3072, 512 positions, 40,478 BPE tokens.
    "gpt1": GPTConfig(),
    # A few small layers for tests and the CPU demo; vocab sized for a small tokenizer.
    "tiny": GPTConfig(vocab_size=8192, n_positions=128, n_embd=128, n_layer=4, n_head=4, n_inner=512),
}


def _causal_attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """Causal attention with dropout on the probabilities, written out.

    SDPA has no fused CPU kernel that takes dropout; its fallback runs in fp32 and is
    slower than these four ops in the autocast dtype. The softmax runs in fp32.
    """
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # [B, H, T, T]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    att = att.float().masked_fill(future, float("-inf")).softmax(dim=-1).to(v.dtype)
    return F.dropout(att, dropout_p, training=True) @ v  # [B, H, T, D]


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding.

    Per layer, k and v are [B, H, max_len, D] buffers, allocated on first use (and on a
    change of batch, dtype or device) like the keys; ``length`` positions (L) are filled. ``GPT.forward``
    with a cache appends its T tokens at positions L..L+T-1 and advances ``length``.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [B, H, T, D] after the cached positions of ``layer``;
        return all its keys and values [B, H, L + T, D]."""
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; {self.length} + {T} do not fit")
        buf = self.k[layer]
        if buf is None or (buf.shape, buf.dtype, buf.device) != ((B, H, self.max_len, D), k.dtype, k.device):
            self.k[layer] = k.new_empty(B, H, self.max_len, D)
            self.v[layer] = v.new_empty(B, H, self.max_len, D)
        ks, vs = self.k[layer], self.v[layer]
        ks[:, :, self.length : end] = k
        vs[:, :, self.length : end] = v
        return ks[:, :, :end], vs[:, :, :end]

    def reset(self) -> None:
        """Forget every position (the buffers are kept)."""
        self.length = 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one c_attn projection split into q, k, v."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × [B, T, C]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # [B, H, T, D]; scale 1/sqrt(D) is SDPA's default
        dropout_p = self.attn_pdrop if self.training else 0.0
        if cache is not None:
            y = self._cached_attention(q, k, v, cache, layer, dropout_p)
        elif dropout_p > 0 and q.device.type == "cpu":
            y = _causal_attention_math(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # [B, T, C]
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def _cached_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int, dropout_p: float
    ) -> torch.Tensor:
        """Attention of the T new queries over the L cached positions and the new ones."""
        L, T = cache.length, q.size(-2)
        k, v = cache.update(layer, k, v)  # [B, H, L + T, D]
        if L == 0:  # prefill: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        # Query t sits at position L + t and sees keys 0..L+t; a single query sees them all.
        mask = None if T == 1 else torch.ones(T, L + T, dtype=torch.bool, device=q.device).tril(L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MLP(nn.Module):
    """Position-wise feed-forward: C → n_inner → C with the tanh GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Post-LN transformer block: n = ln_1(x + attn(x)); h = ln_2(n + mlp(n))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        n = self.ln_1(x + self.attn(x, cache, layer))
        return self.ln_2(n + self.mlp(n))


def _checkpoint_fn() -> Callable[..., torch.Tensor]:
    """DeepSpeed's checkpoint when its activation checkpointing is configured, else torch's."""
    with contextlib.suppress(ImportError):  # DeepSpeed is a dependency, but the model runs without it
        from deepspeed import checkpointing as ds_ckpt

        if ds_ckpt.is_configured():
            return ds_ckpt.checkpoint
    return lambda block, x: torch_checkpoint(block, x, use_reentrant=False)


def _head_loss_sum(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of one chunk: hidden [N, C], targets [N] → [] (fp32 softmax)."""
    logits = head(hidden).float()  # [N, V]
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """The mean (``reduction="sum"``: summed) next-token loss of ``hidden`` [B, T, C] against
    ``targets`` [B, T], ``chunk`` positions at a time, each chunk's logits recomputed in the
    backward pass: the [B·T, V] fp32 logits (and their softmax) never exist at once, only
    [chunk, V]. The same value and gradients as the whole-logits loss, up to the order of the sums.
    ``head`` (``GPT.logits``) calls the head as a module, so that ZeRO-3 gathers its weight."""
    flat, flat_targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)  # [N, C], [N]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.size(0), chunk):
        part = slice(start, start + chunk)
        total = total + torch_checkpoint(
            _head_loss_sum, head, flat[part], flat_targets[part], use_reentrant=False
        )
    return total if reduction == "sum" else total / (flat_targets != IGNORE_INDEX).sum()


class GPT(nn.Module):
    """GPT-1 language model; the LM head shares its weight with the token table.

    ``loss_chunk``: positions per chunk of the training loss (``chunked_lm_loss``); 0, the whole
    logits at once. A training setting (``RunConfig.loss_chunk_size``), not part of the model."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.loss_chunk = 0
        self.tokens_embed = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.positions_embed = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.tokens_embed.weight  # tied
        self.apply(self._init_weights)
        with torch.no_grad():
            self.tokens_embed.weight[config.vocab_size :].zero_()  # padding rows
        self._table: torch.Tensor | None = None  # the dropped-out token table of this forward pass

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_positions: bool = False) -> int:
        """Distinct parameters (the tied table once); optionally without the position table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.positions_embed.weight.numel() if exclude_positions else n

    def new_cache(self) -> KVCache:
        """An empty ``KVCache`` for this model's layers and context."""
        return KVCache(self.config.n_layer, self.config.n_positions)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Last block's output [B, T, C] for token ids [B, T]. With ``cache``, the tokens
        follow the L cached positions (positions L..L+T-1) and are appended to it."""
        _, T = input_ids.shape
        L = cache.length if cache is not None else 0
        if self.config.n_positions < L + T:
            what = f"{L} cached + {T} new positions" if cache is not None else f"sequence length {T}"
            raise ValueError(f"{what} exceeds GPTConfig.n_positions ({self.config.n_positions})")
        pos = torch.arange(L, L + T, device=input_ids.device)  # [T]
        x = self.embed(input_ids, pos)  # [B, T, C]
        use_ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        ckpt = _checkpoint_fn() if use_ckpt and cache is None else None
        for i, block in enumerate(self.h):
            x = ckpt(block, x) if ckpt is not None else block(x, cache, i)
        if cache is not None:
            cache.length += T
        return x

    def embed(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings [B, T, C] of ids [B, T] at positions [T], with embedding
        dropout where ``embd_dropout`` puts it (on the tables: kept for ``logits``)."""
        self._table = None
        if self.config.embd_dropout == "table" and self.training and self.config.embd_pdrop > 0:
            self._table = self.drop(self.tokens_embed.weight)  # [V', C]
            return F.embedding(input_ids, self._table) + self.drop(self.positions_embed.weight)[pos]
        return self.drop(self.tokens_embed(input_ids) + self.positions_embed(pos))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [..., V] of hidden states [..., C]: the tied head (the table of this
        forward pass when dropout acts on it), without the padding rows."""
        logits = self.lm_head(hidden) if self._table is None else F.linear(hidden, self._table)
        V = self.config.vocab_size
        return logits if logits.size(-1) == V else logits[..., :V]

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
        """Logits [B, T, V]; with ``targets`` [B, T] (next tokens, IGNORE_INDEX to skip),
        returns ``(logits, loss)`` where loss is the mean cross-entropy over counted targets, or
        their sum with ``reduction="sum"`` (``(None, loss)`` when ``loss_chunk`` is set: the logits
        are never whole).
        With ``cache`` (inference), the tokens continue the cached ones (see ``hidden_states``)."""
        hidden = self.hidden_states(input_ids, cache)  # [B, T, C]
        if targets is not None and self.loss_chunk and torch.is_grad_enabled():
            return None, chunked_lm_loss(self.logits, hidden, targets, self.loss_chunk, reduction)
        logits = self.logits(hidden)  # [B, T, V]
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )
        return logits, loss


def with_vocab(model: GPT, vocab_size: int, vocab_multiple: int = 1) -> GPT:
    """``model`` with a token table for ``vocab_size`` ids in a multiple of ``vocab_multiple`` rows:
    the rows of the ids both have are kept, new ids' rows drawn from N(0, initializer_range) (as
    GPT-1 appended its task tokens at fine-tuning), padding rows zero, rows past ``vocab_size``
    (padding, or ids dropped) cut. The same model when nothing changes. The layout of ids:
    the tokenizer's, then appended task tokens (``gpt1_ds.openai_bpe``), then padding."""
    config = replace(model.config, vocab_size=vocab_size, vocab_multiple=vocab_multiple)
    if config == model.config:
        return model
    out = GPT(config).to(model.tokens_embed.weight.device).train(model.training)
    state = model.state_dict()
    old, keep = state[TOKENS_EMBED], min(vocab_size, model.config.vocab_size)
    table = out.tokens_embed.weight.detach().clone()  # new rows N(0, std), padding zero
    table[:keep] = old[:keep]
    state[TOKENS_EMBED] = state[LM_HEAD] = table
    out.load_state_dict(state)
    out.loss_chunk = model.loss_chunk
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups: decay on tensors with more than one dimension (matrices and
    embedding tables), none on biases and LayerNorm gains. A tied tensor appears once."""
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() yields each shared tensor once
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def describe(model: GPT) -> str:
    """One line: the model's shape and parameter count."""
    config, n = model.config, model.num_parameters()
    return (
        f"{config.n_layer} layers × {config.n_embd} wide, {config.n_head} heads, FFN {config.n_inner}, "
        f"vocab {config.vocab_size:,}, context {config.n_positions}: {n:,} parameters"
    )


def main(argv: list[str] | None = None) -> None:
    """Build each preset, print its size and run one forward pass."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for name in args.presets:
        config = GPTConfig.from_preset(name)
        model = GPT(config).eval()
        T = min(args.seq_len, config.n_positions)
        ids = torch.randint(0, config.vocab_size, (args.batch, T + 1))
        x, y = ids[:, :-1], ids[:, 1:]  # next-token targets
        with torch.no_grad():
            logits, loss = model(x, y)
        print(f"{name:>5}: {describe(model)}")
        print(
            f"       forward {tuple(x.shape)} → logits {tuple(logits.shape)}, loss {loss.item():.3f} "
            f"(uniform: ln V = {math.log(config.vocab_size):.3f})"
        )


if __name__ == "__main__":
    main()
