"""Text generation from a GPT-1 model: temperature and top-k sampling."""

from __future__ import annotations

import torch

from gpt1_ds.model import GPT


@torch.no_grad()
def sample(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 40,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` [B, T0] by up to ``max_new_tokens`` tokens; the context is cut to the
    model's last ``n_positions`` tokens. ``temperature`` 0 is greedy."""
    was_training = model.training
    model.eval()
    ids = prompt
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.config.n_positions :])[:, -1, :].float()  # [B, V]
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
        if stop_id is not None and bool((nxt == stop_id).all()):
            break
    model.train(was_training)
    return ids
