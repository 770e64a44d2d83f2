"""gpt1_ds.config: YAML + overrides, validation, the DeepSpeed JSON's "auto" values."""

from __future__ import annotations

import pytest

from gpt1_ds.config import RunConfig, load_ds_config, parse_value, resolve_ds_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nmicro_batch_size: 4\nmodel_overrides:\n  n_layer: 2\n")
    run = RunConfig.from_yaml(path, ["max_steps=10", "model_overrides.n_head=2", "sample_prompt=Once upon"])
    assert (run.model, run.micro_batch_size, run.max_steps) == ("tiny", 4, 10)
    assert run.model_overrides == {"n_layer": 2, "n_head": 2}
    assert run.model_config().n_layer == 2 and run.sample_prompt == "Once upon"
    assert RunConfig.from_yaml(None, ["peak_flops=1e15"]).peak_flops == 1e15
    again = tmp_path / "again.yaml"
    again.write_text(run.to_yaml())
    assert RunConfig.from_yaml(again) == run


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_stepz=3"], r"unknown settings \['max_stepz'\]"),
        (["epochs=0"], "epochs must be a positive integer"),
        (["model=gpt5"], "unknown model preset 'gpt5'"),
        (
            ["model_overrides.n_head=5"],
            r"GPTConfig.n_embd \(768\) must be divisible by GPTConfig.n_head \(5\)",
        ),
        (["micro_batch_size"], "is not key=value"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_yaml(None, overrides)


def test_values_parse_as_a_user_means_them():
    assert parse_value("1e-3") == 1e-3 and parse_value("2.5e-4") == 2.5e-4
    assert parse_value("true") is True and parse_value("null") is None
    assert parse_value("[0.9, 0.95]") == [0.9, 0.95] and parse_value("gpt1") == "gpt1"


def test_auto_values_are_filled_and_contradictions_refused():
    ds = load_ds_config("ds_configs/zero2.json")
    run = RunConfig(model="tiny", micro_batch_size=4, epochs=3)
    resolved = resolve_ds_config(ds, run, 2, lambda accum: 100 // accum, "zero2.json", "cpu")
    assert resolved["train_micro_batch_size_per_gpu"] == 4
    assert resolved["gradient_accumulation_steps"] == 8  # 64 / (4 × 2)
    assert resolved["scheduler"]["params"]["total_num_steps"] == 3 * (100 // 8)
    assert ds["gradient_accumulation_steps"] == "auto"  # the loaded dict is not changed
    with pytest.raises(
        ValueError, match="train_batch_size 64 is not a multiple of micro_batch_size 4 × world size 3"
    ):
        resolve_ds_config(ds, run, 3, lambda a: 10, "zero2.json", "cpu")
    fixed = {**ds, "gradient_accumulation_steps": 4}
    with pytest.raises(ValueError, match="gradient_accumulation_steps is 4, but the run needs 8"):
        resolve_ds_config(fixed, run, 2, lambda a: 10, "zero2.json", "cpu")
    with pytest.raises(ValueError, match="fp16 on the CPU"):
        resolve_ds_config(load_ds_config("ds_configs/zero2_fp16.json"), run, 2, lambda a: 10, "f.json", "cpu")
    assert resolve_ds_config(load_ds_config("ds_configs/zero2_fp16.json"), run, 2, lambda a: 10, "f", "cuda")
