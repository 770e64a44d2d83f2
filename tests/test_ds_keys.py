"""gpt1_ds.ds_keys: a DeepSpeed JSON's keys checked against what the installed DeepSpeed reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt1_ds.ds_config import load_ds_config

JSONS = sorted(Path("ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_every_shipped_json_passes(path):
    assert load_ds_config(path)["train_batch_size"] > 0


READS, KNOWS, TAKES = "not a key DeepSpeed reads", "not a key DeepSpeed knows", "takes no such argument"


@pytest.mark.parametrize(
    "key, value, named, message",
    [
        ("zero_optimisation.stage", 3, "zero_optimisation", f"{READS}; did you mean 'zero_optimization'?"),
        ("gradient_clip", 1.0, "gradient_clip", f"{READS}; did you mean 'gradient_clipping'?"),
        ("zero_optimization.stagee", 2, None, f"{KNOWS}; did you mean 'stage'?"),
        ("zero_optimization.stage", "three", None, "Input should be"),
        ("bf16.enabeld", True, None, f"{KNOWS}; did you mean 'enabled'?"),
        ("zero_optimization.offload_optimizer.devic", "cpu", None, f"{KNOWS}; did you mean 'device'?"),
        ("optimizer.params.lrr", 1, None, f"FusedAdam {TAKES}; did you mean 'lr'?"),
        ("scheduler.params.warmup_num_step", 3, None, f"WarmupCosineLR {TAKES}; did you mean 'warmup_num_s"),
    ],
)  # fmt: skip
def test_a_misspelt_or_wrong_key_is_refused_naming_it_the_override_and_the_nearest(
    key, value, named, message
):
    with pytest.raises(ValueError) as e:
        load_ds_config("ds_configs/zero2.json", {key: value})
    assert str(e.value).startswith(f"ds_configs/zero2.json: {named or key}: {message}")
    assert str(e.value).endswith(f"(set by ds.{key})") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("optimizer.params.torch_adam", True),  # DeepSpeed's own keys of Adam's params
        ("optimizer.params.adam_w_mode", True),
        ("optimizer.params.amsgrad", False),
        ("zero_optimization.reduce_bucket_size", "auto"),
        ("zero_optimization.offload_optimizer.device", "cpu"),  # DeepSpeedCPUAdam's signature then
        ("tensorboard.enabled", True),
        ("compile.deepcompile", True),
        ("communication_data_type", "fp32"),
        ("scheduler.params.warmup_min_ratio", 0.1),
    ],
)
def test_valid_keys_pass(key, value):
    assert load_ds_config("ds_configs/zero2.json", {key: value})


def test_an_offloaded_optimizer_is_checked_against_cpu_adam():
    with pytest.raises(ValueError, match=r"optimizer\.params\.lrr: DeepSpeedCPUAdam takes no such argument"):
        load_ds_config("ds_configs/zero2_offload.json", {"optimizer.params.lrr": 1})


def test_a_key_in_the_json_file_itself_is_named_without_an_override(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        Path("ds_configs/zero1.json").read_text().replace('"zero_optimization"', '"zero_optimisation"')
    )
    with pytest.raises(ValueError) as e:
        load_ds_config(bad)
    assert (
        str(e.value)
        == f"{bad}: zero_optimisation: not a key DeepSpeed reads; did you mean 'zero_optimization'?"
    )
