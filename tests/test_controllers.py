"""Controllers: state round trips, exact continuation of optimizer and schedulers, stopping."""
import copy
import functools
import io
import pickle
import warnings

import pytest
import torch
from torch.optim import lr_scheduler

from experiment_io import Controller, PatienceController

from helpers import TinyNet, assert_bitwise_equal, make_controller

STEP = functools.partial(lr_scheduler.StepLR, step_size=2, gamma=0.5)
EXPONENTIAL = functools.partial(lr_scheduler.ExponentialLR, gamma=0.9)
PLATEAU = functools.partial(lr_scheduler.ReduceLROnPlateau, patience=1, factor=0.5)

# a stopping metric that improves, then stalls (so that ReduceLROnPlateau acts)
METRICS = [1.0, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.6, 0.6, 0.6]

torch.manual_seed(1234)
X = torch.randn(48, 3)
Y = torch.randn(48, 1)


def run_epochs(model, controller, epochs):
    """Train ``epochs`` (3 optimizer steps each); return the learning rate after each epoch."""
    lrs = []
    for epoch in epochs:
        for i in range(3):
            controller.optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X[16 * i:16 * (i + 1)]), Y[16 * i:16 * (i + 1)])
            loss.backward()
            controller.optimizer.step()
        metric = METRICS[epoch]
        better = epoch == 0 or metric < min(METRICS[:epoch])
        controller.push_epoch(epoch, better, metric)
        lrs.append([group["lr"] for group in controller.optimizer.param_groups])
    return lrs


def saved_and_loaded(state):
    """``state`` after torch.save and torch.load(weights_only=True), as a checkpoint holds it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_controller_state_round_trip_restores_every_field():
    model, controller = make_controller(schedulers=[STEP])
    run_epochs(model, controller, range(3))
    controller.batch_size = 24
    controller.eval_batch_size = 100
    controller.max_epochs = 17
    controller.stopping_key = "mae"
    controller.boredom = 2
    controller.stop_reason = "because"
    state = saved_and_loaded(controller.state_dict())

    _, fresh = make_controller(schedulers=[STEP], seed=99)
    fresh.load_state_dict(state)
    for field in ("batch_size", "eval_batch_size", "max_epochs", "stopping_key", "current_epoch", "boredom", "stop_reason"):
        assert getattr(fresh, field) == getattr(controller, field), field
    assert fresh.current_epoch == 3
    assert_bitwise_equal(fresh.optimizer.state_dict(), controller.optimizer.state_dict())
    assert fresh.scheduler.state_dict() == controller.scheduler.state_dict()
    assert fresh.state_dict().keys() == controller.state_dict().keys()


def test_patience_controller_state_round_trip():
    model, controller = make_controller(patience=4)
    run_epochs(model, controller, range(3))
    controller.termination_patience = 7
    _, fresh = make_controller(patience=2)
    fresh.load_state_dict(saved_and_loaded(controller.state_dict()))
    assert fresh.termination_patience == 7
    assert fresh.boredom == controller.boredom and fresh.current_epoch == 3
    assert_bitwise_equal(fresh.optimizer.state_dict(), controller.optimizer.state_dict())


def test_state_dict_is_plain_data():
    model, controller = make_controller(schedulers=[STEP, PLATEAU], patience=3)
    run_epochs(model, controller, range(2))
    state = controller.state_dict()
    assert_bitwise_equal(saved_and_loaded(state), state)


SCHEDULER_SETS = {
    "none": [],
    "step": [STEP],
    "exponential": [EXPONENTIAL],
    "plateau": [PLATEAU],
    "step+plateau": [STEP, PLATEAU],
    "exponential+step+plateau": [EXPONENTIAL, STEP, PLATEAU],
}


@pytest.mark.parametrize("schedulers", SCHEDULER_SETS.values(), ids=SCHEDULER_SETS.keys())
@pytest.mark.parametrize("k", [1, 4])
def test_restored_controller_continues_exactly(schedulers, k):
    n = 9
    model, controller = make_controller(schedulers=schedulers)
    run_epochs(model, controller, range(k))
    model_state = copy.deepcopy(model.state_dict())
    controller_state = saved_and_loaded(controller.state_dict())
    expected_lrs = run_epochs(model, controller, range(k, n))

    restored_model, restored = make_controller(schedulers=schedulers, seed=7)
    restored_model.load_state_dict(model_state)
    restored.load_state_dict(controller_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        lrs = run_epochs(restored_model, restored, range(k, n))

    assert lrs == expected_lrs
    assert restored.current_epoch == controller.current_epoch == n
    assert restored.boredom == controller.boredom
    assert_bitwise_equal(restored.optimizer.state_dict(), controller.optimizer.state_dict())
    for s_restored, s_original in zip(restored.schedulers, controller.schedulers):
        assert s_restored.state_dict() == s_original.state_dict()
    assert_bitwise_equal(restored_model.state_dict(), model.state_dict())


def test_schedulers_change_the_learning_rate():
    """Guard for the test above: the scheduler sets do act within the epochs compared."""
    model, controller = make_controller(schedulers=[STEP, PLATEAU])
    lrs = run_epochs(model, controller, range(9))
    assert len({lr[0] for lr in lrs}) >= 3


def test_unpickled_controller_steps_without_scheduler_warnings():
    """The structure file pickles the controller; its schedulers must keep working."""
    model, controller = make_controller(schedulers=[STEP, PLATEAU])
    run_epochs(model, controller, range(2))
    restored = pickle.loads(pickle.dumps(controller))
    params = [p for group in restored.optimizer.param_groups for p in group["params"]]
    assert restored.schedulers[0].optimizer is restored.optimizer
    assert restored.schedulers[1].optimizer is restored.optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored.optimizer.zero_grad()
        sum(p.sum() for p in params).backward()
        restored.optimizer.step()
        restored.push_epoch(2, False, 0.8)
    assert restored.current_epoch == 3
    assert restored.optimizer._opt_called


def test_mismatched_number_of_schedulers():
    _, controller = make_controller(schedulers=[STEP, PLATEAU])
    _, other = make_controller(schedulers=[STEP])
    with pytest.raises(ValueError, match="2 scheduler state"):
        other.load_state_dict(controller.state_dict())
    _, none = make_controller()
    with pytest.raises(ValueError):
        none.load_state_dict(controller.state_dict())
    # nothing was changed by the refused load
    assert none.optimizer.state_dict()["state"] == {}


# --- stopping ---------------------------------------------------------------------


def test_controller_stops_at_max_epochs():
    _, controller = make_controller(max_epochs=3)
    assert controller.push_epoch(0, True, 1.0) is True
    assert controller.push_epoch(1, False, 1.0) is True
    assert controller.push_epoch(2, False, 1.0) is False
    assert controller.current_epoch == 3
    assert controller.stop_reason is None


def test_patience_controller_stops_after_patience():
    _, controller = make_controller(patience=3)
    go_on = [controller.push_epoch(e, better, 1.0) for e, better in
             enumerate([True, False, False, True, False, False, False])]
    assert go_on == [True, True, True, True, True, True, False]
    assert controller.boredom == 3
    assert controller.current_epoch == 7
    assert "termination_patience=3" in controller.stop_reason


def test_patience_controller_stays_stopped_after_restore():
    _, controller = make_controller(patience=1)
    controller.push_epoch(0, True, 1.0)
    assert controller.push_epoch(1, False, 1.0) is False
    _, fresh = make_controller(patience=1)
    fresh.load_state_dict(controller.state_dict())
    assert fresh.stop_reason == controller.stop_reason
    assert fresh.push_epoch(2, True, 0.5) is False


def test_boredom_counts_epochs_without_improvement():
    _, controller = make_controller()
    for e, better in enumerate([True, False, False]):
        controller.push_epoch(e, better, 1.0)
    assert controller.boredom == 2
    controller.push_epoch(3, True, 1.0)
    assert controller.boredom == 0


# --- bad arguments ----------------------------------------------------------------


def optimizer():
    return torch.optim.SGD(TinyNet().parameters(), lr=0.1)


@pytest.mark.parametrize("batch_size", [0, -4, 2.5, "32", None])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        Controller(optimizer(), None, batch_size, 10, "mse")


@pytest.mark.parametrize("max_epochs", [0, -1, 1.5])
def test_bad_max_epochs(max_epochs):
    with pytest.raises(ValueError, match="max_epochs"):
        Controller(optimizer(), None, 8, max_epochs, "mse")


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Controller(TinyNet(), None, 8, 10, "mse")


def test_scheduler_of_another_optimizer():
    other = lr_scheduler.StepLR(optimizer(), step_size=1)
    with pytest.raises(ValueError, match="StepLR"):
        Controller(optimizer(), [other], 8, 10, "mse")


@pytest.mark.parametrize("patience", [0, -2, 1.0])
def test_bad_termination_patience(patience):
    with pytest.raises(ValueError, match="termination_patience"):
        PatienceController(optimizer(), None, 8, 10, "mse", termination_patience=patience)


def test_single_scheduler_and_eval_batch_size_default():
    opt = optimizer()
    sched = lr_scheduler.StepLR(opt, step_size=1)
    controller = Controller(opt, sched, 8, 10, "mse")
    assert controller.schedulers == [sched] and controller.scheduler is sched
    assert controller.eval_batch_size == 8
    assert Controller(opt, None, 8, 10, "mse", eval_batch_size=64).eval_batch_size == 64
    assert Controller(opt, None, 8, 10, "mse").scheduler is None
