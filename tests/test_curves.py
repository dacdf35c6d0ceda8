"""Training curves without extra work: the learning rate in the history, metrics.csv, and PNG plots."""
import csv
import functools
import io
import os

import pytest
import torch

from experiment_io import MetricTracker, load_checkpoint_from_cwd
from experiment_io.frontends.cli import main as cli_main
from experiment_io.storage.manifest import read_manifest

from helpers import make_database, train_tiny_run

STEP = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)


@pytest.fixture(scope="module")
def curved_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("curves")
    _, controller, tracker, _ = train_tiny_run(directory, max_epochs=3, scheduler=STEP, learning_rate=0.01)
    return directory, tracker


def test_the_history_records_each_epochs_learning_rate(curved_run):
    directory, tracker = curved_run
    assert tracker.learning_rates == [[0.01], [0.005], [0.0025]]
    restored = load_checkpoint_from_cwd(directory=str(directory), database=make_database())["metric_tracker"]
    assert restored.learning_rates == tracker.learning_rates


def test_metrics_csv_has_a_row_per_epoch(curved_run):
    directory, tracker = curved_run
    record = read_manifest(str(directory))[1]["metrics.csv"]
    assert record["kind"] == "metrics"
    rows = list(csv.DictReader(io.StringIO((directory / "metrics.csv").read_text())))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert list(rows[0]) == ["epoch", "time_s", "lr", "train_loss", "valid_mse", "valid_mae", "improved"]
    assert [float(r["lr"]) for r in rows] == [0.01, 0.005, 0.0025]
    assert [float(r["valid_mse"]) for r in rows] == tracker.history["valid"]["mse"]
    improved = [r["improved"] == "1" for r in rows]
    assert improved == tracker.improved and improved[0]
    assert max(i for i, better in enumerate(improved) if better) == tracker.best_epoch  # the last improvement
    assert all(float(r["time_s"]) > 0 for r in rows)


def test_a_tracker_written_before_learning_rates_loads():
    tracker = MetricTracker("mse")
    tracker.register_metrics({"valid": {"mse": 1.0}}, 0)
    state = tracker.state_dict()
    del state["learning_rates"]
    assert MetricTracker.from_state_dict(state).learning_rates == [[]]
    assert MetricTracker.from_state_dict(state).to_csv().splitlines()[0] == "epoch,time_s,valid_mse,improved"


def test_the_curves_are_plotted_when_training_ends(curved_run):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    directory, _ = curved_run
    names = sorted(os.listdir(directory / "plots"))
    assert names == ["loss.png", "mae.png", "mse.png"]
    image = matplotlib.image.imread(directory / "plots" / "mse.png")
    assert image.shape[:2] == (600, 700)  # 7 x 6 inches at 100 dpi: the metric and the learning rate panel


def test_plotting_leaves_matplotlibs_backend_alone(curved_run, tmp_path):
    """A notebook's inline backend stays: the curves are drawn on Figures, without pyplot."""
    matplotlib = pytest.importorskip("matplotlib")
    from experiment_io.training.plots import plot_history

    _, tracker = curved_run
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert plot_history(tracker, str(tmp_path / "plots"))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)


def test_experiment_io_plot_writes_them_on_demand(curved_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    directory, _ = curved_run
    assert cli_main(["plot", str(directory), "--out", str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["loss.png", "mae.png", "mse.png"]
    assert "3 plot(s) of 3 epochs" in capsys.readouterr().out
    import experiment_io.training.plots
    monkeypatch.setattr(experiment_io.training.plots, "plotting_available", lambda: False)
    assert cli_main(["plot", str(directory)]) == 1
    assert "pip install 'experiment_io[plots]'" in capsys.readouterr().err
