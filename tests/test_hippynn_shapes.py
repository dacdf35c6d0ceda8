"""What hippynn's users bring, without hippynn: losses that return tuples, metrics computed in one pass, hippynn's
database arguments, inputs whose order changes between processes, frozen parameters, schedulers that steer the
controller, and the evaluation of the best model at the end."""
import json
import logging

import numpy as np
import pytest
import torch

from experiment_io import (Database, Evaluator, SetupParams, TrainingModules, load_checkpoint_from_cwd,
                           load_model_from_cwd, setup_training, train_model)
from experiment_io.errors import IncompatibleCheckpointError, SetupError

from helpers import assert_bitwise_equal, make_arrays


class TwoInputs(torch.nn.Module):
    """A model of two float inputs of the same shape: swapping them trains on wrong data without any error."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(3, 1)
        self.b = torch.nn.Linear(3, 1)

    def forward(self, first, second):
        return self.a(first) - 2 * self.b(second)


class TupleLoss(torch.nn.Module):
    """As hippynn's training-loss graph: returns a tuple whose first element is the loss."""

    def forward(self, predicted, target):
        mse = torch.mean((predicted - target) ** 2)
        return mse, mse.detach().sqrt()


class AllMetrics(torch.nn.Module):
    """As hippynn's validation graph: every metric in one pass."""

    calls = 0

    def forward(self, predicted, target):
        AllMetrics.calls += 1
        error = predicted - target
        return [torch.mean(error ** 2), torch.mean(error.abs()), torch.mean(error ** 2).sqrt()]


def arrays(n=120):
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")
    return {"first": first, "second": second, "y": (first.sum(1, keepdims=True) - second[:, :1]).astype("float32")}


def set_up(inputs=("first", "second"), max_epochs=2, **params):
    model = TwoInputs()
    evaluator = Evaluator(model, AllMetrics(), names=["MSE", "MAE", "RMSE"])
    database = Database(arr_dict=arrays(), inputs=list(inputs), targets=["y"], seed=0, test_size=0.1, valid_size=0.2,
                        quiet=True)
    tm, controller, tracker = setup_training(TrainingModules(model, TupleLoss(), evaluator),
                                             SetupParams(stopping_key="RMSE", batch_size=16, max_epochs=max_epochs, **params))
    return tm, database, controller, tracker


def test_a_tuple_loss_and_one_pass_metrics_train_and_resume(tmp_path):
    tm, database, controller, tracker = set_up()
    AllMetrics.calls = 0
    train_model(tm, database, controller, tracker, None, None, directory=str(tmp_path), quiet=True)
    assert AllMetrics.calls == 2 + 3  # one pass per validation, then one per split for the best model
    assert sorted(tracker.history["valid"]) == ["MAE", "MSE", "RMSE"]
    assert tracker.best_value == min(tracker.history["valid"]["RMSE"])
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    assert check["training_modules"].evaluator.joint_names == ("MSE", "MAE", "RMSE")


def not_a_loss(predicted, target):
    return "not a loss"


def test_a_loss_that_returns_something_else_is_named(tmp_path):
    tm, database, controller, tracker = set_up()
    tm = TrainingModules(tm.model, not_a_loss, tm.evaluator)
    with pytest.raises(SetupError, match="the training loss returned str"):
        train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path))


def test_a_one_pass_evaluator_needs_a_name_per_value():
    model = TwoInputs()
    evaluator = Evaluator(model, AllMetrics(), names=["MSE", "MAE"])
    database = Database(arrays(), ["first", "second"], ["y"], 0)
    with pytest.raises(SetupError, match="returned 3 values for the 2 names"):
        evaluator.evaluate("valid", database=database)
    with pytest.raises(SetupError, match="names= goes with one callable"):
        Evaluator(model, {"MSE": torch.nn.MSELoss()}, names=["MSE"])


def test_inputs_in_another_order_at_a_restart_are_realigned(tmp_path, caplog):
    tm, database, controller, tracker = set_up(max_epochs=3)
    train_model(tm, database, controller, tracker, None, None, directory=str(tmp_path / "straight"), quiet=True)

    tm, database, controller, tracker = set_up(max_epochs=1)
    train_model(tm, database, controller, tracker, None, None, directory=str(tmp_path / "resumed"), quiet=True)
    swapped = Database(arr_dict=arrays(), inputs=["second", "first"], targets=["y"], seed=0, test_size=0.1,
                       valid_size=0.2)
    with caplog.at_level(logging.WARNING, logger="experiment_io"):
        check = load_checkpoint_from_cwd(directory=str(tmp_path / "resumed"), database=swapped)
    assert "realigned to ['first', 'second']" in caplog.text
    assert check["database"].inputs == ["first", "second"]
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, max_epochs=3)
    straight = torch.load(tmp_path / "straight" / "last_checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last_checkpoint.pt", weights_only=True)
    assert_bitwise_equal(straight["model"], resumed["model"])


def test_inputs_with_other_names_at_a_restart_are_refused(tmp_path):
    tm, database, controller, tracker = set_up(max_epochs=1)
    train_model(tm, database, controller, tracker, None, None, directory=str(tmp_path), quiet=True)
    other = Database(arr_dict={**arrays(), "third": arrays()["first"]}, inputs=["first", "third"], targets=["y"], seed=0,
                     test_size=0.1, valid_size=0.2)
    with pytest.raises(IncompatibleCheckpointError, match=r"inputs are \['first', 'third'\].*trained with inputs "
                                                          r"\['first', 'second'\]"):
        load_checkpoint_from_cwd(directory=str(tmp_path), database=other)


def test_hippynn_database_arguments():
    data = make_arrays(200)
    positional = Database(data, ["x"], ["y"], 3, 0.25, 0.1)  # hippynn's order: test_size, then valid_size
    assert positional.split_size("test") == 50 and positional.split_size("valid") == 20
    keywords = Database(arr_dict=data, inputs=["x"], targets=["y"], seed=3, valid_size=0.1, test_size=0.25, quiet=True)
    for split in ("train", "valid", "test"):
        assert np.array_equal(positional.splits[split], keywords.splits[split])
    with pytest.raises(SetupError, match="pass the arrays once"):
        Database(data, ["x"], ["y"], 3, arrays=data)


def test_explicit_and_automatic_splits():
    data = make_arrays(20)
    explicit = Database(data, ["x"], ["y"], 0, splits={"valid": [0, 1, 2], "test": np.array([3, 4])})
    assert explicit.splits["valid"].tolist() == [0, 1, 2] and explicit.splits["test"].tolist() == [3, 4]
    assert explicit.splits["train"].tolist() == list(range(5, 20))
    mask = np.zeros(20, bool)
    mask[[5, 6]] = True
    auto = Database({**data, "split_valid": mask, "split_test": ~mask & (np.arange(20) < 3)}, ["x"], ["y"], 0, auto_split=True)
    assert auto.splits["valid"].tolist() == [5, 6] and auto.splits["test"].tolist() == [0, 1, 2]
    with pytest.raises(SetupError, match="overlap"):
        Database(data, ["x"], ["y"], 0, splits={"valid": [0, 1], "test": [1]})
    with pytest.raises(SetupError, match="leave out test_size and valid_size"):
        Database(data, ["x"], ["y"], 0, test_size=0.1, splits={"valid": [0]})


def test_a_changed_split_is_refused_at_restart(tmp_path):
    data = make_arrays(60)
    database = Database(data, ["x"], ["y"], 0, splits={"valid": list(range(10))})
    from helpers import make_training_modules
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=8,
                                                                                  max_epochs=1))
    train_model(tm, database, controller, tracker, None, None, directory=str(tmp_path), quiet=True)
    other = Database(data, ["x"], ["y"], 0, splits={"valid": list(range(10, 20))})  # same sizes, other samples
    with pytest.raises(IncompatibleCheckpointError):
        load_checkpoint_from_cwd(directory=str(tmp_path), database=other)


def test_frozen_parameters_stay_out_of_the_optimizer():
    model = TwoInputs()
    model.b.weight.requires_grad_(False)
    evaluator = Evaluator(model, {"MSE": torch.nn.MSELoss()})
    _, controller, _ = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator),
                                      SetupParams(stopping_key="MSE", batch_size=8, max_epochs=1))
    optimized = {id(p) for group in controller.optimizer.param_groups for p in group["params"]}
    assert id(model.b.weight) not in optimized and id(model.a.weight) in optimized


class BatchSizeOnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """As hippynn's RaiseBatchSizeOnPlateau: steered by the stopping metric, it changes the controller."""

    def set_controller(self, controller):
        self.controller = controller

    def step(self, metrics):
        super().step(metrics)
        self.controller.batch_size = min(self.controller.batch_size * 2, 64)


def test_scheduler_instances_and_set_controller(tmp_path):
    model = TwoInputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = BatchSizeOnPlateau(optimizer)
    evaluator = Evaluator(model, {"MSE": torch.nn.MSELoss()})
    tm, controller, tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator),
                                             SetupParams(stopping_key="MSE", batch_size=8, max_epochs=2,
                                                         optimizer=optimizer, scheduler=scheduler))
    assert controller.schedulers == [scheduler] and scheduler.controller is controller
    database = Database(arrays(), ["first", "second"], ["y"], 0)
    train_model(tm, database, controller, tracker, None, None, directory=str(tmp_path), quiet=True)
    assert controller.batch_size == 32
    with pytest.raises(SetupError, match="steps another optimizer"):
        setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator),
                       SetupParams(stopping_key="MSE", batch_size=8, max_epochs=2, scheduler=scheduler))


def test_the_best_model_is_evaluated_on_every_split_when_training_ends(tmp_path):
    tm, database, controller, tracker = set_up(max_epochs=3)
    last = {k: v.clone() for k, v in tm.model.state_dict().items()}
    train_model(tm, database, controller, tracker, None, None, directory=str(tmp_path), quiet=True)
    results = json.loads((tmp_path / "best_evaluation.json").read_text())
    assert results["best_epoch"] == tracker.best_epoch
    assert sorted(results["results"]) == ["test", "train", "valid"]
    assert results["results"]["valid"]["RMSE"] == pytest.approx(tracker.best_value)
    assert tracker.evaluations["best"] == results["results"]
    # the model keeps its last weights; the best model's are those evaluated
    assert not all(torch.equal(a, b) for a, b in zip(last.values(), tm.model.state_dict().values()))
    best = load_model_from_cwd(directory=str(tmp_path))
    assert_bitwise_equal(dict(best.state_dict()), tracker.best_model_state)
