"""Bad input to the public loaders: a clear error of the library's hierarchy, and no file changed."""
import logging
import os
import shutil

import numpy as np
import pytest
import torch

import helpers
from experiment_io import NPZDatabase, train_model
from experiment_io.storage.generations import previous_name
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, save_payloads, structure_payload
from experiment_io.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DeviceError,
    ExperimentIOError,
    FormatVersionError,
    IncompatibleCheckpointError,
    MissingDatabaseError,
    NotACheckpointError,
    StructureClassError,
)
from experiment_io.loading.loaders import load_checkpoint, load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io.storage.manifest import MANIFEST_NAME, PREVIOUS_MANIFEST_NAME

from helpers import flip_bit, make_database, snapshot_directory, train_tiny_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trained")
    tm, controller, tracker, database = train_tiny_run(directory, max_epochs=2)
    return {"directory": directory, "model_state": {k: v.clone() for k, v in tm.model.state_dict().items()},
            "tracker_state": tracker.state_dict()}


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run."""
    target = tmp_path / "run"
    shutil.copytree(trained["directory"], target)
    return target


def load_last(run, **kwargs):
    return load_checkpoint_from_cwd(directory=run, database=make_database(), **kwargs)


# --- nothing there ----------------------------------------------------------------


def test_load_checkpoint_missing_paths(tmp_path, run):
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(tmp_path / "nope" / STRUCTURE_NAME, tmp_path / "nope" / LAST_NAME)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ExperimentIOError)
    assert str(tmp_path / "nope" / STRUCTURE_NAME) in str(info.value)
    with pytest.raises(CheckpointNotFoundError) as info:
        load_checkpoint(run / STRUCTURE_NAME, run / "no_such_checkpoint.pt")
    assert "no_such_checkpoint.pt" in str(info.value)


def test_load_checkpoint_given_a_directory(run):
    with pytest.raises(CheckpointNotFoundError, match="it is a directory"):
        load_checkpoint(run / STRUCTURE_NAME, run)


@pytest.mark.parametrize("loader", [load_checkpoint_from_cwd, load_model_from_cwd])
def test_missing_run_directory(tmp_path, loader):
    with pytest.raises(CheckpointNotFoundError) as info:
        loader(directory=tmp_path / "missing")
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "missing") in str(info.value)


@pytest.mark.parametrize("loader", [load_checkpoint_from_cwd, load_model_from_cwd])
def test_directory_without_a_run(tmp_path, loader, monkeypatch):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(CheckpointNotFoundError) as info:
        loader(directory=tmp_path)
    assert str(tmp_path) in str(info.value)
    monkeypatch.chdir(tmp_path)  # the default directory is the current one
    with pytest.raises(CheckpointNotFoundError):
        loader()


@pytest.mark.parametrize("loader", [load_checkpoint_from_cwd, load_model_from_cwd])
def test_run_with_a_structure_but_no_checkpoint_yet(tmp_path, loader):
    """A run killed during its first epoch: only the structure file was written."""
    tm = helpers.make_training_modules()
    params = helpers.SetupParams(stopping_key="mse", batch_size=16, max_epochs=2)
    tm, controller, _ = helpers.setup_training(tm, params)
    save_payloads(RunWriter(tmp_path), {STRUCTURE_NAME: structure_payload(tm, controller, None)})
    before = snapshot_directory(tmp_path)
    with pytest.raises(CheckpointNotFoundError) as info:
        loader(directory=tmp_path, **({"database": make_database()} if loader is load_checkpoint_from_cwd else {}))
    assert str(tmp_path) in str(info.value)
    assert snapshot_directory(tmp_path) == before


# --- foreign files ----------------------------------------------------------------


def foreign_files(directory):
    text = directory / "notes.pt"
    text.write_text("these are my notes, not a checkpoint\n")
    tensor = directory / "tensor.pt"
    torch.save(torch.arange(10), tensor)
    return [text, tensor]


def test_foreign_state_file_unverified_is_not_a_checkpoint(run):
    for path in foreign_files(run):
        with pytest.raises(NotACheckpointError) as info:
            load_checkpoint(run / STRUCTURE_NAME, path, database=make_database(), verify=False)
        assert str(path) in str(info.value)
        assert not isinstance(info.value, CorruptCheckpointError)


def test_foreign_state_file_elsewhere_unverified(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in foreign_files(elsewhere):
        with pytest.raises(NotACheckpointError) as info:
            load_checkpoint(run / STRUCTURE_NAME, path, database=make_database(), verify=False)
        assert str(path) in str(info.value)


def test_foreign_state_file_verified_has_no_manifest_record(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in foreign_files(run) + foreign_files(elsewhere):
        with pytest.raises(CorruptCheckpointError) as info:
            load_checkpoint(run / STRUCTURE_NAME, path, database=make_database())
        message = str(info.value)
        assert str(path) in message and MANIFEST_NAME in message and "verify=False" in message


def test_foreign_structure_file(run):
    for path in foreign_files(run):
        with pytest.raises(NotACheckpointError) as info:
            load_checkpoint(path, run / LAST_NAME, database=make_database(), verify=False)
        assert str(path) in str(info.value)


def test_state_file_given_as_structure_and_back(run):
    with pytest.raises(NotACheckpointError) as info:
        load_checkpoint(run / LAST_NAME, run / LAST_NAME, database=make_database())
    assert LAST_NAME in str(info.value)
    with pytest.raises(NotACheckpointError) as info:
        load_checkpoint(run / STRUCTURE_NAME, run / BEST_MODEL_NAME, database=make_database())
    assert BEST_MODEL_NAME in str(info.value) and "'model'" in str(info.value)


# --- damaged files ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["bit flip", "truncation"])
def test_damaged_last_checkpoint_by_path(run, damage):
    path = run / LAST_NAME
    if damage == "bit flip":
        flip_bit(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint(run / STRUCTURE_NAME, path, database=make_database())
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_damaged_last_checkpoint_strict(run):
    flip_bit(run / LAST_NAME)
    with pytest.raises(CorruptCheckpointError) as info:
        load_last(run, strict=True)
    assert str(run / LAST_NAME) in str(info.value)


def test_damaged_last_checkpoint_falls_back_to_the_newest_intact_generation(run, caplog):
    """best_checkpoint.pt was written in the same save as the damaged last_checkpoint.pt:
    it is newer than the previous generation of last, so it is taken."""
    best = torch.load(run / BEST_NAME, weights_only=True)
    assert best["controller"]["current_epoch"] == 2
    flip_bit(run / LAST_NAME)
    with caplog.at_level(logging.WARNING, logger="experiment_io"):
        loaded = load_last(run)
    assert str(run / LAST_NAME) in caplog.text
    assert loaded["controller"].current_epoch == 2
    for key, value in loaded["training_modules"].model.state_dict().items():
        assert torch.equal(value, best["model"][key]), key


def test_damaged_last_and_best_fall_back_to_the_previous_generation_of_last(run, caplog):
    previous = run / previous_name(LAST_NAME)
    assert previous.exists()
    expected = torch.load(previous, weights_only=True)
    flip_bit(run / LAST_NAME)
    flip_bit(run / BEST_NAME)
    with caplog.at_level(logging.WARNING, logger="experiment_io"):
        loaded = load_last(run)
    assert str(run / LAST_NAME) in caplog.text and str(run / BEST_NAME) in caplog.text
    assert loaded["controller"].current_epoch == expected["controller"]["current_epoch"] == 1
    for key, value in loaded["training_modules"].model.state_dict().items():
        assert torch.equal(value, expected["model"][key]), key


def test_damaged_structure_file(run):
    flip_bit(run / STRUCTURE_NAME)
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint(run / STRUCTURE_NAME, run / LAST_NAME, database=make_database())
    assert str(run / STRUCTURE_NAME) in str(info.value)
    with pytest.raises(CorruptCheckpointError) as info:
        load_last(run)
    assert STRUCTURE_NAME in str(info.value)


def test_damaged_best_model_strict(run):
    flip_bit(run / BEST_MODEL_NAME)
    with pytest.raises(CorruptCheckpointError) as info:
        load_model_from_cwd(directory=run, strict=True)
    assert str(run / BEST_MODEL_NAME) in str(info.value)


def test_damaged_best_model_falls_back_to_the_best_state_in_last_checkpoint(run, trained):
    """As documented: if best_model.pt does not verify, the best model state carried by
    last_checkpoint.pt is used (not an older generation of best_model.pt)."""
    assert trained["tracker_state"]["best_epoch"] == 1
    flip_bit(run / BEST_MODEL_NAME)
    model = load_model_from_cwd(directory=run)
    best = trained["tracker_state"]["best_model_state"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key


def test_best_model_without_best_model_file(run, trained):
    for name in (BEST_MODEL_NAME, previous_name(BEST_MODEL_NAME)):
        os.remove(run / name)
    model = load_model_from_cwd(directory=run)
    best = trained["tracker_state"]["best_model_state"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key


def test_damaged_manifest(run, caplog):
    (run / MANIFEST_NAME).write_bytes(b"{ not json")
    # the manifest the last save replaced is read instead: the save before the last one loads, and it is said
    with caplog.at_level(logging.WARNING):
        loaded = load_last(run)
    assert loaded["controller"].current_epoch == 1
    assert any(MANIFEST_NAME in r.getMessage() and PREVIOUS_MANIFEST_NAME in r.getMessage() for r in caplog.records)
    os.remove(run / PREVIOUS_MANIFEST_NAME)
    with pytest.raises(CorruptCheckpointError) as info:
        load_last(run)
    assert MANIFEST_NAME in str(info.value)


def test_missing_manifest(run):
    os.remove(run / MANIFEST_NAME)
    os.remove(run / PREVIOUS_MANIFEST_NAME)
    with pytest.raises(CorruptCheckpointError) as info:
        load_last(run)
    assert MANIFEST_NAME in str(info.value)
    # the files can still be loaded by path, unverified
    loaded = load_checkpoint(run / STRUCTURE_NAME, run / LAST_NAME, database=make_database(), verify=False)
    assert loaded["controller"].current_epoch == 2


# --- wrong content ----------------------------------------------------------------


def resave(run, name, change):
    payload = torch.load(run / name, weights_only=True)
    change(payload)
    save_payloads(RunWriter(run), {name: payload})


def test_newer_format_version(run):
    resave(run, LAST_NAME, lambda p: p["experiment_io"].update(format_version=99))
    with pytest.raises(FormatVersionError) as info:
        load_last(run)
    assert str(run / LAST_NAME) in str(info.value) and "99" in str(info.value)
    with pytest.raises(FormatVersionError):
        load_checkpoint(run / STRUCTURE_NAME, run / LAST_NAME, database=make_database())


def test_missing_entry(run):
    resave(run, LAST_NAME, lambda p: p.pop("metric_tracker"))
    with pytest.raises(NotACheckpointError) as info:
        load_checkpoint(run / STRUCTURE_NAME, run / LAST_NAME, database=make_database())
    assert "metric_tracker" in str(info.value) and str(run / LAST_NAME) in str(info.value)


def test_state_that_does_not_fit_the_structure(run):
    resave(run, LAST_NAME, lambda p: p["model"].pop("layer2.bias"))
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_checkpoint(run / STRUCTURE_NAME, run / LAST_NAME, database=make_database())
    assert "layer2.bias" in str(info.value) and str(run / LAST_NAME) in str(info.value)


def test_state_of_another_run(run, tmp_path):
    other = tmp_path / "other"
    train_tiny_run(other, max_epochs=1, seed=1)
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_checkpoint(run / STRUCTURE_NAME, other / LAST_NAME, database=make_database())
    assert str(other / LAST_NAME) in str(info.value) and str(run / STRUCTURE_NAME) in str(info.value)


def test_other_database_seed(run):
    with pytest.raises(IncompatibleCheckpointError, match="seed"):
        load_checkpoint_from_cwd(directory=run, database=make_database(seed=1))


def test_renamed_model_class(run, monkeypatch):
    monkeypatch.delattr(helpers, "TinyNet")
    with pytest.raises(StructureClassError) as info:
        load_last(run)
    assert "TinyNet" in str(info.value)
    assert str(run / STRUCTURE_NAME) in str(info.value)


def test_bad_which(run):
    with pytest.raises(ValueError, match="which"):
        load_checkpoint_from_cwd(directory=run, which="newest")


# --- databases --------------------------------------------------------------------


def test_in_memory_database_needs_database_argument(run):
    with pytest.raises(MissingDatabaseError) as info:
        load_checkpoint_from_cwd(directory=run)
    assert "database=" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_with_database_the_run_loads_and_continues_exactly(run, trained, tmp_path):
    loaded = load_checkpoint_from_cwd(directory=run, database=make_database())
    assert loaded["controller"].current_epoch == 2
    assert loaded["metric_tracker"].epochs == [0, 1]
    assert loaded["metric_tracker"].history == trained["tracker_state"]["history"]
    for key, value in loaded["training_modules"].model.state_dict().items():
        assert torch.equal(value, trained["model_state"][key]), key

    loaded["controller"].max_epochs = 3
    train_model(**loaded, callbacks=None, batch_callbacks=None, quiet=True, directory=run)

    straight = tmp_path / "straight"
    tm, controller, tracker, _ = train_tiny_run(straight, max_epochs=3)
    for key, value in loaded["training_modules"].model.state_dict().items():
        assert torch.equal(value, tm.model.state_dict()[key]), key
    assert loaded["metric_tracker"].history == tracker.history


def test_restartable_database_moved(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, **helpers.make_arrays())
    run = tmp_path / "run"
    train_tiny_run(run, database=NPZDatabase(path, ["x"], ["y"], 0), max_epochs=1)
    loaded = load_checkpoint_from_cwd(directory=run)  # rebuilt from its descriptor
    assert isinstance(loaded["database"], NPZDatabase) and loaded["database"].path == str(path)
    os.rename(path, tmp_path / "moved.npz")
    with pytest.raises(ExperimentIOError) as info:
        load_checkpoint_from_cwd(directory=run)
    assert "NPZDatabase" in str(info.value) and str(path) in str(info.value) and "data_file=" in str(info.value)
    loaded = load_checkpoint_from_cwd(directory=run, database=NPZDatabase(tmp_path / "moved.npz", ["x"], ["y"], 0))
    assert loaded["controller"].current_epoch == 1


# --- no file is modified by a failed load -----------------------------------------


def damage_last(run):
    flip_bit(run / LAST_NAME)


def damage_manifest(run):
    (run / MANIFEST_NAME).write_bytes(b"garbage")
    os.remove(run / PREVIOUS_MANIFEST_NAME)  # with it, the save before the last one loads


def version_99(run):
    resave(run, LAST_NAME, lambda p: p["experiment_io"].update(format_version=99))


FAILURES = {
    "both locations": (None, lambda run: load_checkpoint_from_cwd(map_location="cpu", model_device="cpu", directory=run,
                                                                   database=make_database()), DeviceError),
    "no database": (None, lambda run: load_checkpoint_from_cwd(directory=run), MissingDatabaseError),
    "other seed": (None, lambda run: load_checkpoint_from_cwd(directory=run, database=make_database(seed=3)),
                   IncompatibleCheckpointError),
    "strict, damaged": (damage_last, lambda run: load_last(run, strict=True), CorruptCheckpointError),
    "by path, damaged": (damage_last, lambda run: load_checkpoint(run / STRUCTURE_NAME, run / LAST_NAME), CorruptCheckpointError),
    "damaged manifest": (damage_manifest, load_last, CorruptCheckpointError),
    "newer version": (version_99, load_last, FormatVersionError),
    "model, both locations": (None, lambda run: load_model_from_cwd(map_location="cpu", model_device="cpu", directory=run),
                              DeviceError),
    "unknown device": (None, lambda run: load_last(run, model_device="tpu:9"), DeviceError),
}


@pytest.mark.parametrize("prepare, load, error", FAILURES.values(), ids=FAILURES.keys())
def test_failed_load_modifies_no_file(run, prepare, load, error):
    if prepare is not None:
        prepare(run)
    before = snapshot_directory(run)
    with pytest.raises(error):
        load(run)
    assert snapshot_directory(run) == before


def test_successful_load_modifies_no_file_either(run):
    before = snapshot_directory(run)
    load_last(run)
    load_model_from_cwd(directory=run)
    assert snapshot_directory(run) == before
