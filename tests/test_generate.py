"""Generation: KV cache parity, sampling filters, stopping, context policy, the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from gpt1_ds.generate import _next_token, sample, top_k_filter, top_p_filter
from gpt1_ds.hf import export_hf, import_hf
from gpt1_ds.model import GPT, GPTConfig, KVCache

SMALL = GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=3, n_head=4, n_inner=128)


def small_model(seed: int = 0, std: float = 1.0) -> GPT:
    """A random model. The default wide init makes its next token depend on the context
    (with GPT-1's std 0.02, greedy decoding repeats one token), so greedy comparisons test
    something."""
    torch.manual_seed(seed)
    return GPT(replace(SMALL, initializer_range=std)).eval()


def prompt(B: int = 2, T: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_cached_logits_equal_full_recomputation():
    model = small_model(std=0.02)  # GPT-1's init: logits of the scale the tolerance is meant for
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:  # non-trivial biases and gains
                p.add_(torch.randn_like(p) * 0.1)
    ids = prompt(B=2, T=SMALL.n_positions)
    with torch.no_grad():
        full = model(ids)  # [B, T, V]
        cache = model.new_cache()
        # prefill 7, one at a time up to 20, then chunks of 3 and 9 (masked multi-token queries)
        pieces = [model(ids[:, :7], cache=cache)]
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(7, 20)]
        pieces += [model(ids[:, 20:23], cache=cache), model(ids[:, 23:], cache=cache)]
    assert cache.length == SMALL.n_positions
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    # A full cache takes no further position.
    with pytest.raises(
        ValueError, match=r"32 cached \+ 1 new positions exceeds GPTConfig.n_positions \(32\)"
    ):
        model(ids[:, :1], cache=cache)


def test_cache_update_returns_past_and_new_positions():
    cache = KVCache(n_layer=1, max_len=6)
    k1, v1 = torch.randn(2, 1, 2, 3, 4).unbind(0)  # [B=1, H=2, T=3, D=4]
    cache.update(0, k1, v1)
    cache.length += 3
    k2, v2 = torch.randn(2, 1, 2, 2, 4).unbind(0)
    k, v = cache.update(0, k2, v2)
    assert k.shape == (1, 2, 5, 4)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    cache.length += 2
    with pytest.raises(ValueError, match="holds 6 positions"):
        cache.update(0, k2, v2)


def test_greedy_with_cache_equals_greedy_without():
    """Also past n_positions, where the context slides (5 + 40 > 32)."""
    model = small_model()
    ids = prompt(B=2, T=5)
    with_cache = sample(model, ids, 40, temperature=0, use_cache=True)
    without = sample(model, ids, 40, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 45)
    assert torch.equal(with_cache, without)
    assert all(len(set(row)) > 3 for row in with_cache[:, 5:].tolist())  # not a constant stream


def test_greedy_matches_after_hf_round_trip_and_hf_generate(tmp_path):
    model = small_model()
    ids = prompt(B=1, T=6)
    ours = sample(model, ids, 20, temperature=0)
    reloaded = import_hf(export_hf(model, tmp_path / "hf"))
    assert torch.equal(sample(reloaded, ids, 20, temperature=0), ours)
    transformers = pytest.importorskip("transformers")
    hf = transformers.OpenAIGPTLMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, ours)


def test_same_seed_same_tokens_different_seed_different_tokens():
    model = small_model()
    ids = prompt(B=2, T=4)

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return sample(model, ids, 24, temperature=1.0, top_k=None, generator=gen)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    # The cache changes nothing in sampling either: same seed, same tokens.
    gen = torch.Generator().manual_seed(7)
    no_cache = sample(model, ids, 24, temperature=1.0, top_k=None, generator=gen, use_cache=False)
    assert torch.equal(no_cache, run(7))


def test_exactly_max_new_tokens_without_stop_id():
    model = small_model()
    ids = prompt(B=3, T=4)
    for n in (0, 1, 13):
        out = sample(model, ids, n, temperature=1.0, generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, 4 + n)
        assert torch.equal(out[:, :4], ids)


def test_stop_id_stops_early_and_pads_finished_rows():
    model = small_model()
    ids = prompt(B=2, T=5, seed=3)
    free = sample(model, ids, 30, temperature=0)[:, 5:]  # [2, 30]
    # A stop id that row 0 produces (first at step s) and row 1 never does.
    candidates = [t for t in free[0, 2:].tolist() if t not in free[1].tolist()]
    assert candidates, "the fixture should give rows with distinct tokens"
    stop = candidates[0]
    s = free[0].tolist().index(stop)
    out = sample(model, ids, 30, temperature=0, stop_id=stop)[:, 5:]
    assert out.shape == (2, 30)  # row 1 keeps going to the limit
    assert torch.equal(out[0, : s + 1], free[0, : s + 1])
    assert (out[0, s:] == stop).all()  # row 0 is padded with the stop id after it
    assert torch.equal(out[1], free[1])
    # A single row ends at its stop id.
    alone = sample(model, ids[:1], 30, temperature=0, stop_id=stop)[:, 5:]
    assert torch.equal(alone[0], free[0, : s + 1])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.4, 0.1]])
    logits = probs.log()

    def kept(p: float) -> list[list[int]]:
        out = top_p_filter(logits, p)
        return [torch.nonzero(row > float("-inf")).flatten().tolist() for row in out]

    assert kept(0.3) == [[1], [2]]  # the top token alone already reaches p
    assert kept(0.75) == [[1, 3], [0, 1, 2]]  # row 1: 0.4 + 0.25 = 0.65 < 0.75 needs the other 0.25
    assert kept(0.85) == [[1, 2, 3], [0, 1, 2]]
    assert kept(1.0) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    torch.testing.assert_close(top_p_filter(logits, 0.85)[0, 1:], logits[0, 1:])  # kept values unchanged


def test_top_k_and_top_p_restrict_what_is_drawn():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(400, 1)
    gen = torch.Generator().manual_seed(0)
    drawn = set(_next_token(logits, 1.0, None, 0.75, gen).flatten().tolist())
    assert drawn == {0, 1}
    drawn = set(_next_token(logits, 1.0, 3, None, gen).flatten().tolist())
    assert drawn == {0, 1, 2}
    assert torch.equal(
        top_k_filter(logits[:1], 1) > float("-inf"), torch.tensor([[True, False, False, False]])
    )


def test_bad_sampling_arguments_are_refused():
    model = small_model()
    ids = prompt(B=1, T=3)
    with pytest.raises(ValueError, match="top_p"):
        sample(model, ids, 2, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(model, ids, 2, top_k=0)
    with pytest.raises(ValueError, match="empty"):
        sample(model, ids[:, :0], 2)


def test_too_long_prompt_is_refused_or_truncated():
    model = small_model()
    long = prompt(B=1, T=SMALL.n_positions + 8)
    with pytest.raises(ValueError, match=r"prompt has 40 tokens .* \(n_positions\) is 32"):
        sample(model, long, 4, temperature=0)
    out = sample(model, long, 4, temperature=0, truncate=True)
    assert out.shape == (1, 44) and torch.equal(out[:, :40], long)  # the whole prompt is kept in the output
    # The model saw only the last 32 tokens of it.
    window = sample(model, long[:, -SMALL.n_positions :], 4, temperature=0)
    assert torch.equal(out[:, 40:], window[:, SMALL.n_positions :])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpt1_ds.generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def hf_dir(prepared, tmp_path_factory):
    """A random tiny model with the prepared tokenizer's vocabulary, exported as an HF directory."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=2000, n_positions=64, n_layer=2)
    path = export_hf(GPT(config), tmp_path_factory.mktemp("gen") / "hf")
    shutil.copy(prepared / "tokenizer.model", path / "tokenizer.model")
    return path


@pytest.mark.slow
def test_cli_generates_from_an_hf_directory(hf_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The moon\n\n")
    common = [str(hf_dir), "--prompt", "It was a truth", "--prompts-file", str(prompts)]
    common += ["--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]
    out = run_cli(*common)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "It was a truth" in out.stdout and "The moon" in out.stdout
    assert out.stdout.count("--- [") == 2
    assert re.search(r"12 new tokens in [\d.]+ s: [\d.]+ tokens/s", out.stderr), out.stderr
    # Greedy: the same text without the cache.
    no_cache = run_cli(*common, "--no-cache")
    assert no_cache.returncode == 0, no_cache.stderr[-3000:]
    assert no_cache.stdout == out.stdout


@pytest.mark.slow
def test_cli_refuses_a_missing_tokenizer_and_a_too_long_prompt(hf_dir, tmp_path):
    bare = tmp_path / "a" / "b" / "bare"  # no tokenizer in the folders above either
    shutil.copytree(hf_dir, bare, ignore=shutil.ignore_patterns("tokenizer.*"))
    out = run_cli(str(bare), "--prompt", "Hello", "--max-new-tokens", "2", "--device", "cpu")
    assert out.returncode == 2 and "pass --tokenizer" in out.stderr, out.stderr[-2000:]
    long = " ".join(["moon"] * 80)  # more than the 64 positions
    args = [str(bare), "--tokenizer", str(hf_dir / "tokenizer.model"), "--prompt", long]
    out = run_cli(*args, "--max-new-tokens", "2", "--device", "cpu")
    assert out.returncode == 2 and re.search(r"prompt 1 has \d+ tokens but the context is 64", out.stderr)
    out = run_cli(*args, "--max-new-tokens", "2", "--device", "cpu", "--truncate", "--temperature", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert long in out.stdout and re.search(r"2 new tokens in .* tokens/s", out.stderr)


@pytest.mark.slow
def test_cli_names_a_source_that_does_not_exist_in_one_line(tmp_path):
    out = run_cli(str(tmp_path / "nope"), "--prompt", "Hello", "--device", "cpu")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .endswith(f"error: {tmp_path / 'nope'}: no such checkpoint directory")
    )


def test_ids_the_tokenizer_lacks_are_never_drawn():
    """A model whose table is larger than its tokenizer (allowed: the dataset's vocabulary is at
    most the model's) must not produce the rows no piece maps to, sampled or greedy."""
    model = small_model()
    start = prompt(4, 3) % 10
    gen = torch.Generator().manual_seed(0)
    out = sample(model, start, 60, temperature=3.0, top_k=None, generator=gen, vocab_limit=10)
    assert out.max() < 10 and out.shape == (4, 63)
    with torch.no_grad():
        logits = model(start)[:, -1, :].float()
    greedy = sample(model, start, 1, temperature=0, vocab_limit=10)[:, -1]
    assert torch.equal(greedy, logits[:, :10].argmax(-1))
    unlimited = sample(
        model, start, 60, temperature=3.0, top_k=None, generator=torch.Generator().manual_seed(0)
    )
    assert unlimited.max() >= 10  # without the limit the same draw leaves the range: the test can fail
