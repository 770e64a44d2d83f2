"""gpt1_ds.heads: the task head at <extract>, both orders summed, one score per choice, the
auxiliary LM loss, GPT-1's classifier dropout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gpt1_ds.heads import TaskModel
from gpt1_ds.model import GPT, GPTConfig
from gpt1_ds.tasks import GLUE, Encoded, Example, TaskData, collate, encode
from gpt1_ds.tokenizer import MODEL_NAME, load_tokenizer

TINY = dict(vocab_size=2000, n_positions=64, n_embd=64, n_layer=2, n_head=2, n_inner=256)


def tiny_model(
    data: TaskData, lm_coef: float = 0.5, seed: int = 0, clf_pdrop: float = 0.1, **rules: str
) -> TaskModel:
    """A tiny TaskModel in eval mode; ``rules``: ``lm_loss_average``, ``clf_dropout_mask``."""
    torch.manual_seed(seed)
    return TaskModel(GPT(GPTConfig(**TINY)), data, lm_coef=lm_coef, clf_pdrop=clf_pdrop, **rules).eval()


@pytest.fixture(scope="module")
def rte(prepared):
    tok = load_tokenizer(prepared / MODEL_NAME)
    data = TaskData("rte")
    examples = data.read(GLUE / "rte" / "dev.tsv", train=True)
    enc = encode(examples, data, tok, TINY["n_positions"])
    return tok, data, sorted(enc, key=lambda e: len(e.sequences[0]))[:6]  # short ones: padding


def test_head_reads_the_extract_state_also_with_padding(rte):
    tok, data, enc = rte
    model = tiny_model(data)
    batch = collate(enc, tok.pad_id, data.regression)
    assert (batch["input_ids"] == tok.pad_id).any()  # examples of different lengths: padded
    with torch.no_grad():
        (scores,) = model(batch["input_ids"], batch["extract_pos"])
        for b, e in enumerate(enc):
            seq = torch.tensor([e.sequences[0]])
            h = model.gpt.hidden_states(seq)  # alone, unpadded
            assert seq[0, -1] == tok.extract_id
            expected = model.head(h[0, -1])
            torch.testing.assert_close(scores[b], expected, rtol=0, atol=1e-5)


def test_similarity_adds_both_orders_and_multiple_choice_scores_each_choice(prepared, tmp_path):
    tok = load_tokenizer(prepared / MODEL_NAME)
    sim = TaskData("similarity")
    row = {"sentence1": "the ship sailed at dawn", "sentence2": "it was late", "label": 4.0}
    (tmp_path / "s.jsonl").write_text(json.dumps(row) + "\n")
    enc = encode(sim.read(tmp_path / "s.jsonl"), sim, tok, 64)
    model = tiny_model(sim)
    batch = collate(enc, tok.pad_id, sim.regression)
    with torch.no_grad():
        (scores,) = model(batch["input_ids"], batch["extract_pos"])
        states = [model.gpt.hidden_states(torch.tensor([s]))[0, -1] for s in enc[0].sequences]
        torch.testing.assert_close(scores[0], model.head(states[0] + states[1]), rtol=0, atol=1e-5)
    mc = TaskData("multiple_choice")
    row = {"context": "the ship sailed", "choices": ["at dawn", "it was late", "no"], "label": 2}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    enc = encode(mc.read(tmp_path / "m.jsonl"), mc, tok, 64)
    model = tiny_model(mc)
    batch = collate(enc, tok.pad_id, mc.regression)
    with torch.no_grad():
        (scores,) = model(batch["input_ids"], batch["extract_pos"])
    assert scores.shape == (1, 3)
    with torch.no_grad():
        for k, s in enumerate(enc[0].sequences):
            h = model.gpt.hidden_states(torch.tensor([s]))[0, -1]
            torch.testing.assert_close(scores[0, k], model.head(h)[0], rtol=0, atol=1e-5)


def test_auxiliary_lm_weight(rte):
    tok, data, enc = rte
    batch = collate(enc, tok.pad_id, data.regression)
    args = (batch["input_ids"], batch["extract_pos"], batch["lm_targets"], batch["labels"])
    with torch.no_grad():
        _, loss0, task0, lm0 = tiny_model(data, lm_coef=0.0)(*args)
        _, loss5, task5, lm5 = tiny_model(data, lm_coef=0.5)(*args)  # same seed: same weights
        model = tiny_model(data)
        B, K, T = batch["input_ids"].shape
        _, lm_expected = model.gpt(batch["input_ids"].view(B * K, T), batch["lm_targets"].view(B * K, T))
    assert lm0 == 0 and loss0 == pytest.approx(task0.item())  # off: no LM term at all
    assert task5 == pytest.approx(task0.item())
    assert lm5 == pytest.approx(lm_expected.item(), rel=1e-6)  # the LM loss over the framed tokens
    assert loss5 == pytest.approx(task0.item() + 0.5 * lm5.item(), rel=1e-6)
    assert loss5 > loss0


def test_lm_loss_is_averaged_over_tokens_or_per_sequence_as_gpt1():
    data = TaskData("classification", labels=["a", "b"])
    sequences = [[5, 6, 7, 8], list(range(100, 160))]  # 3 and 59 next-token targets
    batch = collate([Encoded([seq], float(i)) for i, seq in enumerate(sequences)], 0, regression=False)
    args = (batch["input_ids"], batch["extract_pos"], batch["lm_targets"], batch["labels"])
    models = {rule: tiny_model(data, lm_loss_average=rule) for rule in ("token", "sequence")}
    losses = {}
    with torch.no_grad():
        for rule, model in models.items():  # larger embeddings spread the per-token losses
            model.gpt.tokens_embed.weight.mul_(10)
            *_, losses[rule] = model(*args)
        gpt = models["token"].gpt
        per_token = []  # each sequence alone, unpadded: its own tokens' losses
        for seq in sequences:
            logits = gpt.logits(gpt.hidden_states(torch.tensor([seq])))[0, :-1]
            per_token.append(F.cross_entropy(logits.float(), torch.tensor(seq[1:]), reduction="none"))
    over_tokens = torch.cat(per_token).mean().item()
    over_sequences = torch.stack([t.mean() for t in per_token]).mean().item()
    assert abs(over_tokens - over_sequences) > 0.05  # the short sequence weighs 1/2, not 3/62
    assert losses["token"].item() == pytest.approx(over_tokens, rel=1e-5)
    assert losses["sequence"].item() == pytest.approx(over_sequences, rel=1e-5)
    with pytest.raises(ValueError, match="lm_loss_average must be token or sequence, got 'batch'"):
        tiny_model(data, lm_loss_average="batch")


@pytest.mark.parametrize("mask", ["example", "sequence"])
def test_classifier_dropout_shares_one_mask_per_example_as_gpt1_or_draws_one_per_sequence(prepared, mask):
    tok = load_tokenizer(prepared / MODEL_NAME)
    mc = TaskData("multiple_choice")
    choices = ["at dawn", "it was late", "no", "in the night"]
    examples = [Example((context, tuple(choices)), 1.0, "x") for context in ("a ship", "the sea")]
    batch = collate(encode(examples, mc, tok, 64), tok.pad_id, regression=False)
    B, K, T = batch["input_ids"].shape
    assert (B, K) == (2, 4)
    model = tiny_model(mc, clf_pdrop=0.5, clf_dropout_mask=mask)
    pos = batch["extract_pos"]
    with torch.no_grad():
        h = model.gpt.hidden_states(batch["input_ids"].view(B * K, T))  # [B*K, T, C]
        states = h.view(B, K, T, -1)[torch.arange(B)[:, None], torch.arange(K), pos]  # [B, K, C]
        assert torch.equal(model.features(h, pos), states)  # eval: no dropout
        model.train()
        torch.manual_seed(1)
        dropped = model.features(h, pos)
    kept = dropped != 0
    assert (states != 0).all() and 0.3 < kept.float().mean().item() < 0.7
    torch.testing.assert_close(dropped[kept], 2 * states[kept])  # kept values scaled by 1 / (1 - 0.5)
    same_across_choices = [bool((kept[b] == kept[b, :1]).all()) for b in range(B)]
    if mask == "example":
        assert same_across_choices == [True, True]
        assert not torch.equal(kept[0], kept[1])  # one mask per example, not one per batch
    else:
        assert same_across_choices == [False, False]
