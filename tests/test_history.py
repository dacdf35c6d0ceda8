"""The metric history is appended, never rewritten: a save costs the same at every epoch, and a resume takes the
history as far as its checkpoint goes."""
import csv
import io
import math
import os

import pytest
import torch

import experiment_io.storage.atomic as storage
from experiment_io import MetricTracker, SetupParams, setup_training, train_model
from experiment_io.errors import CorruptCheckpointError
from experiment_io.frontends.cli import main as cli
from experiment_io.loading.loaders import load_checkpoint, load_checkpoint_from_cwd
from experiment_io.run.payloads import LAST_NAME, METRICS_CSV_NAME
from experiment_io.storage.manifest import read_manifest

from helpers import make_database, make_training_modules

torch.set_num_threads(1)


class LostSave(BaseException):
    """Ends a save after its rows were appended, before its manifest commits it (as a kill would)."""


def _start(directory, max_epochs, database):
    torch.manual_seed(0)
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32,
                                                                                  max_epochs=max_epochs))
    return train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(directory),
                       plots=False, evaluate_best=False)


def _rows(directory):
    return list(csv.reader(io.StringIO((directory / METRICS_CSV_NAME).read_text())))


def _without_times(rows):
    return [row[:1] + row[2:] for row in rows]


def test_a_save_lost_after_its_rows_were_appended_resumes_with_the_committed_rows(tmp_path):
    database = make_database()
    reference = _start(tmp_path / "whole", 4, database)

    saves = []

    def lose_the_third_epoch(at, path):
        if at == "manifest":
            saves.append(path)
            if len(saves) == 4:  # the structure file, epochs 0 and 1, then epoch 2
                raise LostSave()

    with storage.observe_write_steps(lose_the_third_epoch), pytest.raises(LostSave):
        _start(tmp_path / "cut", 4, database)
    directory = tmp_path / "cut"
    assert len(_rows(directory)) == 1 + 3  # the third epoch's row was appended, its save never committed
    assert read_manifest(str(directory))[1][METRICS_CSV_NAME]["rows"] == 2
    assert cli(["verify", str(directory)]) == 0  # the committed part of the file verifies

    check = load_checkpoint_from_cwd(directory=str(directory), database=database)
    assert check["metric_tracker"].epochs == [0, 1]
    tracker = train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, plots=False,
                          evaluate_best=False)
    assert tracker.epochs == reference.epochs == [0, 1, 2, 3]
    assert tracker.history == reference.history  # bit for bit, as the uninterrupted run
    assert tracker.improved == reference.improved and tracker.best_epoch == reference.best_epoch
    rows = _rows(directory)
    assert [row[0] for row in rows[1:]] == ["0", "1", "2", "3"]  # the lost row is gone, none is twice
    assert _without_times(rows) == _without_times(_rows(tmp_path / "whole"))
    restored = load_checkpoint_from_cwd(directory=str(directory), database=database)["metric_tracker"]
    assert restored.history == tracker.history and restored.epoch_times == tracker.epoch_times


def test_a_checkpoint_stays_the_same_size_and_the_history_file_is_only_appended_to(tmp_path):
    database = make_database()
    _start(tmp_path, 3, database)
    early = os.path.getsize(tmp_path / LAST_NAME)
    inode = os.stat(tmp_path / METRICS_CSV_NAME).st_ino
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    check["controller"].max_epochs = 40
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, plots=False, evaluate_best=False)
    # the same size but for the zip records' 64-byte alignment: 37 more epochs of history held in it would add ~2 KB
    assert abs(os.path.getsize(tmp_path / LAST_NAME) - early) <= 128
    assert os.stat(tmp_path / METRICS_CSV_NAME).st_ino == inode  # appended to, never replaced
    assert len(_rows(tmp_path)) == 1 + 40


def test_a_damaged_history_is_reported_as_such(tmp_path):
    database = make_database()
    _start(tmp_path, 2, database)
    data = bytearray((tmp_path / METRICS_CSV_NAME).read_bytes())
    data[-5] ^= 1  # inside the committed part
    (tmp_path / METRICS_CSV_NAME).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="metric history"):
        load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    assert cli(["verify", str(tmp_path)]) == 1


def test_a_tracker_kept_out_of_its_state_comes_back_exactly():
    tracker = MetricTracker("m,1", larger_is_better=True)
    values = [0.1, float("nan"), 1e-300, -0.0, float("inf"), 1 / 3]
    for epoch, value in enumerate(values):
        tracker.register_metrics({"valid": {"m,1": value, "m_2": epoch * 0.7}, "train": {"loss": 2.0 ** -epoch}},
                                 epoch, epoch_time=None if epoch == 2 else 0.1 * epoch,
                                 learning_rates=[0.1, 0.01 * epoch] if epoch else None)
    text = tracker.to_csv()
    state = tracker.state_dict({"file": METRICS_CSV_NAME, "size": len(text), "digest": "unused"})
    assert "history" not in state and state["history_file"]["rows"] == len(values)
    restored = MetricTracker.from_state_dict(state, text)
    assert restored.epochs == tracker.epochs and restored.learning_rates == tracker.learning_rates
    assert restored.improved == tracker.improved and restored.best_epoch == tracker.best_epoch
    for split, series in tracker.history.items():
        for name, values_ in series.items():
            again = restored.history[split][name]
            assert all((math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
                       for a, b in zip(values_, again)), (split, name)
    assert [math.isnan(t) for t in restored.epoch_times] == [math.isnan(t) for t in tracker.epoch_times]
    with pytest.raises(ValueError, match="rows"):
        MetricTracker.from_state_dict(state, tracker.csv_header() + tracker.csv_rows(1))


def test_a_metric_that_appears_mid_run_leaves_the_older_checkpoints_loadable(tmp_path):
    database = make_database()
    torch.manual_seed(0)
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32,
                                                                                  max_epochs=4))

    def add_a_metric(epoch, better):
        if epoch == 1:
            tm.evaluator.evaluation_losses["max_error"] = lambda p, t: (p - t).abs().max()

    train_model(tm, database, controller, tracker, [add_a_metric], None, quiet=True, directory=str(tmp_path),
                plots=False, evaluate_best=False, store_every=1)
    header = _rows(tmp_path)[0]
    assert any("max_error" in cell for cell in header) and len(_rows(tmp_path)) == 1 + 4
    assert cli(["verify", str(tmp_path)]) == 0
    for epoch in range(4):  # each epoch's checkpoint has the history as it was saved, with its own columns
        state = load_checkpoint(str(tmp_path / "experiment_structure.pt"),
                                str(tmp_path / f"checkpoint_epoch_{epoch}.pt"), database=database)["metric_tracker"]
        assert state.epochs == list(range(epoch + 1))
        assert ("max_error" in state.history["valid"]) == (epoch >= 2)
        assert state.history["valid"]["mse"] == tracker.history["valid"]["mse"][:epoch + 1]
    assert sorted(p.name for p in tmp_path.glob("metrics*.csv")) == ["metrics.csv", "metrics.earlier-1.csv"]
