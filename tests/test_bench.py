"""benchmarks/run_all.py: real benchmark processes (quick settings), results.json and RESULTS.md sections."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

BENCH = REPO / "benchmarks"
OTHER_KEY = "gpu-8x-some-gpu-64c"
OTHER_SECTION = (
    f"<!-- bench:{OTHER_KEY} -->\n## GPU: 8 × Some GPU (2020-01-01)\n\nkept as it is\n\n"
    f"<!-- /bench:{OTHER_KEY} -->\n"
)


HAND_WRITTEN = (
    "# Benchmark results\n\nWhat each table measures.\n\n## CPU: a hand-written section (2026-01-01)\n\n"
    "| measure | value |\n|---|---:|\n| clean | 12.4 |\n"
)


def load_run_all():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def run_all(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def markers(text: str) -> list[str]:
    return re.findall(r"<!-- (/?bench:[^ ]+) -->", text)


def squeeze(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.mark.slow
def test_quick_model_run_writes_json_and_replaces_its_section(tmp_path: Path) -> None:
    """One run: this machine's stale section (between another machine's and nothing) is replaced in
    place, everything else kept (where a new section goes: the next test)."""
    key = (run_all_module := load_run_all()).machine_key(run_all_module.machine_info())
    stale = f"<!-- bench:{key} -->\n## CPU: STALE (2020-01-01)\n\n| STALE |\n<!-- /bench:{key} -->\n"
    original = HAND_WRITTEN + "\n" + OTHER_SECTION + "\n" + stale
    (tmp_path / "RESULTS.md").write_text(original, encoding="utf-8")
    other = {"machine": {"cpu": "elsewhere"}, "benchmarks": {"model": {"benchmark": "model"}}}
    (tmp_path / "results.json").write_text(json.dumps({"machines": {OTHER_KEY: other}}))

    out = run_all("--quick", "--only", "model", "--out-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    store = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert store["machines"][OTHER_KEY] == other
    assert set(store["machines"]) == {OTHER_KEY, key}
    entry = store["machines"][key]
    machine = entry["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0 and machine["cpu"]
    assert machine["torch"] == torch.__version__
    assert machine["python"] == platform.python_version()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", machine["date"])
    assert len(machine["gpus"]) == torch.cuda.device_count()
    assert key.startswith("gpu-" if machine["gpus"] else "cpu-") and key.endswith(f"-{machine['cores']}c")
    node = platform.node()
    if len(node) >= 4:
        assert node not in json.dumps(store)

    assert list(entry["benchmarks"]) == ["model"]
    result = entry["benchmarks"]["model"]
    assert result["quick"] is True
    assert result["command"] == ["python", "benchmarks/bench_model.py", "--quick"]
    [table] = result["tables"]
    assert len(table["formats"]) == len(table["columns"])
    col = {c: i for i, c in enumerate(table["columns"])}
    assert table["rows"], table
    for row in table["rows"]:
        ours, hf, ratio = (row[col[c]] for c in ("gpt1-ds tokens/s", "HF tokens/s", "gpt1-ds / HF"))
        assert all(isinstance(v, float) and v > 0 for v in (ours, hf, ratio))
        assert abs(ratio - ours / hf) < 1e-9 * ratio

    md = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    assert markers(md) == [f"bench:{OTHER_KEY}", f"/bench:{OTHER_KEY}", f"bench:{key}", f"/bench:{key}"]
    section = md[md.index(f"<!-- bench:{key} -->") : md.index(f"<!-- /bench:{key} -->")]
    assert "STALE" not in md and "| tiny |" in section
    assert re.search(r"^## (CPU|GPU): .*\(\d{4}-\d\d-\d\d\)$", section, re.MULTILINE)
    assert "| model | dtype | batch × T | gpt1-ds tokens/s |" in section
    assert "`python benchmarks/bench_model.py --quick`" in section
    # Everything outside this machine's section is the file as it was.
    outside = re.compile(rf"<!-- bench:{key} -->.*<!-- /bench:{key} -->", re.S)
    assert squeeze(outside.sub("", md)) == squeeze(outside.sub("", original))


def test_a_new_section_goes_before_the_first_hand_written_one() -> None:
    replace_section = load_run_all().replace_section
    head, hand = "# Results\n\nintro\n", "## By hand\n\n| a |\n"
    a, b = (f"<!-- bench:cpu-x-2c -->\n{x}\n<!-- /bench:cpu-x-2c -->" for x in "AB")
    new = replace_section(head + "\n" + hand, "cpu-x-2c", a)
    assert new == f"{head}\n{a}\n\n{hand}"
    assert replace_section(new, "cpu-x-2c", b) == f"{head}\n{b}\n\n{hand}"
    assert replace_section(head, "cpu-x-2c", a) == f"{head}\n{a}\n"


def test_machine_key_names_the_gpu_or_the_cpu_and_the_cores() -> None:
    run_all_module = load_run_all()
    cpu = {"cpu": "AMD EPYC 7B13 64-Core Processor", "cores": 16, "gpus": []}
    assert run_all_module.machine_key(cpu) == "cpu-amd-epyc-7b13-64-core-processor-16c"
    gpu = {**cpu, "gpus": [{"name": "NVIDIA H100 80GB HBM3"}] * 2}
    assert run_all_module.machine_key(gpu) == "gpu-2x-nvidia-h100-80gb-hbm3-16c"


@pytest.mark.slow
def test_loader_quick_json_holds_numeric_rows(tmp_path: Path) -> None:
    out_json = tmp_path / "loader.json"
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_loader.py"), "--quick", "--json", str(out_json)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_json.read_text(encoding="utf-8"))
    assert result["benchmark"] == "loader" and result["notes"]
    rates, checks, alone, resume = result["tables"]
    assert [r[:2] for r in rates["rows"]] == [
        [name, w] for w in (0, 1) for name in ("gpt1-ds TrainLoader", "plain webdataset.WebDataset")
    ]
    assert all(r[2] > 0 and r[3] == r[2] for r in rates["rows"])  # 0 and 1 worker: per worker = total
    assert [r[0] for r in checks["rows"]] == [0, 1]
    assert all(r[1] > 0 and r[2] > 0 and r[3] == pytest.approx(1 - r[1] / r[2]) for r in checks["rows"])
    assert [r[0] for r in alone["rows"]] == [0, 1] and all(0 < r[3] < 1 for r in alone["rows"])
    assert [r[0] for r in resume["rows"]] == ["fresh start", "resume mid-epoch"] * 2
    assert all(r[2] >= 0 for r in resume["rows"])
    # What it printed is what it wrote.
    assert "| gpt1-ds TrainLoader | 0 |" in out.stdout
    assert f"{rates['rows'][0][2]:.1f}" in out.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_returns_few_files(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh --dry-run: the GPU machine's script, each step on this CPU with tiny
    sizes, so that it cannot rot between the sessions that have a GPU."""
    out = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == [
        "env",
        "fused_adam",
        "cuda_tests",
        "bench_train",
        "train",
    ]
    assert all(": exit 0 in " in line for line in summary), summary
    assert "torch" in (tmp_path / "env.txt").read_text()
    tests = (tmp_path / "cuda_tests.txt").read_text()
    assert re.search(r"\b[1-9]\d* skipped", tests) and "passed" not in tests  # no GPU: none counted
    store = json.loads((tmp_path / "results.json").read_text())
    # This run's figures: the quick ones (the copied store holds other machines' measurements).
    [ran] = [
        m["benchmarks"] for m in store["machines"].values() if m["benchmarks"].get("step", {}).get("quick")
    ]
    assert {"train", "step"} <= set(ran) and ran["train"]["quick"]
    # The host table: gpt1_ds.train as launched against the plain loop, timed, its syncs counted.
    step = ran["step"]
    host = {r[0]: dict(zip(step["tables"][0]["columns"], r, strict=True)) for r in step["tables"][0]["rows"]}
    assert set(host) == {"plain@1", "train:zero1@1"}
    assert all(r["ms/step"] > 0 for r in host.values())
    train = host["train:zero1@1"]
    assert train["vs plain/DDP"] > 0 and train["loop's clock"] > 0 and train["collectives/step"] >= 1
    assert train["syncs/step"] >= 1  # DeepSpeed's gradient clipping reads the norm on the host
    assert host["plain@1"]["syncs/step"] == 0
    assert all(0 < r["start-up (s)"] < 300 for r in host.values())  # which starts sooner: the figures' to say
    train_log = (tmp_path / "train.txt").read_text()
    assert "done: 20 steps" in train_log and re.search(r"step 20/20 \| .* ms/step", train_log)
    assert len(list(tmp_path.iterdir())) <= 8  # what the GPU machine sends back


COUNTED = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import hostcount
counter = hostcount.Counter().install()
import torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)

def step(t):
    dist.all_reduce(t)
    if t.sum() > 0:  # a read: a synchronisation on a GPU
        t.item()

t = torch.ones(())
before = counter.snapshot()
for _ in range(5):
    step(t)
print(json.dumps(hostcount.per_step(before, counter.snapshot(), 5)))
"""


def test_hostcount_counts_reads_and_collectives_per_step_by_site(tmp_path: Path) -> None:
    """The host benchmark's counter, in a process of its own (it patches torch): per step, the two
    reads (bool() of a comparison, .item()) and the all-reduce, each named with where it came from."""
    from gpt1_ds.env import free_port

    script = tmp_path / "counted.py"
    script.write_text(COUNTED)
    out = subprocess.run(
        [sys.executable, str(script), str(BENCH), str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout.splitlines()[-1])
    assert counts["reads"] == 2 and counts["collectives"] == 1 and counts["cuda_syncs"] == 0
    assert counts["reads_by_site"] == {
        "__bool__@" + str(script) + ":step": 1,
        "item@" + str(script) + ":step": 1,
    }
    assert list(counts["collectives_by_site"]) == ["all_reduce@" + str(script) + ":step"]
