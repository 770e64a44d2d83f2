"""On a CUDA device (``pytest -m cuda``; skipped where there is none, and then not a pass):
the DeepSpeed engine with bf16 and NCCL on one rank with DeepSpeed's CUDA FusedAdam, activation
checkpointing's gradients, export of a CUDA-trained checkpoint, greedy generation equal to the
CPU's, and a few fine-tuning steps. ``benchmarks/gpu_check.sh`` runs these first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL

from gpt1_ds.env import free_port
from gpt1_ds.generate import sample
from gpt1_ds.loading import load_model
from gpt1_ds.model import GPT, GPTConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

SMALL_GPT = GPTConfig(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4, n_inner=512)


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    env_port = ["env", f"MASTER_PORT={free_port()}"]
    cmd = [*env_port, sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def cuda_run(prepared, tmp_path_factory) -> tuple[Path, str]:
    """A one-rank bf16 ZeRO-2 run on the GPU, 20 steps: its directory and its log."""
    run_dir = tmp_path_factory.mktemp("cuda") / "run"
    args = ["--deepspeed_config", "ds_configs/zero2.json", "--data", str(prepared), "--run-dir", str(run_dir)]
    # The GPU image's torch may be another release than the tested one: this run is its test.
    out = run("gpt1_ds.train", *args, *SMALL, "max_steps=20", "allow_untested_versions=true")
    return run_dir, out.stderr


def test_the_engine_trains_on_cuda_with_bf16_nccl_and_fused_adam(cuda_run):
    run_dir, log = cuda_run
    assert "1 ranks (cuda, nccl)" in log and "; bf16; optimizer FusedAdam" in log, log[-3000:]
    assert (run_dir / "checkpoints" / "step00000020" / "COMPLETE").is_file()


def test_fused_adam_is_deepspeeds_cuda_op():
    from deepspeed.ops.adam import FusedAdam

    p = torch.nn.Parameter(torch.randn(1024, device="cuda"))
    opt = FusedAdam([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    reference = torch.optim.AdamW([q := torch.nn.Parameter(before.clone())], lr=1e-3, weight_decay=0.0)
    q.grad = p.grad.clone()
    reference.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients_on_cuda():
    torch.manual_seed(0)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**SMALL_GPT.to_dict(), "activation_checkpointing": checkpointing})).cuda()
        model.eval()  # no dropout: the two passes must agree exactly up to kernel order
        x = torch.randint(0, 512, (4, 64), device="cuda")
        _, loss = model(x, x)
        loss.backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_padded_table_gives_the_same_loss_and_gradients_on_cuda_in_bf16():
    from gpt1_ds.model import with_vocab

    torch.manual_seed(0)
    plain = GPT(SMALL_GPT).cuda().eval()  # 512 + 0 rows, and 500 ids padded to 512 below
    plain = with_vocab(plain, 500)
    padded = with_vocab(plain, 500, 64)
    x = torch.randint(0, 500, (4, 64), device="cuda")
    grads = []
    for model in (plain, padded):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        grads.append((loss.item(), model.h[0].attn.c_attn.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-3)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=5e-2, atol=2e-5)  # gradients of order 1e-4
    assert not padded.tokens_embed.weight.grad[500:].any()


def test_a_cuda_checkpoint_exports_and_generates_the_cpus_greedy_tokens(cuda_run, tmp_path):
    run("gpt1_ds.export", str(cuda_run[0] / "checkpoints"), "--out", str(tmp_path / "hf"))
    model, _ = load_model(tmp_path / "hf")
    prompt = torch.tensor([[5, 17, 42, 7]])
    cpu = sample(model, prompt, 24, temperature=0)
    gpu = sample(model.cuda(), prompt.cuda(), 24, temperature=0).cpu()
    assert torch.equal(cpu, gpu)


def test_finetuning_runs_a_few_steps_on_cuda(cuda_run, tmp_path):
    out = run(
        "gpt1_ds.finetune",
        "--deepspeed_config",
        "ds_configs/finetune.json",
        "--config",
        "configs/tiny-cpu-finetune.yaml",
        "--init",
        str(cuda_run[0] / "checkpoints"),
        "--run-dir",
        str(tmp_path / "sst2"),
        "max_steps=5",
    )
    assert "1 ranks (cuda, nccl)" in out.stderr and "optimizer FusedAdam" in out.stderr
