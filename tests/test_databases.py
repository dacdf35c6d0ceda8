"""Databases: seeded splits, seeded epoch orders, resumable batches, restartable descriptors."""
import os
import sys

import h5py
import numpy as np
import pytest
import torch

from experiment_io import Database, HDF5Database, NPZDatabase, Restartable
from experiment_io.experiment.databases import SPLITS
from experiment_io.experiment.restartable import restore_database
from experiment_io.errors import DatabaseRestartError, ExperimentIOError, IncompatibleCheckpointError

from helpers import make_arrays

N = 200


def indexed(seed=0, valid_size=0.1, test_size=0.1, n=N):
    """A database whose target is each sample's own index, to see which samples come out."""
    return Database(make_arrays(n), ["x"], ["idx"], seed, valid_size=valid_size, test_size=test_size)


def served_indices(batches):
    return np.concatenate([targets[0].numpy() for _, targets in batches]) if batches else np.array([], dtype=np.int64)


# --- splits -----------------------------------------------------------------------


@pytest.mark.parametrize("valid_size, test_size, expected", [
    (0.1, 0.2, {"train": 140, "valid": 20, "test": 40}),
    (0.25, 0.0, {"train": 150, "valid": 50, "test": 0}),
    (15, 25, {"train": 160, "valid": 15, "test": 25}),
    (0, 0, {"train": 200, "valid": 0, "test": 0}),
    (0.005, 0.0149, {"train": 196, "valid": 1, "test": 3}),
    (0.5, 99, {"train": 1, "valid": 100, "test": 99}),
])
def test_split_sizes(valid_size, test_size, expected):
    db = indexed(valid_size=valid_size, test_size=test_size)
    assert {s: db.split_size(s) for s in SPLITS} == expected
    assert len(db) == N


def test_splits_disjoint_and_covering():
    db = indexed(valid_size=0.15, test_size=0.2)
    parts = [set(db.splits[s].tolist()) for s in SPLITS]
    assert sum(len(p) for p in parts) == N
    assert set().union(*parts) == set(range(N))
    for split in SPLITS:
        assert np.all(np.diff(db.splits[split]) > 0)  # sorted, no duplicates


def test_split_is_deterministic_for_a_seed():
    a, b, c = indexed(seed=5), indexed(seed=5), indexed(seed=6)
    for split in SPLITS:
        np.testing.assert_array_equal(a.splits[split], b.splits[split])
    assert any(not np.array_equal(a.splits[s], c.splits[s]) for s in SPLITS)


def test_split_ignores_global_random_state():
    np.random.seed(1)
    torch.manual_seed(1)
    a = indexed(seed=3)
    np.random.seed(2)
    torch.manual_seed(2)
    np.random.rand(10)
    b = indexed(seed=3)
    for split in SPLITS:
        np.testing.assert_array_equal(a.splits[split], b.splits[split])


def test_split_is_random_not_contiguous():
    db = indexed(seed=0)
    assert not np.array_equal(db.splits["train"], np.arange(db.split_size("train")))


# --- epoch orders and batches -----------------------------------------------------


def test_epoch_order_is_a_permutation():
    db = indexed()
    for epoch in range(3):
        order = db.epoch_order(epoch)
        assert sorted(order.tolist()) == list(range(db.split_size("train")))


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = indexed(seed=11), indexed(seed=11)
    orders = [a.epoch_order(e) for e in range(4)]
    np.random.seed(123)
    torch.manual_seed(123)
    np.testing.assert_array_equal(b.epoch_order(3), orders[3])  # asked out of order, after reseeding
    np.testing.assert_array_equal(b.epoch_order(0), orders[0])
    np.testing.assert_array_equal(a.epoch_order(2), orders[2])  # asked again
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(indexed(seed=12).epoch_order(0), orders[0])


def test_batches_cover_the_split_in_order():
    db = indexed()
    order = db.epoch_order(0)
    batches = list(db.batches("train", 32, order=order))
    uneven = list(db.batches("train", 50, order=order))
    assert [len(t[0]) for _, t in uneven] == [50, 50, 50, 10]
    assert [len(t[0]) for _, t in batches] == [32] * 5
    np.testing.assert_array_equal(served_indices(batches), db.splits["train"][order])
    inputs, targets = batches[0]
    assert isinstance(inputs, tuple) and isinstance(targets, tuple)
    assert inputs[0].dtype == torch.float32 and inputs[0].shape == (32, 3)
    np.testing.assert_array_equal(inputs[0].numpy(), db.arrays["x"][targets[0].numpy()])


def test_batches_without_order_are_in_index_order():
    db = indexed()
    np.testing.assert_array_equal(served_indices(list(db.batches("valid", 7))), db.splits["valid"])


@pytest.mark.parametrize("start", [0, 1, 31, 32, 33, 100, 159, 160])
def test_batches_start_yields_exactly_the_rest(start):
    db = indexed()
    order = db.epoch_order(2)
    full = served_indices(list(db.batches("train", 32, order=order)))
    rest = list(db.batches("train", 32, order=order, start=start))
    np.testing.assert_array_equal(served_indices(rest), full[start:])
    sizes = [len(t[0]) for _, t in rest]
    assert all(size == 32 for size in sizes[:-1])
    assert sum(sizes) == 160 - start


def test_get_and_sample_indices():
    db = indexed()
    indices = db.sample_indices("test", np.array([0, 2]))
    np.testing.assert_array_equal(indices, db.splits["test"][[0, 2]])
    inputs, targets = db.get(indices)
    np.testing.assert_array_equal(targets[0].numpy(), indices)


def test_unknown_split():
    with pytest.raises(KeyError, match="unknown split 'training'"):
        indexed().split_size("training")


def test_float_dtype():
    arrays = make_arrays()
    assert Database(arrays, ["x"], ["y"], 0).arrays["x"].dtype == np.float32
    db = Database(arrays, ["x"], ["y", "idx"], 0, float_dtype=np.float64)
    assert db.arrays["x"].dtype == np.float64 and db.arrays["idx"].dtype == np.int64
    assert db.float_dtype == "float64"


# --- bad arguments ----------------------------------------------------------------


def test_missing_array_name():
    with pytest.raises(KeyError) as info:
        Database(make_arrays(), ["x", "forces"], ["y"], 0)
    assert "forces" in str(info.value) and "'x'" in str(info.value)


def test_unequal_lengths():
    arrays = make_arrays()
    arrays["y"] = arrays["y"][:150]
    with pytest.raises(ValueError, match="same number of samples") as info:
        Database(arrays, ["x"], ["y"], 0)
    assert "150" in str(info.value) and "200" in str(info.value)


@pytest.mark.parametrize("valid_size, test_size", [(0.5, 0.5), (100, 100), (0.9, 20), (199, 1)])
def test_no_training_samples_left(valid_size, test_size):
    with pytest.raises(ValueError, match="no training samples"):
        indexed(valid_size=valid_size, test_size=test_size)


@pytest.mark.parametrize("size, error", [(1.0, ValueError), (-0.1, ValueError), (-1, ValueError), (201, ValueError),
                                          (True, TypeError), ("0.1", TypeError)])
def test_bad_split_size(size, error):
    with pytest.raises(error, match="valid_size"):
        indexed(valid_size=size)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3", None])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        Database(make_arrays(), ["x"], ["y"], seed)


def test_no_inputs_or_targets():
    with pytest.raises(ValueError):
        Database(make_arrays(), [], ["y"], 0)
    with pytest.raises(ValueError):
        Database(make_arrays(), ["x"], [], 0)


# --- state and compatibility ------------------------------------------------------


def test_check_fingerprint_checks_seed_and_splits():
    db = indexed(seed=3)
    state = db.fingerprint()
    assert {k: v for k, v in state.items() if k not in ("data", "splits")} == {
        "seed": 3, "n_samples": N, "split_sizes": {"train": 160, "valid": 20, "test": 20}, "inputs": ["x"],
        "targets": ["idx"]}
    assert state["data"].startswith("xxh3_128:") and state["splits"].startswith("xxh3_128:")
    indexed(seed=3).check_fingerprint(state)  # the same database: accepted
    old = {k: state[k] for k in ("seed", "n_samples", "split_sizes")}  # written before data, split and names were stored
    indexed(seed=3).check_fingerprint(old)
    with pytest.raises(IncompatibleCheckpointError) as info:
        indexed(seed=4).check_fingerprint(state)
    assert isinstance(info.value, ValueError)
    assert "seed" in str(info.value)
    with pytest.raises(IncompatibleCheckpointError):
        indexed(seed=3, valid_size=0.2).check_fingerprint(state)
    with pytest.raises(IncompatibleCheckpointError):
        indexed(seed=3, n=199).check_fingerprint(state)


def test_in_memory_database_is_not_restartable():
    db = indexed()
    assert db.restartable is False
    assert not isinstance(db, Restartable)
    assert not hasattr(db, "descriptor")


# --- file databases ---------------------------------------------------------------


@pytest.fixture
def npz_file(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, **make_arrays(), unused=np.zeros(3))
    return path


@pytest.fixture
def h5_file(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as h5:
        for name, array in make_arrays().items():
            h5.create_dataset(name, data=array)
    return path


def assert_same_database(a, b):
    assert type(a) is type(b)
    assert set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        assert a.arrays[name].dtype == b.arrays[name].dtype
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    for split in SPLITS:
        np.testing.assert_array_equal(a.splits[split], b.splits[split])
    assert a.inputs == b.inputs and a.targets == b.targets
    assert a.fingerprint() == b.fingerprint()
    np.testing.assert_array_equal(a.epoch_order(5), b.epoch_order(5))


@pytest.mark.parametrize("kind", ["npz", "h5"])
def test_file_database_matches_in_memory(kind, npz_file, h5_file):
    cls, path = (NPZDatabase, npz_file) if kind == "npz" else (HDF5Database, h5_file)
    db = cls(path, ["x"], ["y", "idx"], 9, valid_size=0.2, test_size=15)
    memory = Database(make_arrays(), ["x"], ["y", "idx"], 9, valid_size=0.2, test_size=15)
    assert set(db.arrays) == {"x", "y", "idx"}  # "unused" is not loaded
    for name in memory.arrays:
        np.testing.assert_array_equal(db.arrays[name], memory.arrays[name])
    for split in SPLITS:
        np.testing.assert_array_equal(db.splits[split], memory.splits[split])
    assert db.restartable is True and isinstance(db, Restartable)
    assert db.path == os.path.abspath(path)


@pytest.mark.parametrize("kind", ["npz", "h5"])
def test_descriptor_and_restore(kind, npz_file, h5_file, monkeypatch, tmp_path):
    cls, path = (NPZDatabase, npz_file) if kind == "npz" else (HDF5Database, h5_file)
    monkeypatch.chdir(tmp_path)
    db = cls(os.path.basename(path), ["x"], ["y"], 4, 30, 0.1, float_dtype="float64")  # a relative path; test_size first
    descriptor = db.descriptor()
    assert descriptor == {
        "class": f"experiment_io.experiment.restartable.{cls.__name__}",
        "kwargs": {"path": str(path), "inputs": ["x"], "targets": ["y"], "seed": 4, "valid_size": 0.1,
                   "test_size": 30, "float_dtype": "float64"},
    }
    monkeypatch.chdir(os.path.dirname(tmp_path))  # the absolute path still finds the file
    restored = restore_database(descriptor)
    assert_same_database(restored, db)
    assert restored.arrays["x"].dtype == np.float64


def test_restore_from_moved_file(npz_file, tmp_path):
    descriptor = NPZDatabase(npz_file, ["x"], ["y"], 0).descriptor()
    os.rename(npz_file, tmp_path / "moved.npz")
    with pytest.raises(DatabaseRestartError) as info:
        restore_database(descriptor)
    message = str(info.value)
    assert "experiment_io.experiment.restartable.NPZDatabase" in message and str(npz_file) in message
    assert "data_file=" in message
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ExperimentIOError)


def test_restore_when_the_file_lacks_an_array(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, **make_arrays())
    descriptor = NPZDatabase(path, ["x"], ["y"], 0).descriptor()
    np.savez(path, x=make_arrays()["x"])
    with pytest.raises(DatabaseRestartError) as info:
        restore_database(descriptor)
    assert str(path) in str(info.value) and "NPZDatabase" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_restore_unknown_class_imports_nothing(canary_module, npz_file):
    name, canary = canary_module
    descriptor = NPZDatabase(npz_file, ["x"], ["y"], 0).descriptor()
    descriptor["class"] = f"{name}.MyDatabase"
    with pytest.raises(DatabaseRestartError) as info:
        restore_database(descriptor)
    message = str(info.value)
    assert f"{name}.MyDatabase" in message and str(npz_file) in message
    assert "allow=" in message and "database=" in message
    assert name not in sys.modules
    assert not canary.exists()


def test_restore_class_of_allowed_module(canary_module, npz_file):
    name, canary = canary_module
    descriptor = NPZDatabase(npz_file, ["x"], ["y"], 0).descriptor()
    descriptor["class"] = f"{name}.MyDatabase"
    db = restore_database(descriptor, allow=[name])
    assert canary.exists()
    assert type(db).__name__ == "MyDatabase" and type(db).__module__ == name
    assert_same_database(NPZDatabase(npz_file, ["x"], ["y"], 0), NPZDatabase(db.path, ["x"], ["y"], 0))


def test_restore_made_up_module():
    descriptor = {"class": "not_imported_pkg_xyz.sub.Thing", "kwargs": {"path": "/nowhere.npz"}}
    with pytest.raises(DatabaseRestartError, match="not_imported_pkg_xyz.sub.Thing"):
        restore_database(descriptor)
    assert not any(m.startswith("not_imported_pkg_xyz") for m in sys.modules)


@pytest.mark.parametrize("class_path", [
    "experiment_io.experiment.databases.Database",  # not restartable
    "builtins.dict",  # not a database
    "os.system",  # not a class
    "experiment_io.experiment.databases.NoSuchDatabase",
])
def test_restore_refuses_other_classes(class_path, npz_file):
    descriptor = {"class": class_path, "kwargs": {"path": str(npz_file), "inputs": ["x"], "targets": ["y"], "seed": 0}}
    with pytest.raises(DatabaseRestartError) as info:
        restore_database(descriptor)
    assert class_path in str(info.value)


@pytest.mark.parametrize("descriptor", [None, "experiment_io.experiment.databases.NPZDatabase", {"class": 3, "kwargs": {}},
                                        {"class": "experiment_io.experiment.databases.NPZDatabase", "kwargs": None}, {}])
def test_restore_malformed_descriptor(descriptor):
    with pytest.raises(DatabaseRestartError, match="malformed"):
        restore_database(descriptor)


@pytest.mark.parametrize("stored", ["experiment_io.databases.NPZDatabase", "experiment_io.experiment.restartable.NPZDatabase"])
def test_a_descriptor_of_an_earlier_version_names_the_old_module_and_still_restores(npz_file, stored):
    """Runs written before the layers became folders store ``experiment_io.databases.NPZDatabase``."""
    descriptor = {**NPZDatabase(npz_file, ["x"], ["y"], 0).descriptor(), "class": stored}
    database = restore_database(descriptor)
    assert type(database) is NPZDatabase
    assert np.array_equal(database.epoch_order(0), NPZDatabase(npz_file, ["x"], ["y"], 0).epoch_order(0))
