"""gpt1_ds.runner: the parts of the loop's set-up that need no process group."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import REPO

from gpt1_ds.ds_config import adam_fallback, load_ds_config
from gpt1_ds.runner import NEVER, Window, seed_dropout

ZERO2 = load_ds_config(REPO / "ds_configs" / "zero2.json")


def never() -> str | None:
    raise AssertionError("FusedAdam's build was tried where it is not used")


@pytest.mark.parametrize(
    ("device", "overrides"),
    [
        ("cpu", {}),  # DeepSpeed's CPU build of FusedAdam (make setup builds it): no fallback
        ("cuda", {"optimizer.params.torch_adam": False}),  # the user chose
        ("cuda", {"zero_optimization.offload_optimizer.device": "cpu"}),  # DeepSpeedCPUAdam
        ("cuda", {"optimizer.type": "Lamb"}),
    ],
)
def test_no_fallback_where_fused_adam_is_not_built(device, overrides):
    cfg = load_ds_config(REPO / "ds_configs" / "zero2.json", overrides)
    assert adam_fallback(cfg, device, never) is cfg


def test_on_cuda_an_unbuildable_fused_adam_becomes_torchs_fused_adamw(caplog):
    assert adam_fallback(ZERO2, "cuda", lambda: None) is ZERO2  # it builds: kept
    with caplog.at_level(logging.WARNING, logger="gpt1_ds.runner"):
        cfg = adam_fallback(ZERO2, "cuda", lambda: "RuntimeError: nvcc not found")
    assert cfg["optimizer"]["params"] == {**ZERO2["optimizer"]["params"], "torch_adam": True, "fused": True}
    assert ZERO2["optimizer"]["params"].get("torch_adam") is None  # the loaded JSON is not changed
    assert "nvcc not found" in caplog.text and "torch.optim.AdamW(fused=True)" in caplog.text


def test_the_window_finds_the_first_step_with_a_non_finite_value_or_gradient_norm():
    """Rows of [logged values..., gradient norm] from a resumed step on; the first bad row's step,
    whether the loss, another value or the norm (a tensor, or DeepSpeed's float inf) went bad."""
    window = Window(rows=10, device=torch.device("cpu"))
    assert int(window.first_bad()) == NEVER  # no step yet
    for step, (values, norm) in enumerate(
        [([2.0, 0.5], torch.tensor(1.5)), ([1.9, 0.6], 1.2), ([1.8, 0.7], None)], start=11
    ):
        window.add(step, torch.tensor(values), norm, seconds=0.1)
    assert int(window.first_bad()) == NEVER and window.steps == 3
    assert window.row(12) == pytest.approx([1.9, 0.6, 1.2]) and window.row(13)[-1] == 0.0  # unwatched
    window.add(14, torch.tensor([1.7, 0.8]), float("inf"), seconds=0.1)  # a step DeepSpeed skipped
    window.add(15, torch.tensor([float("nan"), 0.8]), torch.tensor(1.0), seconds=0.1)
    assert int(window.first_bad()) == 14 and math.isinf(window.row(14)[-1])
    window.reset()
    window.add(21, torch.tensor([1.0, 0.1]), torch.tensor(float("nan")), seconds=0.1)
    assert int(window.first_bad()) == 21 and window.first_step == 21


def test_dropout_seeded_on_the_devices_generator_draws_torch_manual_seeds_masks():
    """The same masks as torch.manual_seed (what the loop did before), without seeding every backend."""
    torch.manual_seed(1234)
    expected = torch.nn.functional.dropout(torch.ones(64), 0.5)
    torch.manual_seed(99)
    seed_dropout(torch.device("cpu"), 1234)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), 0.5), expected)
