"""Runs the benchmarks and writes benchmarks/results.json and this machine's section of RESULTS.md.

    python benchmarks/run_all.py                                  # every benchmark (`make bench`)
    python benchmarks/run_all.py --only model,loader --quick      # some, with tiny sizes
    python benchmarks/run_all.py --corpus DIR --list FILE         # the books bench_prep reads
    python benchmarks/run_all.py --out-dir DIR                    # write DIR/RESULTS.md, DIR/results.json
    python benchmarks/run_all.py --only train --args "train=--presets gpt1 --batch 16"  # a script's own flags

Each benchmark script runs in a process of its own with ``--json`` (its tables and
notes, ``benchmarks/benchlib.py``). The machine (CPU model, cores, memory, GPUs and
driver; torch, CUDA, DeepSpeed and Python versions; no host name) gives a key,
e.g. ``cpu-amd-epyc-2c`` or ``gpu-1x-nvidia-h100-80gb-hbm3-16c``. ``results.json``
holds every machine's latest result of each benchmark; a run replaces the results
of the benchmarks it ran on its machine and keeps the rest. In ``RESULTS.md`` the
machine's section lies between ``<!-- bench:KEY -->`` and ``<!-- /bench:KEY -->``
and is rewritten from ``results.json``; everything outside the markers (other
machines, hand-written text) is kept. A new section goes after the last
generated one, or before the first hand-written section. Exit status 1 when a
benchmark failed (its earlier result, if any, stays; nothing is written when
none succeeded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import benchlib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCHMARKS = {
    "model": "bench_model.py",
    "loader": "bench_loader.py",
    "train": "bench_train.py",
    "step": "bench_step.py",
    "prep": "bench_prep.py",
    "finetune": "bench_finetune.py",
}
INTRO = """# Benchmark results

`make bench` (`benchmarks/run_all.py`) writes one section per machine, between
two HTML comments `bench:KEY` and `/bench:KEY`; `results.json` holds the same figures.
"""


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def machine_info() -> dict[str, Any]:
    """What the figures depend on, without the host's name."""
    import psutil
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    return {
        "cpu": benchlib.cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "driver": nvidia_driver() if gpus else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "deepspeed": package_version("deepspeed"),
        "python": platform.python_version(),
        "date": str(date.today()),
    }


def machine_key(info: dict[str, Any]) -> str:
    """``gpu-<count>x-<model>-<cores>c`` on a GPU machine, ``cpu-<model>-<cores>c`` otherwise."""
    if info["gpus"]:
        names = sorted({g["name"] for g in info["gpus"]})
        name = f"gpu-{len(info['gpus'])}x-{'-'.join(names)}"
    else:
        name = f"cpu-{info['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", f"{name}-{info['cores']}c".lower()).strip("-")


def machine_summary(info: dict[str, Any]) -> str:
    """One line: e.g. ``CPU: AMD EPYC, 2 cores, 24 GiB; torch 2.13.0+cpu, DeepSpeed 0.19.8``."""
    host = f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']:.0f} GiB"
    software = f"torch {info['torch']}" + (f" (CUDA {info['cuda']})" if info["gpus"] else "")
    software += f", DeepSpeed {info['deepspeed']}" if info["deepspeed"] else ""
    if not info["gpus"]:
        return f"CPU: {host}; {software}"
    names: dict[str, int] = {}
    for g in info["gpus"]:
        names[g["name"]] = names.get(g["name"], 0) + 1
    gpus = ", ".join(f"{n} × {name}" for name, n in names.items())
    driver = f" (driver {info['driver']})" if info["driver"] else ""
    return f"GPU: {gpus}{driver}; {host}; {software}"


def run_benchmark(name: str, args: argparse.Namespace, scratch: Path) -> benchlib.Result | None:
    """Runs one script with ``--json``; its result, or None if it failed."""
    out = scratch / f"{name}.json"
    cmd = [sys.executable, str(HERE / BENCHMARKS[name]), "--json", str(out)]
    if args.quick:
        cmd.append("--quick")
    for given in args.args:
        target, _, extra = given.partition("=")
        cmd += shlex.split(extra) if target == name else []
    if name == "prep":
        cmd += ["--corpus", args.corpus] if args.corpus else []
        cmd += ["--list", args.list] if args.list else []
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0 or not out.exists():
        print(f"== {name} failed (exit {proc.returncode})", file=sys.stderr, flush=True)
        return None
    return json.loads(out.read_text(encoding="utf-8"))


def section(key: str, machine: dict[str, Any], results: dict[str, benchlib.Result]) -> str:
    """The machine's section of RESULTS.md, markers included."""
    parts = [
        f"<!-- bench:{key} -->",
        f"## {machine_summary(machine)} ({machine['date']})",
        "Written by `benchmarks/run_all.py`; ratios compare against a baseline measured in the same run.",
    ]
    parts += [benchlib.result_markdown(results[n]) for n in BENCHMARKS if n in results]
    parts.append(f"<!-- /bench:{key} -->")
    return "\n\n".join(parts)


def replace_section(text: str, key: str, new: str) -> str:
    """``text`` with the section of ``key`` replaced by ``new``, or ``new`` inserted."""
    block = re.compile(rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->", re.DOTALL)
    if block.search(text):
        return block.sub(lambda _: new, text, count=1)
    ends = list(re.finditer(r"<!-- /bench:[^>]*-->\n?", text))
    heading = re.search(r"^## ", text, re.MULTILINE)
    if ends:
        at = ends[-1].end()
    elif heading:
        at = heading.start()
    else:
        at = len(text)
    before, after = text[:at].rstrip("\n"), text[at:].lstrip("\n")
    return f"{before}\n\n{new}\n" + (f"\n{after}" if after else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--quick", action="store_true", help="pass --quick: tiny sizes and few steps")
    parser.add_argument("--corpus", help="directory of books for bench_prep (default: data/sample)")
    parser.add_argument("--list", help="file naming the books bench_prep takes from --corpus")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where RESULTS.md and results.json are")
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help='more arguments for one benchmark, e.g. "train=--presets gpt1 --batch 16"',
    )
    args = parser.parse_args()
    if bad := [a for a in args.args if a.partition("=")[0] not in BENCHMARKS]:
        parser.error(f"--args {bad[0]!r}: NAME=ARGS with NAME one of {', '.join(BENCHMARKS)}")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown or not names:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    with tempfile.TemporaryDirectory(prefix="bench_") as scratch:
        ran = {n: run_benchmark(n, args, Path(scratch)) for n in BENCHMARKS if n in names}
    # After the runs: reading the GPUs' properties opens a CUDA context, which would hold memory.
    machine = machine_info()
    key = machine_key(machine)
    done = {n: r for n, r in ran.items() if r is not None}
    failed = [n for n, r in ran.items() if r is None]
    if failed:
        print(f"== failed: {', '.join(failed)}", file=sys.stderr)
    if not done:
        return 1

    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out_dir / "results.json", args.out_dir / "RESULTS.md"
    store = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else {"machines": {}}
    entry = store["machines"].setdefault(key, {"machine": machine, "benchmarks": {}})
    entry["machine"] = machine
    entry["benchmarks"].update(done)
    json_path.write_text(json.dumps(store, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    text = md_path.read_text(encoding="utf-8") if md_path.exists() else INTRO
    md_path.write_text(
        replace_section(text, key, section(key, machine, entry["benchmarks"])), encoding="utf-8"
    )
    print(f"== {machine_summary(machine)}")
    print(f"== wrote {md_path} and {json_path} (section {key}, new: {', '.join(done)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
