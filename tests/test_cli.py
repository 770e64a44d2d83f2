"""gpt1_ds.cli: one command, every verb listed, a verb run as its module, one table of exit codes."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from conftest import REPO

from gpt1_ds import runner, watchdog
from gpt1_ds.cli import EXIT_CODES, VERBS, summary


def gpt1_ds(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpt1_ds", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_the_command_alone_lists_every_verb_and_exit_code_without_loading_torch():
    out = gpt1_ds()
    assert out.returncode == 0, out.stderr
    for verb, module in VERBS.items():
        line = next(x for x in out.stdout.splitlines() if x.split()[:1] == [verb])
        assert summary(module) in line and len(summary(module)) > 10, verb
    for code in EXIT_CODES:
        assert re.search(rf"^ +{code}  ", out.stdout, re.M), code
    probe = "import sys; from gpt1_ds import cli; cli.usage(); print('torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert loaded.stdout.strip() == "False"


@pytest.mark.slow
def test_a_verb_runs_its_module_with_its_flags_and_exit_code(tmp_path):
    out = gpt1_ds("export", "--help")
    assert out.returncode == 0 and "--format {hf,safetensors}" in out.stdout
    missing = tmp_path / "nowhere"
    out = gpt1_ds("generate", str(missing), "--prompt", "The")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{missing}: no such checkpoint directory" in out.stderr
    out = gpt1_ds("prepare", "--input", str(missing), "--out", str(tmp_path / "out"))
    assert out.returncode == 2 and "matches no file or directory" in out.stderr


def test_an_unknown_verb_is_one_line_naming_the_nearest():
    out = gpt1_ds("trian")
    assert out.returncode == 2
    expected = "gpt1-ds: unknown verb 'trian'; did you mean 'train'? gpt1-ds --help lists them"
    assert out.stderr.strip() == expected


def test_the_readme_tables_and_the_codes_constants_are_the_cli_s():
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", readme, re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES
    verbs = re.findall(r"^\| `([a-z-]+)` \| `python -m ([\w.]+)` \|", readme, re.M)
    assert dict(verbs) == VERBS
    constants = {0, 1, runner.SETUP_ERROR_EXIT, runner.PREEMPTED_EXIT, watchdog.HUNG_EXIT}
    assert constants == set(EXIT_CODES)
    requeue = (REPO / "slurm" / "requeue.sh").read_text()
    for name, code in (("PREEMPTED", runner.PREEMPTED_EXIT), ("HUNG", watchdog.HUNG_EXIT)):
        assert f"\n{name}={code}\n" in requeue, name
    assert f"\nREFUSED={runner.SETUP_ERROR_EXIT}\n" in requeue


def imports_of(path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken) for every import of a source file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_the_library_imports_no_data_prep_no_private_name_and_forms_no_circle():
    """gpt1_ds is the library and data_prep the pipeline built on it: data flows one way."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "gpt1_ds").glob("*.py")):
        deps = graph.setdefault(path.stem, set())
        for module, names in imports_of(path):
            assert not module.startswith("data_prep"), f"{path.name} imports {module}"
            if module == "gpt1_ds":
                deps.update(names)
            elif module.startswith("gpt1_ds."):
                deps.add(module.split(".")[1])
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name} takes private {private} from {module}"
    graph.pop("__main__", None)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        deps = graph.get(start, set())
        return goal in deps or any(reaches(d, goal, seen | {d}) for d in deps - seen)

    circles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not circles, f"import circles through {circles}"
