"""What every benchmark script shares: its result as data, printed as markdown and written as JSON.

A result is ``{"benchmark", "title", "command", "device", "torch", "date", "quick",
"tables", "notes"}``; a table is ``{"title", "columns", "formats", "rows"}``, its
rows holding the raw numbers (``None`` for an empty cell) and ``formats`` one
``str.format`` template per column that turns a number into its markdown cell.
``benchmarks/run_all.py`` renders the JSON of every script with the same functions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import TypedDict

Cell = str | int | float | None


class Table(TypedDict):
    title: str
    columns: list[str]
    formats: list[str]
    rows: list[list[Cell]]


class Result(TypedDict):
    benchmark: str
    title: str
    command: list[str]
    device: str
    torch: str
    date: str
    quick: bool
    tables: list[Table]
    notes: list[str]


def table(title: str, columns: dict[str, str], rows: list[list[Cell]] | None = None) -> Table:
    """A table; ``columns`` maps each column name to its cell template (``"{}"`` for labels)."""
    return {"title": title, "columns": list(columns), "formats": list(columns.values()), "rows": rows or []}


def result(
    benchmark: str, title: str, device: str, tables: list[Table], notes: list[str], quick: bool = False
) -> Result:
    """The result of the running script, with the command line that produced it (without ``--json``)."""
    argv = sys.argv[1:]
    if "--json" in argv:
        i = argv.index("--json")
        argv = argv[:i] + argv[i + 2 :]
    return {
        "benchmark": benchmark,
        "title": title,
        "command": ["python", f"benchmarks/{Path(sys.argv[0]).name}", *argv],
        "device": device,
        "torch": version("torch"),
        "date": str(date.today()),
        "quick": quick,
        "tables": tables,
        "notes": notes,
    }


def cell(value: Cell, template: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return template.format(value)


def table_markdown(t: Table) -> str:
    """The table in markdown, its title above it; columns holding numbers are right-aligned."""
    numeric = [
        any(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in t["rows"])
        for i in range(len(t["columns"]))
    ]
    lines = [
        "| " + " | ".join(t["columns"]) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    for r in t["rows"]:
        lines.append("| " + " | ".join(cell(v, f) for v, f in zip(r, t["formats"], strict=True)) + " |")
    return (f"{t['title']}:\n\n" if t["title"] else "") + "\n".join(lines)


def result_markdown(r: Result, level: int = 3) -> str:
    """Heading, tables and notes of one benchmark."""
    script = Path(r["command"][1]).name if len(r["command"]) > 1 else r["benchmark"]
    parts = [
        f"{'#' * level} {r['title']} (`{script}`)",
        f"`{' '.join(r['command'])}` on {r['device']}; torch {r['torch']}; {r['date']}.",
    ]
    if r["quick"]:
        parts.append(
            "Quick settings (`--quick`): tiny sizes and few steps, a check that it runs, not a measurement."
        )
    parts += [table_markdown(t) for t in r["tables"]]
    parts += r["notes"]
    return "\n\n".join(parts)


def emit(r: Result, json_path: Path | None) -> None:
    """Prints the result as markdown; writes it as JSON to ``json_path`` if given."""
    print(f"\n{result_markdown(r)}\n")
    if json_path is not None:
        json_path.write_text(json.dumps(r, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def parse_args(parser: argparse.ArgumentParser, quick: dict[str, object]) -> argparse.Namespace:
    """Adds ``--json`` and ``--quick`` (``quick``: the defaults it sets; explicit options still win)."""
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and few steps: checks that it runs, in seconds"
    )
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args()
