"""Training curves of one or more runs in one PNG.

    python -m gpt1_ds.plot RUN [RUN ...] --out curves.png [--labels A B ...] [--csv curves.csv]

Reads the TensorBoard scalars a run wrote (``RUN/tensorboard``; RUN or its ``tensorboard``
directory may be given) and draws four panels, runs overlaid: loss (train and val), perplexity
(train and val, log scale), learning rate and throughput (tokens/s), each against the optimiser
step; and, where ``gpt1_ds.evaluate --all-checkpoints`` wrote them, zero-shot SST-2 accuracy and
held-out bits per byte against the step of each checkpoint. Runs are named in the legend by their
directory, or by ``--labels``. ``--csv`` also writes the plotted series, one ``run,tag,step,value``
row per point.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt1_ds.checkpoint import RunDir

log = logging.getLogger("gpt1_ds.plot")


class Panel(NamedTuple):
    title: str
    tags: tuple[str, ...]
    ylabel: str
    log_scale: bool = False


PANELS = (
    Panel("loss", ("train/loss", "val/loss"), "cross-entropy (nats)"),
    Panel("perplexity", ("train/ppl", "val/ppl"), "perplexity", log_scale=True),
    Panel("learning rate", ("train/lr",), "learning rate"),
    Panel("throughput", ("train/tokens_per_sec",), "tokens/s"),
)
EVAL_PANELS = (
    Panel(
        "zero-shot (GPT-1 §5)",
        ("zero_shot/sst2_acc", "zero_shot/cola_matthews", "zero_shot/race_acc", "zero_shot/storycloze_acc"),
        "accuracy (CoLA: Matthews)",
    ),
    Panel("held-out text", ("text/bits_per_byte",), "bits per byte"),
)
"""Drawn when a run has them: ``gpt1_ds.evaluate --all-checkpoints`` writes them per checkpoint."""
# Line style by the part of the tag before the slash: train solid, val dashed with markers.
STYLES = {"train": {"linestyle": "-"}, "val": {"linestyle": "--", "marker": "o", "markersize": 3}}


class Plotted(NamedTuple):
    path: Path
    csv: Path | None
    figure: Figure


def event_dir(run: Path) -> Path:
    """The directory holding the run's event files: ``RUN/tensorboard`` or RUN itself."""
    for d in (RunDir(run).tensorboard, run):
        if d.is_dir() and any(d.glob("events.out.tfevents.*")):
            return d
    raise FileNotFoundError(f"no TensorBoard event files in {run / 'tensorboard'} or {run}")


def scalar_events(run: Path) -> dict[str, list[Any]]:
    """Every scalar series of a run, by tag, as TensorBoard events (step, value, wall time); events
    purged on resume are left out."""
    acc = EventAccumulator(str(event_dir(run)), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def load_scalars(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar series of a run, by tag, as (steps, values)."""
    return {
        tag: ([e.step for e in events], [e.value for e in events])
        for tag, events in scalar_events(run).items()
    }


def run_label(run: Path) -> str:
    """A run's name in the legend: its directory (the parent of a ``tensorboard`` directory)."""
    run = run.resolve()
    return run.parent.name if run == RunDir(run.parent).tensorboard else run.name


def plot(
    runs: list[Path], out: Path, labels: list[str] | None = None, csv_path: Path | None = None
) -> Plotted:
    """Draws the panels for ``runs``, writes ``out`` (PNG) and optionally ``csv_path``."""
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    names = labels or [run_label(r) for r in runs]
    if labels is None and len(set(names)) < len(names):
        names = [str(r) for r in runs]
    data = {name: load_scalars(run) for name, run in zip(names, runs, strict=True)}

    extra = [p for p in EVAL_PANELS if any(t in series for series in data.values() for t in p.tags)]
    panels = (*PANELS, *extra)
    columns = 2 if not extra else 3
    fig = Figure(figsize=(6 * columns, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, columns).flatten()
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    for ax, panel in zip(axes, panels, strict=False):
        one_kind = len({t.split("/", 1)[0] for t in panel.tags}) == 1  # then a line is named by its series
        for i, name in enumerate(names):
            for tag in (t for t in panel.tags if t in data[name]):
                steps, values = data[name][tag]
                kind, series = tag.split("/", 1)
                label = f"{name} ({series if one_kind else kind})" if len(panel.tags) > 1 else name
                ax.plot(steps, values, color=f"C{i % 10}", label=label, **STYLES.get(kind, {}))
        ax.set(title=panel.title, xlabel="step", ylabel=panel.ylabel)
        ax.grid(True, alpha=0.3)
        if not ax.get_lines():
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        if panel.log_scale:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    log.info("wrote %s (%d run(s): %s)", out, len(names), ", ".join(names))

    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["run", "tag", "step", "value"])
            for name in names:
                for tag in (t for p in panels for t in p.tags if t in data[name]):
                    writer.writerows((name, tag, s, v) for s, v in zip(*data[name][tag], strict=True))
        log.info("wrote %s", csv_path)
    return Plotted(out, csv_path, fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpt1_ds.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directory or its tensorboard/")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write")
    parser.add_argument("--labels", nargs="+", help="legend names, one per RUN (default: directory names)")
    parser.add_argument("--csv", type=Path, help="also write the plotted series here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its directory watcher is chatty
    try:
        plot(args.runs, args.out, args.labels, args.csv)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
