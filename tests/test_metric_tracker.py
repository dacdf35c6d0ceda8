"""The metric tracker: best-model decisions, history, plain-data state, HDF5 export."""
import io
import math
import os

import h5py
import numpy as np
import pytest
import torch

from experiment_io import MetricTracker

from helpers import TinyNet


def metrics(valid, train=None, **extra):
    info = {"valid": {"mse": valid, **extra}}
    if train is not None:
        info["train"] = {"loss": train}
    return info


def same(a, b):
    """Equality that treats NaN as equal to NaN and compares tensors by value."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_lower_is_better():
    tracker = MetricTracker("mse")
    better = [tracker.register_metrics(metrics(v), e) for e, v in enumerate([3.0, 2.0, 2.5, 2.0, 1.0])]
    assert better == [True, True, False, False, True]
    assert tracker.best_epoch == 4
    assert tracker.best_value == 1.0


def test_larger_is_better():
    tracker = MetricTracker("acc", larger_is_better=True)
    values = [0.5, 0.4, 0.7, 0.7, 0.9]
    better = [tracker.register_metrics({"valid": {"acc": v}}, e) for e, v in enumerate(values)]
    assert better == [True, False, True, False, True]
    assert tracker.best_epoch == 4 and tracker.best_value == 0.9


@pytest.mark.parametrize("larger_is_better", [False, True])
def test_nan_is_never_better(larger_is_better):
    tracker = MetricTracker("mse", larger_is_better=larger_is_better)
    assert tracker.register_metrics(metrics(math.nan), 0) is False
    assert tracker.best_epoch is None and tracker.best_value is None
    assert tracker.register_metrics(metrics(1.0), 1) is True
    assert tracker.register_metrics(metrics(math.nan), 2) is False
    assert tracker.best_epoch == 1 and tracker.best_value == 1.0


def test_infinities():
    tracker = MetricTracker("mse")
    assert tracker.register_metrics(metrics(math.inf), 0) is True
    assert tracker.register_metrics(metrics(1e300), 1) is True
    assert tracker.register_metrics(metrics(-math.inf), 2) is True
    assert tracker.register_metrics(metrics(-1e300), 3) is False


def test_history_epochs_and_best_values():
    tracker = MetricTracker("mse")
    tracker.register_metrics(metrics(2.0, train=5.0), 0, epoch_time=1.5)
    tracker.register_metrics(metrics(1.0, train=4.0, mae=0.5), 1, epoch_time=2.5)
    tracker.register_metrics(metrics(1.5, train=3.0), 2)
    assert tracker.epochs == [0, 1, 2]
    assert tracker.history["valid"]["mse"] == [2.0, 1.0, 1.5]
    assert tracker.history["train"]["loss"] == [5.0, 4.0, 3.0]
    mae = tracker.history["valid"]["mae"]
    assert math.isnan(mae[0]) and mae[1] == 0.5 and math.isnan(mae[2])
    assert tracker.epoch_times[:2] == [1.5, 2.5] and math.isnan(tracker.epoch_times[2])
    assert tracker.best_epoch == 1
    assert tracker.best_metric_values == {"valid": {"mse": 1.0, "mae": 0.5}, "train": {"loss": 4.0}}
    assert all(len(series) == 3 for split in tracker.history.values() for series in split.values())
    assert "best epoch 1" in tracker.summary() and "valid/mse=1" in tracker.summary()


def test_values_are_stored_as_python_floats():
    tracker = MetricTracker("mse")
    tracker.register_metrics({"valid": {"mse": torch.tensor(0.25), "n": np.float32(3.0)}}, np.int64(0))
    assert type(tracker.history["valid"]["mse"][0]) is float
    assert type(tracker.history["valid"]["n"][0]) is float
    assert type(tracker.epochs[0]) is int and type(tracker.best_epoch) is int
    assert type(tracker.best_metric_values["valid"]["mse"]) is float


def test_stopping_split():
    tracker = MetricTracker("loss", stopping_split="train")
    assert tracker.register_metrics(metrics(1.0, train=3.0), 0)
    assert not tracker.register_metrics(metrics(0.1, train=4.0), 1)
    assert tracker.best_value == 3.0


def test_missing_stopping_metric_is_named():
    tracker = MetricTracker("mse")
    with pytest.raises(KeyError) as info:
        tracker.register_metrics({"valid": {"mae": 1.0}, "train": {"loss": 2.0}}, 0)
    message = str(info.value)
    assert "'mse'" in message and "'valid'" in message and "mae" in message
    assert tracker.epochs == [] and tracker.history == {}


def test_record_best_model_is_a_cpu_copy():
    model = TinyNet()
    tracker = MetricTracker("mse")
    tracker.record_best_model(model)
    saved = {k: v.clone() for k, v in tracker.best_model_state.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert set(saved) == set(model.state_dict())
    for key, value in tracker.best_model_state.items():
        assert value.device.type == "cpu" and not value.requires_grad
        assert torch.equal(value, saved[key])
        assert not torch.equal(value, model.state_dict()[key])


def filled_tracker():
    tracker = MetricTracker("mse", stopping_split="valid", larger_is_better=False)
    model = TinyNet()
    for epoch, value in enumerate([2.0, math.nan, 1.0, 1.5]):
        if tracker.register_metrics(metrics(value, train=value + 1, mae=value / 2), epoch, epoch_time=0.1 * (epoch + 1)):
            tracker.record_best_model(model)
    tracker.stop_reason = "reached max_epochs=4"
    tracker.evaluations["best"] = {"test": {"mse": 0.5}}
    return tracker


def check_plain(obj, where="state"):
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, (str, int)), f"{where}: key {key!r}"
            check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    else:
        assert obj is None or type(obj) in (int, float, str, bool, torch.Tensor), f"{where}: {type(obj).__name__}"


def test_state_dict_is_plain_data():
    state = filled_tracker().state_dict()
    check_plain(state)
    assert state["best_epoch"] == 2
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert same(loaded, state)


def test_state_dict_is_a_copy():
    tracker = filled_tracker()
    state = tracker.state_dict()
    tracker.register_metrics(metrics(0.1), 4)
    assert state["epochs"] == [0, 1, 2, 3]
    assert len(state["history"]["valid"]["mse"]) == 4


def test_round_trip_through_from_state_dict():
    tracker = MetricTracker("acc", stopping_split="train", larger_is_better=True)
    tracker.register_metrics({"train": {"acc": 0.5}}, 0)
    restored = MetricTracker.from_state_dict(tracker.state_dict())
    assert restored.stopping_key == "acc" and restored.stopping_split == "train" and restored.larger_is_better is True

    tracker = filled_tracker()
    restored = MetricTracker.from_state_dict(tracker.state_dict())
    assert same(restored.state_dict(), tracker.state_dict())
    assert restored.best_value == tracker.best_value == 1.0
    # both go on identically
    for value in (1.2, 0.9, math.nan):
        assert restored.register_metrics(metrics(value), len(restored.epochs)) == tracker.register_metrics(metrics(value), len(tracker.epochs))
    assert same(restored.state_dict(), tracker.state_dict())


def test_load_state_dict_without_evaluations():
    state = filled_tracker().state_dict()
    del state["evaluations"]
    tracker = MetricTracker("other")
    tracker.load_state_dict(state)
    assert tracker.evaluations == {} and tracker.stopping_key == "mse"


def test_to_hdf5(tmp_path):
    tracker = filled_tracker()
    path = tmp_path / "history.h5"
    tracker.to_hdf5(path)
    assert sorted(os.listdir(tmp_path)) == ["history.h5"]
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["epochs"][()], [0, 1, 2, 3])
        assert h5["epochs"].dtype == np.int64
        np.testing.assert_allclose(h5["epoch_times"][()], [0.1, 0.2, 0.3, 0.4])
        np.testing.assert_array_equal(h5["valid/mse"][()], [2.0, np.nan, 1.0, 1.5])
        np.testing.assert_array_equal(h5["valid/mae"][()], [1.0, np.nan, 0.5, 0.75])
        np.testing.assert_array_equal(h5["train/loss"][()], [3.0, np.nan, 2.0, 2.5])
        assert h5.attrs["best_epoch"] == 2
        assert h5.attrs["stopping_key"] == "mse" and h5.attrs["stopping_split"] == "valid"


def test_to_hdf5_empty_tracker_and_overwrite(tmp_path):
    path = tmp_path / "history.h5"
    path.write_bytes(b"old")
    MetricTracker("mse").to_hdf5(path)
    with h5py.File(path, "r") as h5:
        assert h5.attrs["best_epoch"] == -1
        assert h5["epochs"].shape == (0,)
    assert sorted(os.listdir(tmp_path)) == ["history.h5"]


def test_stopping_values_of_some_epochs_equal_those_of_the_whole_history():
    tracker = MetricTracker("mse")
    values = [3.0, 2.0, float("nan"), 2.5, 1.0, 4.0]
    for epoch, value in enumerate(values):
        tracker.register_metrics(metrics(value), epoch)
    whole = tracker.stopping_values()
    for wanted in ([], [0], [5, 1], [2, 3, 4], [9, 0], range(6)):
        part = tracker.stopping_values(wanted)
        assert set(part) == set(wanted) & set(whole)
        assert all(same(part[e], whole[e]) for e in part)
