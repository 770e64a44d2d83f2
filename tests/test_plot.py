"""gpt1_ds.plot: curves drawn from the event files of a real short training run."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, scalars, train
from matplotlib.image import imread

from gpt1_ds.plot import PANELS, plot

pytestmark = pytest.mark.slow  # the module's fixture trains a run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six steps of the small model, train scalars every step, validation at 0, 3 and 6."""
    run_dir = tmp_path_factory.mktemp("plot") / "run"
    train(prepared, run_dir, "max_steps=6", "log_interval=1", "eval_interval=3", launcher="python")
    return run_dir


def lines(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_two_runs_give_one_png_with_the_four_panels(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs" / "curves.png"
    table = tmp_path / "curves.csv"
    # The same run given as RUN and as RUN/tensorboard, told apart by labels.
    result = plot([run, run / "tensorboard"], out, labels=["a", "b"], csv_path=table)

    assert result.path == out
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 300 and image.shape[2] in (3, 4)
    axes = result.figure.axes
    assert [ax.get_title() for ax in axes] == ["loss", "perplexity", "learning rate", "throughput"]
    assert axes[1].get_yscale() == "log"

    loss = lines(axes[0])
    assert set(loss) == {"a (train)", "a (val)", "b (train)", "b (val)"}
    assert loss["a (train)"][0] == [1, 2, 3, 4, 5, 6]
    assert loss["a (val)"][0] == [0, 3, 6]
    assert loss["b (val)"] == loss["a (val)"]
    val = scalars(run, "val/loss")
    assert loss["a (val)"][1] == pytest.approx([val[s] for s in (0, 3, 6)])
    assert set(lines(axes[1])) == {"a (train)", "a (val)", "b (train)", "b (val)"}
    for ax, tag in ((axes[2], "train/lr"), (axes[3], "train/tokens_per_sec")):
        series = lines(ax)
        assert set(series) == {"a", "b"}
        assert series["a"][1] == pytest.approx([v for _, v in sorted(scalars(run, tag).items())])
        assert max(series["a"][1]) > 0

    with table.open() as f:
        rows = list(csv.DictReader(f))
    tags = [t for p in PANELS for t in p.tags]
    assert {(r["run"], r["tag"]) for r in rows} == {(n, t) for n in "ab" for t in tags}
    assert len(rows) == 2 * (4 * 6 + 2 * 3)  # per run: 4 train tags × 6 steps, 2 val tags × 3 evaluations
    lr = {int(r["step"]): float(r["value"]) for r in rows if r["run"] == "a" and r["tag"] == "train/lr"}
    assert lr == pytest.approx(scalars(run, "train/lr"))


def test_command_line_names_runs_by_directory_and_logs_the_file(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    result = subprocess.run(
        [sys.executable, "-m", "gpt1_ds.plot", str(run / "tensorboard"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert f"wrote {out} (1 run(s): run)" in result.stderr


def test_a_run_without_event_files_is_named_in_the_error(run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "never_trained"
    (empty / "tensorboard").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="never_trained"):
        plot([run, empty], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

    result = subprocess.run(
        [sys.executable, "-m", "gpt1_ds.plot", str(empty), "--out", str(tmp_path / "y.png")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"no TensorBoard event files in {empty / 'tensorboard'}" in result.stderr
    assert not (tmp_path / "y.png").exists()


def test_labels_must_match_the_runs(run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot([run, run], tmp_path / "x.png", labels=["only"])
