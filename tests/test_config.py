"""gpt1_ds.config: YAML + overrides, validation, the DeepSpeed JSON's "auto" values."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import MISSING, asdict, fields, replace

import pytest
import yaml
from conftest import REPO

from gpt1_ds.config import FinetuneConfig, RunConfig, parse_value
from gpt1_ds.ds_config import load_ds_config, resolve_batch, resolve_ds_config


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
        (
            ["max_stepz=3"],
            r"unknown setting 'max_stepz' \(given on the command line\); did you mean 'max_steps'\?",
        ),
        (
            ["n_layr=1"],
            r"unknown setting 'n_layr' .*; did you mean 'model_overrides.n_layer'\? every setting: --help",
        ),
        (["n_head=2"], r"unknown setting 'n_head' .*; it is a model field: model_overrides.n_head=VALUE"),
        (
            ["data_slots=16"],
            r"setting 'data_slots' \(given on the command line\) is gone: a step's sequences depend on "
            r"train_batch_size alone now.*; remove the setting",
        ),
        (
            ["model_overrides.n_layr=1"],
            r"unknown model field 'n_layr': did you mean 'n_layer'\? the fields are vocab_size",
        ),
        (["epochs=0"], "epochs must be a positive integer"),
        (["model=gpt5"], "unknown model preset 'gpt5'"),
        (
            ["model_overrides.n_head=5"],
            r"GPTConfig.n_embd \(768\) must be divisible by GPTConfig.n_head \(5\)",
        ),
        (["micro_batch_size"], "is not key=value"),
        (
            ["max_steps=ten"],
            r"setting max_steps \(given on the command line\) must be int \| None, got 'ten'",
        ),
        (["seed=true"], "setting seed .* must be int, got True"),
        (["model_overrides=3"], r"setting model_overrides .* must be dict\[str, Any\], got 3"),
        (["data_on_error=ignore"], "data_on_error must be raise or skip"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_yaml(None, overrides)


def test_a_config_file_with_a_wrong_type_names_the_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("micro_batch_size: 8\nrun_dir: [a, b]\n")
    with pytest.raises(ValueError, match=rf"setting run_dir \(in {path}\) must be str, got \['a', 'b'\]"):
        RunConfig.from_yaml(path)
    path.write_text("task: sst2\nlm_coef: half\n")
    with pytest.raises(ValueError, match=rf"setting lm_coef \(in {path}\) must be float"):
        FinetuneConfig.from_yaml(path)


def test_a_setting_given_on_the_command_line_is_not_blamed_on_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\n")
    with pytest.raises(ValueError, match=r"setting seed \(given on the command line\) must be int"):
        RunConfig.from_yaml(path, ["seed=x"])
    path.write_text("model: tiny\nsed: 3\n")
    with pytest.raises(ValueError, match=rf"unknown setting 'sed' \(in {path}\); did you mean 'seed'\?"):
        RunConfig.from_yaml(path, ["seed=4"])


def test_help_lists_every_setting_and_model_field_with_type_default_and_doc():
    from gpt1_ds.model import GPTConfig
    from gpt1_ds.runner import parse_launch_args

    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        parse_launch_args(["--help"], "train", None, "ds.json", "yaml", {}, RunConfig)
    text = out.getvalue()
    for f in (*fields(RunConfig), *fields(GPTConfig)):
        assert f"\n  {f.name}: {f.type} = " in text, f.name
    assert "  max_steps: int | None = None\n      Stop after this many optimiser steps" in text
    assert "  n_layer: int = 12\n      Number of transformer blocks." in text


def test_overrides_may_come_before_and_after_the_flags():
    from gpt1_ds.runner import parse_launch_args

    argv = ["max_steps=3", "--run-dir", "R", "seed=5", "ds.gradient_clipping=0.5"]
    _, over, ds_over = parse_launch_args(argv, "train", None, "ds.json", "yaml", {"run_dir": "run"})
    assert over == ["max_steps=3", "seed=5", 'run_dir="R"'] and ds_over == ["gradient_clipping=0.5"]


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


def test_bf16_auto_is_bf16_where_the_cpu_computes_in_it(monkeypatch, tmp_path, caplog):
    from gpt1_ds import ds_config, ops

    ds = load_ds_config("ds_configs/zero2.json", {"bf16.enabled": "auto"})
    run = RunConfig(model="tiny", micro_batch_size=4, epochs=1)
    monkeypatch.setattr(ops.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ops, "PROC_CPUINFO", tmp_path / "cpuinfo")
    for flags, expected in (("avx2 avx512f", False), ("avx2 avx512f avx512_bf16", True), ("amx_bf16", True)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu {flags}\n")
        with caplog.at_level(logging.INFO, logger="gpt1_ds.ds_config"):
            resolved = resolve_ds_config(ds, run, 2, lambda accum: 100, "zero2.json", "cpu")
        assert resolved["bf16"]["enabled"] is expected, flags
        assert ds_config.precision(resolved) == ("bf16" if expected else "fp32")
    assert "bf16.enabled auto: fp32 (the CPU has none of avx512_bf16, amx_bf16, bf16" in caplog.text
    assert "bf16.enabled auto: bf16 (the CPU computes in bf16 (amx_bf16))" in caplog.text
    assert ds["bf16"]["enabled"] == "auto"  # the loaded dict is not changed


def test_a_warm_up_longer_than_the_run_is_named(caplog):
    ds = load_ds_config("ds_configs/zero1.json", {"scheduler.params.warmup_num_steps": 50})
    run = RunConfig(model="tiny", micro_batch_size=4, max_steps=20)
    with caplog.at_level(logging.WARNING, logger="gpt1_ds.config"):
        resolve_ds_config(ds, run, 1, lambda accum: 100, "zero1.json", "cpu")
    assert (
        "warmup_num_steps=50) is longer than the run's 20 steps: the learning rate never reaches"
        in caplog.text
    )
    caplog.clear()
    resolve_ds_config(ds, replace(run, max_steps=60), 1, lambda accum: 100, "zero1.json", "cpu")
    assert "warm-up" not in caplog.text


def test_a_run_dir_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=rf"run_dir {tmp_path}/a_file/run: {tmp_path}/a_file is a file"):
        RunConfig.from_yaml(None, [f"run_dir={tmp_path}/a_file/run"])


def test_the_default_deepspeed_json_is_the_checkouts_own_from_any_directory(tmp_path, monkeypatch):
    from gpt1_ds.runner import parse_launch_args

    monkeypatch.chdir(tmp_path)
    args, _, _ = parse_launch_args([], "train", None, "ds_configs/zero1.json", "yaml", {})
    assert args.ds_config == str(REPO / "ds_configs" / "zero1.json")
    args, _, _ = parse_launch_args(
        ["--ds-config", "mine.json"], "train", None, "ds_configs/zero1.json", "y", {}
    )
    assert args.ds_config == "mine.json"  # a path given is the user's


DS_CONFIGS = REPO / "ds_configs"
PRETRAINING = sorted(p.name for p in DS_CONFIGS.glob("zero*.json"))
SHARED = ("train_batch_size", "gradient_clipping", "optimizer", "scheduler", "steps_per_print")


@pytest.mark.parametrize("name", PRETRAINING)
def test_pretraining_ds_configs_agree_on_their_shared_blocks(name):
    """Each file is complete (users hand it to DeepSpeed as it is), so the recipe is written in
    each: it must be the same recipe. Only ZeRO, offload and precision may differ."""
    ours, reference = load_ds_config(DS_CONFIGS / name), load_ds_config(DS_CONFIGS / "zero2.json")
    for key in SHARED:
        assert ours.get(key) == reference[key], f"{name}: {key} differs from zero2.json's"
    if name == "zero2_fp16.json":  # the one fp16 file: loss scaling instead of bf16
        assert ours["fp16"]["enabled"] and "bf16" not in ours
        return
    assert ours["bf16"] == reference["bf16"], name
    # stage 0 with bf16 takes no fp32 accumulation (DeepSpeed refuses the mix: config.py)
    assert ours.get("data_types") == (None if name == "zero0.json" else reference["data_types"]), name
    assert "activation_checkpointing" in ours, name


def test_finetuning_ds_config_shares_precision_and_zero_with_pretraining():
    ours, reference = load_ds_config(DS_CONFIGS / "finetune.json"), load_ds_config(DS_CONFIGS / "zero2.json")
    for key in ("bf16", "data_types", "zero_optimization", "gradient_clipping", "steps_per_print"):
        assert ours[key] == reference[key], key
    assert ours["optimizer"]["params"] == {**reference["optimizer"]["params"], "lr": 6.25e-5}  # GPT-1 §4.1
    assert (ours["train_batch_size"], ours["scheduler"]["type"]) == (32, "WarmupDecayLR")


def test_profiles_hold_only_known_settings_and_differ_from_the_defaults():
    """configs/*.yaml load, and every value they set differs from the dataclass default (one
    home for each setting: a profile holds only what it changes)."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cls = FinetuneConfig if "finetune" in path.name else RunConfig
        raw = yaml.safe_load(path.read_text())
        loaded = asdict(cls.from_yaml(path))
        default = {
            f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)
        }
        for key in raw:
            assert loaded[key] != default[key], f"{path.name}: {key} restates the default"


# --- The batch at any world size ---------------------------------------------------------------


def batch(world: int, cap: int = 64, **settings):
    run = RunConfig.from_yaml(None, [f"{k}={v}" for k, v in settings.items()])
    ds = load_ds_config(REPO / "ds_configs" / "zero2.json")
    return resolve_batch(run, ds, world, cap, "zero2.json")


@pytest.mark.parametrize(
    ("world", "cap", "micro"),
    [(1, 64, 64), (1, 8, 8), (8, 64, 8), (8, 4, 4), (32, 64, 2), (64, 64, 1), (2, 24, 16), (4, 12, 8)],
)
def test_auto_micro_batch_is_the_largest_divisor_of_the_batch_per_rank_under_the_cap(world, cap, micro):
    assert batch(world, cap) == (micro, {})  # GPT-1's batch of 64 sequences


def test_a_world_size_that_does_not_divide_the_batch_names_those_that_do():
    with pytest.raises(ValueError) as e:
        batch(6)
    message = str(e.value)
    assert "the global batch of 64 sequences does not split over 6 ranks" in message
    assert "world sizes that can run it: 1, 2, 4, 8, 16, 32, 64" in message
    assert "global_batch_size=60 or 66 (multiples of 6)" in message


def test_a_changed_global_batch_scales_the_learning_rate_by_the_square_root_rule(caplog):
    with caplog.at_level(logging.WARNING):
        micro, extra = batch(6, global_batch_size=48)
    assert micro == 8 and extra["train_batch_size"] == 48
    assert extra["optimizer.params.lr"] == pytest.approx(2.5e-4 * math.sqrt(48 / 64))
    assert "global batch 64 → 48 (global_batch_size), learning rate 0.00025 → 0.0002165" in caplog.text
    assert batch(8, global_batch_size=64) == (8, {})  # the recipe's own batch: nothing changes
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
        batch(8, micro_batch_size=0)


def test_an_explicit_micro_batch_is_kept_and_checked_later():
    assert batch(8, micro_batch_size=4) == (4, {})


def test_fine_tuning_rules_default_to_gpt1_truncation_and_are_checked():
    cfg = FinetuneConfig.from_yaml(None, ["train=t", "dev=d"])
    assert (cfg.truncation, cfg.lm_loss_average, cfg.clf_dropout_mask) == ("gpt1", "token", "sequence")
    chosen = ["truncation=shared", "lm_loss_average=sequence", "clf_dropout_mask=example"]
    cfg = FinetuneConfig.from_yaml(None, ["train=t", "dev=d", *chosen])
    assert {k: asdict(cfg)[k] for k in ("truncation", "lm_loss_average", "clf_dropout_mask")} == {
        "truncation": "shared",
        "lm_loss_average": "sequence",
        "clf_dropout_mask": "example",
    }  # asdict is what a checkpoint records
    for key, allowed in (
        ("truncation", "gpt1 or shared"),
        ("lm_loss_average", "token or sequence"),
        ("clf_dropout_mask", "sequence or example"),
        ("task_tokens", "new or keep"),
    ):
        with pytest.raises(ValueError, match=f"fine-tuning setting {key} must be {allowed}, got 'half'"):
            FinetuneConfig.from_yaml(None, ["train=t", "dev=d", f"{key}=half"])
