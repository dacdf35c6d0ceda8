"""A run directory copied or moved, and a data file that moved: which data file a restart reads, and how to say."""
import logging
import os
import shutil

import pytest
import torch

from experiment_io import (Evaluator, HDF5Database, SetupParams, TrainingModules, load_checkpoint_from_cwd,
                           setup_training, train_model)
from experiment_io.errors import DatabaseRestartError, IncompatibleCheckpointError

from test_first_hour import write_data


def train(run, data):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    modules = TrainingModules(model, torch.nn.MSELoss(), Evaluator(model, {"MSE": torch.nn.MSELoss()}))
    tm, controller, tracker = setup_training(modules, SetupParams(stopping_key="MSE", batch_size=32, max_epochs=1))
    train_model(tm, HDF5Database(data, inputs=["x"], targets=["y"], seed=0), controller, tracker, None, None,
                directory=str(run), quiet=True)


def test_a_copied_run_reads_the_data_file_kept_inside_it_and_says_so(tmp_path, caplog):
    original = tmp_path / "original"
    original.mkdir()
    write_data(original / "data.h5")
    train(original, original / "data.h5")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    with caplog.at_level(logging.WARNING, logger="experiment_io"):
        check = load_checkpoint_from_cwd(directory=str(copy))
    assert check["database"].path == str(copy / "data.h5")
    said = [r for r in caplog.records if r.levelno == logging.WARNING and str(copy / "data.h5") in r.getMessage()]
    assert said and str(original / "data.h5") in said[0].getMessage()
    shutil.rmtree(original)  # the copy does not need the original at all
    check = load_checkpoint_from_cwd(directory=str(copy))
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, max_epochs=2)
    assert check["controller"].current_epoch == 2


def test_a_run_in_place_reads_its_data_file_without_a_warning(tmp_path, caplog):
    write_data(tmp_path / "data.h5")
    train(tmp_path / "run", tmp_path / "data.h5")
    with caplog.at_level(logging.WARNING, logger="experiment_io"):
        check = load_checkpoint_from_cwd(directory=str(tmp_path / "run"))
    assert check["database"].path == str(tmp_path / "data.h5")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_moved_data_file_is_one_argument_and_other_data_are_refused(tmp_path):
    write_data(tmp_path / "data.h5")
    train(tmp_path / "run", tmp_path / "data.h5")
    os.makedirs(tmp_path / "elsewhere")
    os.rename(tmp_path / "data.h5", tmp_path / "elsewhere" / "moved.h5")
    with pytest.raises(DatabaseRestartError) as info:
        load_checkpoint_from_cwd(directory=str(tmp_path / "run"))
    assert str(tmp_path / "data.h5") in str(info.value) and "data_file=" in str(info.value)
    check = load_checkpoint_from_cwd(directory=str(tmp_path / "run"), data_file=tmp_path / "elsewhere" / "moved.h5")
    assert check["database"].path == str(tmp_path / "elsewhere" / "moved.h5")
    write_data(tmp_path / "other.h5", seed=1)  # same names and sizes, other values
    with pytest.raises(IncompatibleCheckpointError):
        load_checkpoint_from_cwd(directory=str(tmp_path / "run"), data_file=tmp_path / "other.h5")


def test_a_moved_project_finds_its_data_beside_the_run_relative_to_it(tmp_path, caplog):
    project = tmp_path / "project"
    project.mkdir()
    write_data(project / "data.h5")
    train(project / "run", project / "data.h5")
    os.rename(project, tmp_path / "moved")
    with caplog.at_level(logging.WARNING, logger="experiment_io"):
        check = load_checkpoint_from_cwd(directory=str(tmp_path / "moved" / "run"))
    assert check["database"].path == str(tmp_path / "moved" / "data.h5")
    assert any(str(tmp_path / "moved" / "data.h5") in r.getMessage() for r in caplog.records)
