"""GPT-1 model: size, causality, loss, checkpointing, parameter groups, config errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from gpt1_ds.env import free_port
from gpt1_ds.model import GPT, IGNORE_INDEX, GPTConfig, _causal_attention_math, param_groups, with_vocab


def tiny(**overrides) -> GPTConfig:
    return GPTConfig.from_preset("tiny", **overrides)


def test_gpt1_preset_has_paper_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt1"))
    assert model.num_parameters() == 116_534_784
    assert model.num_parameters(exclude_positions=True) == 116_534_784 - 512 * 768


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig.from_preset("gpt1"),
        GPTConfig.from_preset("tiny", vocab_size=2001, vocab_multiple=64, n_inner=300, n_layer=3),
        GPTConfig.from_preset("tiny", n_embd=96, n_head=3, n_positions=17),
    ],
    ids=["gpt1", "padded", "narrow"],
)
def test_the_configs_parameter_count_is_the_models(config):
    """GPTConfig.num_parameters (the training loop's MFU, which builds no model) counts what GPT has."""
    with torch.device("meta"):
        model = GPT(config)
    for exclude in (False, True):
        assert config.num_parameters(exclude) == model.num_parameters(exclude_positions=exclude)


def test_gpt1_preset_matches_paper_shape():
    c = GPTConfig.from_preset("gpt1")
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner) == (12, 768, 12, 3072)
    assert (c.vocab_size, c.n_positions, c.layer_norm_epsilon) == (40478, 512, 1e-5)
    assert (c.embd_pdrop, c.attn_pdrop, c.resid_pdrop) == (0.1, 0.1, 0.1)


def test_lm_head_is_tied_and_init_follows_gpt1():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt1"))
    assert model.lm_head.weight is model.tokens_embed.weight
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".ln_" in name:
            assert torch.all(p == 1), name
        else:  # weight matrices and both tables: N(0, 0.02)
            assert abs(p.mean().item()) < 2e-3, name
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name


def test_forward_shapes_and_loss_is_mean_cross_entropy():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    targets = torch.randint(0, model.config.vocab_size, (3, 17))
    logits = model(ids)
    assert logits.shape == (3, 17, model.config.vocab_size)
    logits2, loss = model(ids, targets)
    torch.testing.assert_close(logits, logits2)
    expected = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # A freshly initialised model is near-uniform over the vocabulary.
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 0.5


def test_ignore_index_skips_padding_targets():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    targets = torch.randint(0, model.config.vocab_size, (2, 12))
    _, full = model(ids[:, :8], targets[:, :8])
    padded = targets.clone()
    padded[:, 8:] = IGNORE_INDEX
    # Causal: positions < 8 do not see the tokens after them, so the loss over the
    # counted targets equals the loss of the truncated batch.
    _, masked = model(ids, padded)
    assert masked.item() == pytest.approx(full.item(), rel=1e-5)


def test_causality_changing_token_t_changes_no_earlier_logit():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    t = 23
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 0  # every later position moved


def test_causality_holds_in_training_mode_with_dropout():
    torch.manual_seed(0)
    model = GPT(tiny()).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    changed = ids.clone()
    changed[:, 30] = (ids[:, 30] + 1) % model.config.vocab_size
    torch.manual_seed(5)
    a = model(ids)
    torch.manual_seed(5)
    b = model(changed)
    torch.testing.assert_close(a[:, :30], b[:, :30], rtol=0, atol=0)


def test_cpu_attention_with_dropout_matches_sdpa_without():
    """The written-out CPU path is SDPA's causal attention plus dropout."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 37, 16).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(_causal_attention_math(q, k, v, 1e-12), expected, rtol=0, atol=1e-6)
    dropped = _causal_attention_math(q, k, v, 0.5)
    assert not torch.allclose(dropped, expected)


def test_sequence_longer_than_context_is_refused():
    model = GPT(tiny())
    ids = torch.zeros(1, model.config.n_positions + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"n_positions \(128\)"):
        model(ids)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_embd": 100, "n_head": 12}, "n_head"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"attn_pdrop": 1.5}, "attn_pdrop"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}"):
        GPTConfig.from_preset("gpt1", **overrides)


def test_unknown_preset_and_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="gpt1"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="n_embed"):
        GPTConfig.from_dict({"n_embed": 768})
    assert GPTConfig.from_dict(tiny().to_dict()) == tiny()


def _loss_and_grads(model: GPT, ids: torch.Tensor, seed: int = 1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in both runs
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_same_loss_and_gradients():
    torch.manual_seed(0)
    config = tiny()
    model = GPT(config).train()  # dropout on: the recomputation must replay the same masks
    ids = torch.randint(0, config.vocab_size, (2, 65))
    loss_off, grads_off = _loss_and_grads(model, ids)
    model.config = replace(config, activation_checkpointing=True)
    loss_on, grads_on = _loss_and_grads(model, ids)
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])  # one position, uneven, even, all in one
def test_the_chunked_loss_gives_the_whole_logits_loss_and_gradients(chunk):
    torch.manual_seed(0)
    config = tiny()
    model = GPT(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 65))
    targets = ids[:, 1:].clone()
    targets[0, :5] = IGNORE_INDEX  # skipped positions count in neither
    results = []
    for loss_chunk in (0, chunk):
        model.loss_chunk = loss_chunk
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        logits, loss = model(ids[:, :-1], targets)
        loss.backward()
        results.append((logits, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, loss_whole, grads_whole), (none, loss_chunked, grads_chunked) = results
    assert whole is not None and none is None  # the chunked path never builds the logits
    assert loss_chunked == pytest.approx(loss_whole, abs=1e-5)
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_chunked[name], grad, rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation gets the logits whatever the setting
        assert model(ids[:, :-1], targets)[0] is not None


def test_the_chunked_loss_keeps_only_a_chunk_of_logits_for_the_backward():
    config = tiny()
    model = GPT(config).train()
    ids = torch.randint(0, config.vocab_size, (4, config.n_positions + 1))
    logits_bytes = 4 * config.n_positions * config.vocab_size * 4  # [B·T, V] fp32

    def saved_bytes(chunk: int) -> int:
        model.loss_chunk, total = chunk, 0

        def pack(t: torch.Tensor):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids[:, :-1], ids[:, 1:])
        return total

    whole, chunked = saved_bytes(0), saved_bytes(64)
    assert whole - chunked > logits_bytes  # the logits and their softmax are not kept


def test_activation_checkpointing_saves_memory():
    """With checkpointing, autograd keeps only each block's input, not its internals
    (measured on the transformer body; the LM head's logits are saved either way)."""
    config = tiny(n_layer=4)
    ids = torch.randint(0, config.vocab_size, (4, config.n_positions))

    def saved_bytes(ckpt: bool) -> int:
        model = GPT(replace(config, activation_checkpointing=ckpt)).train()
        total = 0

        def pack(t: torch.Tensor):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.hidden_states(ids)
        return total

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


DS_CHECKPOINT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from dataclasses import replace
    import torch
    import deepspeed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    deepspeed.checkpointing.configure(None)
    from gpt1_ds import model as m
    assert m._checkpoint_fn() is deepspeed.checkpointing.checkpoint
    config = m.GPTConfig.from_preset("tiny")
    torch.manual_seed(0)
    net = m.GPT(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 33))
    def run():
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        _, loss = net(ids[:, :-1], ids[:, 1:])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in net.parameters()]
    l0, g0 = run()
    net.config = replace(config, activation_checkpointing=True)
    l1, g1 = run()
    diff = max((a - b).abs().max().item() for a, b in zip(g0, g1))
    print(f"RESULT {abs(l0 - l1)} {diff}")
    """
)


@pytest.mark.slow
def test_deepspeed_activation_checkpointing_matches(tmp_path):
    """With DeepSpeed's activation checkpointing configured, blocks go through it."""
    script = tmp_path / "ds_ckpt.py"
    script.write_text(DS_CHECKPOINT_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    loss_diff, grad_diff = map(float, line.split()[1:])
    assert loss_diff <= 1e-6 and grad_diff <= 1e-6


def test_param_groups_decay_exactly_the_matrices_once():
    model = GPT(tiny())
    groups = param_groups(model, weight_decay=0.01)
    decay, no_decay = groups[0]["params"], groups[1]["params"]
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay) and all(p.dim() <= 1 for p in no_decay)
    ids = [id(p) for p in decay + no_decay]
    assert len(ids) == len(set(ids)), "a parameter appears twice"
    assert set(ids) == {id(p) for p in model.parameters()}
    assert sum(p.numel() for p in decay + no_decay) == model.num_parameters()
    # The tied table appears once, in the decayed group; c_attn, c_fc weights too.
    assert sum(p is model.tokens_embed.weight for p in decay) == 1
    assert any(p is model.h[0].attn.c_attn.weight for p in decay)
    assert any(p is model.h[0].ln_1.weight for p in no_decay)
    assert any(p is model.h[0].mlp.c_fc.bias for p in no_decay)
    # Usable as given by a torch optimiser (which refuses duplicates).
    torch.optim.AdamW(groups, lr=1e-3)


@pytest.mark.slow
def test_demo_entry_point_prints_both_presets():
    out = subprocess.run(
        [sys.executable, "-m", "gpt1_ds.model", "--seq-len", "16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "116,534,784 parameters" in out.stdout
    assert "tiny" in out.stdout and "logits (2, 16, 40478)" in out.stdout


@pytest.mark.parametrize("loss_chunk", [0, 7])
def test_a_padded_vocabulary_gives_the_same_logits_loss_and_gradients(loss_chunk):
    torch.manual_seed(0)
    plain = GPT(tiny(vocab_size=1000)).train()
    padded = with_vocab(plain, 1000, 64)
    assert padded.tokens_embed.weight.shape[0] == padded.config.padded_vocab_size == 1024
    assert padded.lm_head.weight is padded.tokens_embed.weight  # still tied
    assert not padded.tokens_embed.weight[1000:].any()  # padding rows start at zero
    ids = torch.randint(0, 1000, (2, 33))
    results = []
    for model in (plain, padded):
        model.loss_chunk = loss_chunk
        loss, grads = _loss_and_grads(model, ids)
        results.append((loss, grads))
    (loss_plain, grads_plain), (loss_padded, grads_padded) = results
    assert loss_padded == pytest.approx(loss_plain, abs=1e-6)
    table = "tokens_embed.weight"
    assert not grads_padded[table][1000:].any()  # outside the softmax: no gradient reaches them
    torch.testing.assert_close(grads_padded[table][:1000], grads_plain[table], rtol=0, atol=1e-6)
    for name in grads_plain.keys() - {table}:
        torch.testing.assert_close(grads_padded[name], grads_plain[name], rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():
        logits = padded.eval()(ids)
    assert logits.shape[-1] == 1000  # the padding columns are cut: sampling can never pick them
    torch.testing.assert_close(logits, plain.eval()(ids), rtol=0, atol=1e-6)


def test_with_vocab_appends_new_rows_and_cuts_padding():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=500))
    grown = with_vocab(model, 503)  # three ids appended, as GPT-1's task tokens
    old, new = model.tokens_embed.weight, grown.tokens_embed.weight
    assert new.shape[0] == 503 and torch.equal(new[:500], old)
    assert 0.01 < new[500:].std().item() < 0.03  # drawn from N(0, 0.02), not zero or copied
    cut = with_vocab(with_vocab(grown, 503, 128), 503)
    assert cut.tokens_embed.weight.shape[0] == 503 and torch.equal(cut.tokens_embed.weight, new)
    assert with_vocab(model, 500) is model
    with pytest.raises(ValueError, match="vocab_multiple"):
        tiny(vocab_multiple=0)


def test_dropout_on_the_table_reaches_the_head_and_is_off_in_eval():
    torch.manual_seed(0)
    config = tiny(embd_dropout="table", embd_pdrop=0.5, attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 17))
    hidden = model.hidden_states(ids)
    table = model._table
    assert table is not None and (table == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    # The tied head uses the same dropped table as the input embedding did (GPT-1's code).
    torch.testing.assert_close(model.logits(hidden), hidden @ table.t(), rtol=0, atol=1e-5)
    summed = GPT(replace(config, embd_dropout="sum")).train()
    summed.load_state_dict(model.state_dict())
    summed.hidden_states(ids)
    assert summed._table is None  # dropout on the summed embeddings, the head untouched
    model.eval(), summed.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), summed(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="embd_dropout"):
        tiny(embd_dropout="rows")
