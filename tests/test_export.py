"""gpt1_ds.export: real 2-rank checkpoints of every ZeRO stage, consolidated and exported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, train
from conftest import SHIPPED_STEPS as STEPS
from conftest import SHIPPED_TAG as TAG
from safetensors import safe_open

from gpt1_ds.checkpoint import CheckpointError
from gpt1_ds.env import free_port
from gpt1_ds.hf import import_hf
from gpt1_ds.loading import consolidate, load_model, model_from_checkpoint
from gpt1_ds.model import GPT, LM_HEAD
from gpt1_ds.model import TOKENS_EMBED as TOKENS
from gpt1_ds.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
OpenAIGPTLMHeadModel = transformers.OpenAIGPTLMHeadModel

VOCAB = 2000  # SMALL's model_overrides.vocab_size
MODEL_STATES = "mp_rank_00_model_states.pt"


def export_cli(*args: object, ok: bool = True) -> subprocess.CompletedProcess:
    """``python -m gpt1_ds.export ...`` as a user runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "gpt1_ds.export", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if ok:
        assert out.returncode == 0, out.stderr[-4000:]
    else:
        assert out.returncode != 0, out.stderr[-4000:]
        assert "Traceback" not in out.stderr, out.stderr[-4000:]
    return out


def module_states(run: Path) -> dict[str, torch.Tensor]:
    """The module's own weights as DeepSpeed saved them (bf16 under bf16, full for stages 0-2)."""
    return torch.load(run / "checkpoints" / TAG / MODEL_STATES, map_location="cpu", weights_only=False)[
        "module"
    ]


def random_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(seed))


def assert_same_weights(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def copy_checkpoints(run: Path, dest: Path) -> Path:
    """A private copy of a run's checkpoints directory, to damage."""
    return Path(shutil.copytree(run / "checkpoints", dest / "checkpoints"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3"])
def test_hf_export_gives_the_logits_of_the_checkpoint(shipped_runs, tmp_path, name):
    run = shipped_runs(name)
    hf_dir = tmp_path / "hf"
    out = export_cli(run / "checkpoints", "--out", hf_dir)
    assert TAG in out.stderr
    assert sorted(p.name for p in hf_dir.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "tokenizer_info.json",
    ]
    for tokenizer_file in ("tokenizer.model", "tokenizer_info.json"):
        assert (hf_dir / tokenizer_file).read_bytes() == (run / tokenizer_file).read_bytes()
    card = (hf_dir / "README.md").read_text()
    assert f"Training: {STEPS} steps" in card and f"`{TAG}`" in card
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        assert f.metadata()["gpt1_ds_step"] == str(STEPS)
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"F32"}

    ours, ckpt = model_from_checkpoint(run / "checkpoints")
    assert ckpt.state.step == STEPS and ckpt.tag == TAG
    hf, info = OpenAIGPTLMHeadModel.from_pretrained(hf_dir, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    table = hf.transformer.tokens_embed.weight
    assert hf.lm_head.weight.dtype == torch.float32
    assert torch.equal(hf.lm_head.weight, table)
    assert torch.equal(table, ours.tokens_embed.weight)
    ids = random_ids()
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(hf(ids).logits, expected, rtol=0, atol=1e-5)
    assert expected.std() > 0  # not a degenerate model

    again, tokenizer = load_model(hf_dir)  # and our loader reads the HF directory back
    assert_same_weights(again, ours)
    assert tokenizer == hf_dir / "tokenizer.model"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2"])
def test_consolidated_weights_are_the_fp32_masters_of_the_bf16_module(shipped_runs, name):
    """Stages 0-2 keep the full bf16 module beside the fp32 masters: every module weight is its
    master rounded to bf16, and the masters hold values that bf16 cannot (so they are not the
    module's weights widened)."""
    run = shipped_runs(name)
    weights, _ = consolidate(run / "checkpoints")
    module = module_states(run)
    assert set(weights) - {LM_HEAD} == set(module) - {LM_HEAD}
    total = inexact = 0
    for key, value in module.items():
        if key == LM_HEAD:
            continue
        master = weights[key]
        assert value.dtype == torch.bfloat16 and master.dtype == torch.float32, key
        assert master.shape == value.shape, key
        assert torch.equal(master.to(torch.bfloat16), value), key
        assert ((master - value.float()).abs() <= value.float().abs() * 2**-8).all(), key  # half a bf16 ulp
        total += master.numel()
        inexact += int((master != master.to(torch.bfloat16).float()).sum())
    assert inexact > 0.9 * total, (inexact, total)


@pytest.mark.slow
def test_every_zero_stage_consolidates_to_the_same_weights(shipped_runs):
    """All runs start from the same initialisation and data. Two updates at a warm-up learning
    rate move no weight by more than ~1e-4, while a tensor put in the wrong place or a
    partition taken from the wrong rank is off by the init's scale (0.02) or more."""
    reference, _ = consolidate(shipped_runs("zero2") / "checkpoints")
    keys = sorted(set(reference) - {LM_HEAD})
    for name in ("zero0", "zero1", "zero3"):
        weights, ckpt = consolidate(shipped_runs(name) / "checkpoints")
        assert ckpt.state.step == STEPS
        assert sorted(set(weights) - {LM_HEAD}) == keys, name
        inexact = 0
        for key in keys:
            assert weights[key].dtype == torch.float32, (name, key)
            torch.testing.assert_close(weights[key], reference[key], rtol=0, atol=2e-4, msg=f"{name} {key}")
            inexact += int((weights[key] != weights[key].to(torch.bfloat16).float()).sum())
        assert inexact > 0, name  # fp32 masters, not the bf16 weights


@pytest.mark.slow
def test_fp32_stage0_exports_the_module_weights_exactly(shipped_runs, tmp_path):
    run = shipped_runs("zero0_fp32")
    module = module_states(run)
    assert all(v.dtype == torch.float32 for v in module.values())
    weights, _ = consolidate(run / "checkpoints")
    for key, value in module.items():
        assert torch.equal(weights[key], value), key

    hf_dir = tmp_path / "hf"
    export_cli(run / "checkpoints", "--out", hf_dir)
    exported = import_hf(hf_dir).state_dict()
    for key, value in module.items():
        assert torch.equal(exported[key], value), key
    ours, _ = model_from_checkpoint(run)
    hf = OpenAIGPTLMHeadModel.from_pretrained(hf_dir).eval()
    ids = random_ids(1)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_safetensors_format_reads_back_identical_weights(shipped_runs, tmp_path):
    run = shipped_runs("zero2")
    out = tmp_path / "st"
    export_cli(run / "checkpoints", "--out", out, "--format", "safetensors")
    assert sorted(p.name for p in out.iterdir()) == [
        "gpt1_config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_info.json",
    ]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert TOKENS in names and LM_HEAD not in names  # our names, the tied head stored once
    ours, _ = model_from_checkpoint(run / "checkpoints")
    assert json.loads((out / "gpt1_config.json").read_text()) == ours.config.to_dict()
    model, tokenizer = load_model(out)
    assert not model.training
    assert_same_weights(model, ours)
    assert model.lm_head.weight is model.tokens_embed.weight
    assert tokenizer == out / "tokenizer.model"


@pytest.mark.slow
def test_load_model_from_a_run_finds_its_tokenizer(shipped_runs):
    run = shipped_runs("zero2")
    reference, _ = model_from_checkpoint(run / "checkpoints")
    for source, tag in (
        (run / "checkpoints", None),
        (run, None),
        (run / "checkpoints" / TAG, None),
        (run, TAG),
    ):
        model, tokenizer = load_model(source, tag)
        assert tokenizer == run / "tokenizer.model", source
        assert not model.training
        assert_same_weights(model, reference)
        assert model.lm_head.weight is model.tokens_embed.weight


@pytest.mark.slow
def test_an_unfinished_newer_save_is_skipped(shipped_runs, tmp_path):
    ckpt = copy_checkpoints(shipped_runs("zero2"), tmp_path)
    newer = ckpt / f"step{STEPS + 1:08d}"
    shutil.copytree(ckpt / TAG, newer)
    (newer / "COMPLETE").unlink()  # as a save killed half-way leaves it
    _, found = consolidate(ckpt)
    assert found.tag == TAG
    with pytest.raises(CheckpointError, match="incomplete"):
        consolidate(ckpt, newer.name)


@pytest.mark.slow
def test_incomplete_checkpoint_is_refused(shipped_runs, tmp_path):
    ckpt = copy_checkpoints(shipped_runs("zero2"), tmp_path)
    (ckpt / TAG / "COMPLETE").unlink()
    out = export_cli(ckpt / TAG, "--out", tmp_path / "a", ok=False)
    assert "incomplete" in out.stderr and TAG in out.stderr
    out = export_cli(ckpt, "--tag", TAG, "--out", tmp_path / "b", ok=False)
    assert "incomplete" in out.stderr
    out = export_cli(ckpt, "--out", tmp_path / "c", ok=False)  # no complete tag left
    assert "no complete checkpoint" in out.stderr
    for out_dir in ("a", "b", "c"):
        assert not (tmp_path / out_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_missing_tag_is_an_error_naming_it(shipped_runs, tmp_path):
    out = export_cli(
        shipped_runs("zero2") / "checkpoints", "--tag", "step00000099", "--out", tmp_path / "hf", ok=False
    )
    assert "step00000099" in out.stderr
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("zero0", MODEL_STATES),
        ("zero1", MODEL_STATES),
        ("zero1", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        ("zero2", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        ("zero3", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        ("zero3", "zero_pp_rank_1_mp_rank_00_model_states.pt"),
    ],
)
def test_truncated_file_is_an_error_naming_it(shipped_runs, tmp_path, name, file):
    ckpt = copy_checkpoints(shipped_runs(name), tmp_path)
    assert (ckpt / TAG / file).is_file()
    truncate(ckpt / TAG / file)
    with pytest.raises(CheckpointError, match=file):
        consolidate(ckpt)


@pytest.mark.slow
def test_cli_names_a_truncated_optimizer_file(shipped_runs, tmp_path):
    ckpt = copy_checkpoints(shipped_runs("zero2"), tmp_path)
    file = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    truncate(ckpt / TAG / file)
    out = export_cli(ckpt, "--out", tmp_path / "hf", ok=False)
    assert file in out.stderr and "unreadable" in out.stderr
    assert not (tmp_path / "hf" / "model.safetensors").exists()


class Payload:
    """Unpickled, it would run a command: what a checkpoint from an untrusted source can hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "file"),
    [("zero0", MODEL_STATES), ("zero2", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")],
)
def test_a_checkpoint_holding_code_is_refused_without_running_it(shipped_runs, tmp_path, name, file):
    ckpt = copy_checkpoints(shipped_runs(name), tmp_path)
    marker = tmp_path / "ran"
    states = torch.load(ckpt / TAG / file, map_location="cpu", weights_only=False)
    states["extra"] = Payload(marker)
    torch.save(states, ckpt / TAG / file)
    with pytest.raises(
        CheckpointError, match=rf"{file}: holds posix.system, which a gpt1-ds checkpoint never"
    ):
        load_model(ckpt)
    out = export_cli(ckpt, "--out", tmp_path / "hf", ok=False)
    assert "not unpickled" in out.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_checkpoint_whose_head_differs_from_the_table_is_refused(shipped_runs, tmp_path):
    ckpt = copy_checkpoints(shipped_runs("zero0_fp32"), tmp_path)
    path = ckpt / TAG / MODEL_STATES
    states = torch.load(path, map_location="cpu", weights_only=False)
    states["module"][LM_HEAD] = states["module"][TOKENS].clone() + 1e-3
    torch.save(states, path)
    with pytest.raises(CheckpointError, match="differs"):
        model_from_checkpoint(ckpt)
    out = export_cli(ckpt, "--out", tmp_path / "hf", ok=False)
    assert LM_HEAD in out.stderr


@pytest.mark.slow
def test_pipeline_continues_a_prompt_as_gpt1_ds_generate_does(shipped_runs, tmp_path):
    run = shipped_runs("zero2")
    hf_dir = tmp_path / "hf"
    export_cli(run / "checkpoints", "--out", hf_dir)
    prompts = ["It was", "The ship\nsailed"]
    args = [a for p in prompts for a in ("--prompt", p)] + ["--temperature", "0", "--max-new-tokens", "24"]
    ours = subprocess.run(
        [sys.executable, "-m", "gpt1_ds.generate", hf_dir, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    texts = [part.split("\n", 1)[1].removesuffix("\n") for part in ours.stdout.split("--- [")[1:]]
    generator = transformers.pipeline("text-generation", model=str(hf_dir), device="cpu")
    for prompt, expected in zip(prompts, texts, strict=True):
        (got,) = generator(prompt, max_new_tokens=24, do_sample=False)
        assert got["generated_text"] == expected
        assert len(expected) > len(prompt) + 10  # it did continue
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.generation_config.eos_token_id == load_tokenizer(hf_dir / "tokenizer.model").eod_id


@pytest.mark.slow
def test_an_export_made_before_the_hf_tokenizer_still_loads(shipped_runs, tmp_path):
    """Older exports and runs hold gpt1-ds's tokenizer metadata as tokenizer.json."""
    run = shipped_runs("zero2")
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    (old / "tokenizer_info.json").rename(old / "tokenizer.json")
    hf_dir = tmp_path / "hf"
    export_cli(old / "checkpoints", "--out", hf_dir)
    assert (
        json.loads((hf_dir / "tokenizer_info.json").read_text())["sha256"]
        == load_tokenizer(old / "tokenizer.model").sha256
    )
    assert json.loads((hf_dir / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    # An old export: our metadata under tokenizer.json, no HF tokenizer files.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (hf_dir / name).unlink()
    (hf_dir / "tokenizer_info.json").rename(hf_dir / "tokenizer.json")
    model, tokenizer = load_model(hf_dir)
    assert tokenizer == hf_dir / "tokenizer.model"
    assert_same_weights(model, model_from_checkpoint(run / "checkpoints")[0])


@pytest.mark.slow
def test_a_padded_table_trains_and_exports_without_its_padding_rows(shipped_runs, prepared, tmp_path):
    run = shipped_runs("zero2_padded")
    assert module_states(run)[TOKENS].shape[0] == 2048  # VOCAB rounded up to 64 in training
    ours, _ = model_from_checkpoint(run / "checkpoints")
    assert ours.config.vocab_multiple == 64 and not ours.tokens_embed.weight[VOCAB:].any()
    export_cli(run / "checkpoints", "--out", tmp_path / "hf")
    hf = OpenAIGPTLMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.transformer.tokens_embed.weight.shape[0] == VOCAB
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)
    export_cli(run / "checkpoints", "--out", tmp_path / "st", "--format", "safetensors")
    again, _ = load_model(tmp_path / "st")
    assert again.tokens_embed.weight.shape[0] == VOCAB and again.config.vocab_multiple == 1
    # Resuming with another table layout is refused, naming the setting.
    resumed = shutil.copytree(run, tmp_path / "resumed")
    out = train(prepared, resumed, f"max_steps={STEPS + 1}", port=free_port(), check=False)
    assert out.returncode != 0 and "vocab_multiple" in out.stderr, out.stderr[-3000:]
    assert out.returncode == 2 and "Traceback" not in out.stderr  # the reason only


@pytest.mark.slow
def test_out_holding_a_users_files_is_refused_an_earlier_export_replaced_and_exports_are_the_same_bytes(
    shipped_runs, tmp_path
):
    """Nothing of the user's is overwritten unasked: a folder with their files is refused before the
    checkpoint is read (in one line naming --force), an earlier export is replaced, a failed export
    leaves --out as it was, and two exports of one checkpoint are identical, file for file."""
    ckpt = shipped_runs("zero2") / "checkpoints"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes\n")
    (mine / "config.json").write_text('{"mine": true}\n')
    out = export_cli(ckpt, "--out", mine, ok=False)
    assert (
        "holds files that are not an export of gpt1-ds (README.md" in out.stderr and "--force" in out.stderr
    )
    assert (mine / "README.md").read_text() == "my notes\n" and (
        mine / "config.json"
    ).read_text() == '{"mine": true}\n'

    a, b = tmp_path / "a", tmp_path / "b"
    export_cli(ckpt, "--out", a)
    export_cli(ckpt, "--out", b)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files), files

    before = {f: (a / f).read_bytes() for f in files}
    export_cli(ckpt, "--out", a)  # an earlier export: replaced, no --force needed
    assert {f: (a / f).read_bytes() for f in files} == before
    out = export_cli(ckpt, "--tag", "step00000099", "--out", a, ok=False)  # fails: a stays as it was
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "mine"]  # no temporary left

    (a / "notes.txt").write_text("mine too\n")  # the user's file in an export: refused again
    assert "notes.txt" in export_cli(ckpt, "--out", a, ok=False).stderr
    export_cli(ckpt, "--out", mine, "--force")
    assert (
        not (mine / "config.json").read_text().startswith('{"mine"')
        and (mine / "model.safetensors").is_file()
    )
