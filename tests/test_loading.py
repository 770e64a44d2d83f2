"""gpt1_ds.loading: weights from every source, a tied head, refusals naming the file."""

from __future__ import annotations

import pytest
import torch

from gpt1_ds.checkpoint import CheckpointError
from gpt1_ds.loading import _gpt_weights, consolidate
from gpt1_ds.model import GPT, LM_HEAD, GPTConfig
from gpt1_ds.model import TOKENS_EMBED as TOKENS

SMALL_GPT = GPTConfig(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=128)


def test_directory_without_checkpoints_is_refused(tmp_path):
    empty = tmp_path / "checkpoints"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        consolidate(empty)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        consolidate(tmp_path / "missing")


@pytest.mark.parametrize("with_head", [True, False])
def test_fine_tuned_state_dict_gives_the_gpt_with_a_tied_head(with_head):
    torch.manual_seed(0)
    gpt = GPT(SMALL_GPT).state_dict()
    task = {f"gpt.{k}": v.clone() for k, v in gpt.items() if with_head or k != LM_HEAD}
    if with_head:
        task[f"gpt.{LM_HEAD}"] = task[f"gpt.{TOKENS}"]
    task["head.weight"] = torch.randn(3, SMALL_GPT.n_embd)
    task["head.bias"] = torch.zeros(3)
    weights = _gpt_weights(task, "finetuned")
    assert set(weights) == set(gpt)
    assert weights[LM_HEAD] is weights[TOKENS]
    model = GPT(SMALL_GPT)
    model.load_state_dict(weights)  # strict: nothing missing, nothing left over
    for key, value in gpt.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_untied_head_is_refused():
    gpt = GPT(SMALL_GPT).state_dict()
    plain = {k: v.clone() for k, v in gpt.items()}
    plain[LM_HEAD] = plain[TOKENS] * 2
    with pytest.raises(CheckpointError, match="differs"):
        _gpt_weights(plain, "plain")
    task = {f"gpt.{k}": v for k, v in plain.items()}
    with pytest.raises(CheckpointError, match="differs"):
        _gpt_weights(task, "finetuned")
    without_table = {k: v for k, v in gpt.items() if k != TOKENS}
    with pytest.raises(CheckpointError, match=TOKENS):
        _gpt_weights(without_table, "broken")
