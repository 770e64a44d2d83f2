"""gpt1_ds.runner: the parts of the loop's set-up that need no process group."""

from __future__ import annotations

import logging

import pytest
from conftest import REPO

from gpt1_ds.config import load_ds_config
from gpt1_ds.runner import adam_fallback

ZERO2 = load_ds_config(REPO / "ds_configs" / "zero2.json")


def never() -> str | None:
    raise AssertionError("FusedAdam's build was tried where it is not used")


@pytest.mark.parametrize(
    ("device", "overrides"),
    [
        ("cpu", {}),  # DeepSpeed's CPU build of FusedAdam: nothing to compile
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
