"""Text generation from a GPT-1 model: KV cache, temperature, top-k and top-p sampling.

``sample`` feeds the prompt once (prefill), then one token per step through a ``KVCache``, so
a step costs one position instead of the whole context. The model has ``n_positions`` positions:

* a longer prompt is refused with a ``ValueError`` naming both lengths, unless ``truncate=True``:
  then the model sees only its last ``n_positions`` tokens (the returned ids keep the whole prompt);
* generation goes on past ``n_positions`` with a sliding context. Absolute positions shift with the
  window, so the cache cannot be reused: from there every token costs a full forward pass of the
  window, exactly as without the cache, and both give the same tokens.

Command line: ``python -m gpt1_ds.generate SOURCE --prompt TEXT`` where SOURCE is an HF directory
(``gpt1_ds.hf.export_hf``) or a run's ``checkpoints`` directory; prints each prompt with its
continuation and the generation speed in tokens/s.
"""

from __future__ import annotations

import logging
import sys
import time
from argparse import ArgumentParser, Namespace, RawDescriptionHelpFormatter
from pathlib import Path

import torch

from gpt1_ds.loading import fit_vocab, load_model
from gpt1_ds.model import GPT, describe
from gpt1_ds.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("gpt1_ds.generate")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits`` [B, V] with all but the ``k`` largest of each row set to -inf (ties kept)."""
    kth = torch.topk(logits, min(k, logits.size(-1))).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``logits`` [B, V] keeping, per row, the smallest set of most probable tokens whose
    probabilities sum to at least ``p`` (nucleus sampling); the others become -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    drop_sorted = probs.cumsum(-1) - probs >= p  # the more probable tokens reach p (never for the top one)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def _next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Next ids [B, 1] from last-position logits [B, V] (fp32); ids from ``vocab_limit`` on are
    never drawn (rows of the model's table that the tokenizer has no piece for)."""
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits = logits.clone()
        logits[:, vocab_limit:] = float("-inf")
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, -1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)


@torch.no_grad()
def sample(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 40,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    truncate: bool = False,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` [B, T0] by up to ``max_new_tokens`` tokens; returns [B, T0 + n].

    ``temperature`` 0 is greedy; otherwise logits are divided by it, then cut to the
    ``top_k`` most probable tokens and to the nucleus of mass ``top_p`` (None: no cut), and
    the token is drawn with ``generator``. A row that has produced ``stop_id`` continues
    with ``stop_id``; generation ends when every row has. Only ids below ``vocab_limit`` (the
    tokenizer's size, when smaller than the model's vocabulary) are produced. See the module
    docstring for prompts and generations longer than the context.
    """
    n_ctx = model.config.n_positions
    batch, prompt_len = prompt.shape
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if prompt_len > n_ctx and not truncate:
        raise ValueError(
            f"the prompt has {prompt_len} tokens but the model's context (n_positions) is {n_ctx}; "
            f"pass truncate=True to keep its last {n_ctx} tokens"
        )
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and temperature ({temperature}) must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")

    was_training = model.training
    model.eval()
    cache = model.new_cache() if use_cache else None
    ids = prompt
    done = torch.zeros(batch, 1, dtype=torch.bool, device=prompt.device)
    for step in range(max_new_tokens):
        context = ids[:, -n_ctx:]  # [B, ≤ n_ctx]
        if cache is None:
            logits = model(context)
        elif step > 0 and cache.length < n_ctx:
            logits = model(ids[:, -1:], cache=cache)  # one new position
        else:  # prefill, or the window has slid: recompute the positions from 0
            cache.reset()
            logits = model(context, cache=cache)
        nxt = _next_token(
            logits[:, -1, :].float(), temperature, top_k, top_p, generator, vocab_limit
        )  # [B, 1]
        if stop_id is not None:
            nxt = nxt.masked_fill(done, stop_id)
            done |= nxt == stop_id
        ids = torch.cat([ids, nxt], dim=1)
        if stop_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return ids


def _speed(new: int, seconds: float) -> str:
    """``N new tokens in S s: R tokens/s`` for the log."""
    return f"{new} new tokens in {seconds:.2f} s: {new / seconds if seconds > 0 else 0.0:.1f} tokens/s"


def _model_and_tokenizer(
    args: Namespace, parser: ArgumentParser, device: torch.device
) -> tuple[GPT, Tokenizer]:
    """The model of ``args.source`` on ``device`` and its tokenizer (found with it, or
    ``--tokenizer``), checked against each other; a problem is a command-line error."""
    try:
        model, tok_path = load_model(args.source, args.tag)
        tok_path = args.tokenizer or tok_path
        if tok_path is None:
            parser.error(
                f"no tokenizer (tokenizer.model, or vocab.json + merges.txt) found for {args.source}: "
                "pass --tokenizer"
            )
        tok = load_tokenizer(tok_path)
        fit_vocab(model, tok)
    except (FileNotFoundError, ValueError) as e:  # a checkpoint error is a ValueError
        parser.error(str(e))
    model = model.to(device).eval()
    log.info("model: %s; tokenizer %s; device %s", describe(model), tok_path, device)
    return model, tok


def _print_continuations(
    model: GPT, tok: Tokenizer, encoded: list[list[int]], args: Namespace, device: torch.device
) -> None:
    """Sample each prompt's continuation as ``args`` says, print it, log the speed."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    opts = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, stop_id=tok.end_id)
    # Never an appended task token (GPT-1's tokenizer): only the ids text can give.
    opts.update(
        generator=generator, use_cache=not args.no_cache, truncate=args.truncate, vocab_limit=tok.base_size
    )
    total_new, total_s = 0, 0.0
    for i, ids in enumerate(encoded, 1):
        prompt = torch.tensor([ids], dtype=torch.long, device=device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = sample(model, prompt, args.max_new_tokens, **opts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, new = time.perf_counter() - start, out.size(1) - len(ids)
        total_new, total_s = total_new + new, total_s + seconds
        print(f"--- [{i}] ---\n{tok.decode(out[0].tolist())}", flush=True)
        log.info("[%d] %d prompt + %s", i, len(ids), _speed(new, seconds))
    cache = "no cache" if args.no_cache else "KV cache"
    log.info("%d prompts, %s (%s)", len(encoded), _speed(total_new, total_s), cache)


def main(argv: list[str] | None = None) -> None:
    """Command line: print each prompt's continuation and log the generation speed."""
    parser = ArgumentParser(
        prog="python -m gpt1_ds.generate", description=__doc__, formatter_class=RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("source", help="HF directory (config.json + model.safetensors) or RUN/checkpoints")
    add("--prompt", action="append", default=[], help="a prompt (repeatable)")
    add("--prompts-file", type=Path, help="a file of prompts, one per non-empty line")
    add("--max-new-tokens", type=int, default=100)
    add("--temperature", type=float, default=0.8, help="0: greedy")
    add("--top-k", type=int, default=40, help="0: no top-k cut")
    add("--top-p", type=float, default=1.0, help="nucleus mass (1: no cut)")
    add("--seed", type=int, default=0)
    add("--tag", help="checkpoint tag in a checkpoints directory (default: the latest)")
    add(
        "--tokenizer",
        type=Path,
        help="tokenizer.model, or a folder with GPT-1's vocab.json + merges.txt "
        "(default: the one found with SOURCE)",
    )
    add("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add("--no-cache", action="store_true", help="recompute the whole context at each token")
    add("--truncate", action="store_true", help="keep the last n_positions tokens of a too long prompt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    lines = args.prompts_file.read_text(encoding="utf-8").splitlines() if args.prompts_file else []
    prompts = args.prompt + [line for line in lines if line.strip()]
    if not prompts:
        parser.error("give at least one --prompt or a --prompts-file")
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("--max-new-tokens, --temperature, --top-k must be >= 0 and --top-p in (0, 1]")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    model, tok = _model_and_tokenizer(args, parser, device)

    encoded = [tok.encode(tok.normalize(text)) for text in prompts]  # prepared as the training text was
    n_ctx = model.config.n_positions
    for i, ids in enumerate(encoded, 1):
        if len(ids) > n_ctx and not args.truncate:
            parser.error(f"prompt {i} has {len(ids)} tokens but the context is {n_ctx}: pass --truncate")
        if not ids:
            parser.error(f"prompt {i} is empty")

    _print_continuations(model, tok, encoded, args, device)


if __name__ == "__main__":
    main()
