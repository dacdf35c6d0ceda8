"""Routines: set up an experiment, train it (see :mod:`experiment_io.training.loop`), test it."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from experiment_io.experiment.controllers import Controller, PatienceController
from experiment_io.experiment.databases import SPLITS, Database
from experiment_io.experiment.devices import place_training_modules, resolve_device
from experiment_io.training.distributed import unwrap
from experiment_io.errors import SetupError, UnknownNameError
from experiment_io.experiment.metric_tracker import MetricTracker
from experiment_io.training.loop import train_model
from experiment_io.training.retention import Retention
from experiment_io.experiment.training_modules import Evaluator, TrainingModules, adopt_evaluator

__all__ = ["SetupParams", "setup_training", "test_model", "setup_and_train"]

log = logging.getLogger(__name__)


@dataclass
class SetupParams:
    """What :func:`setup_training` needs to build the controller and metric tracker.

    :ivar stopping_key: the evaluation loss (on the validation split) that picks the best model.
    :ivar batch_size: training batch size.
    :ivar max_epochs: number of epochs to train.
    :ivar optimizer: an optimizer class (built over the model's parameters that
        require gradients, with
        ``learning_rate`` and ``optimizer_kwargs``), the name of one in
        :mod:`torch.optim` (``"Adam"``), or an optimizer instance.
    :ivar learning_rate: the learning rate given to an optimizer class.
    :ivar device: where the model and training loss go: ``"cpu"``, ``"cuda:N"``, ``"auto"``.
    :ivar eval_batch_size: evaluation batch size (default: ``batch_size``).
    :ivar scheduler: ``None``, or a callable ``scheduler(optimizer)`` returning an LR
        scheduler (e.g. ``functools.partial(ReduceLROnPlateau, patience=5)``), or a
        scheduler instance over the optimizer given as ``optimizer``, or a list of
        these. A scheduler with a ``set_controller`` method (hippynn's
        ``RaiseBatchSizeOnPlateau``) is handed the controller.
    :ivar termination_patience: stop after this many epochs without improvement
        (uses a :class:`PatienceController`); ``None`` trains ``max_epochs``.
    :ivar optimizer_kwargs: further keyword arguments for an optimizer class.
    :ivar larger_is_better: whether a larger stopping metric is better (accuracy,
        R²); by default a smaller one is (a loss).
    """

    stopping_key: str
    batch_size: int
    max_epochs: int
    optimizer: Any = torch.optim.Adam
    learning_rate: float = 1e-3
    device: Any = "cpu"
    eval_batch_size: Optional[int] = None
    scheduler: Any = None
    termination_patience: Optional[int] = None
    optimizer_kwargs: dict = field(default_factory=dict)
    larger_is_better: bool = False


def _optimizer_class(spec):
    """The optimizer class ``SetupParams.optimizer`` names (a class, a callable, or a name in torch.optim)."""
    if isinstance(spec, str):
        cls = getattr(torch.optim, spec, None)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            return cls
        known = sorted(n for n, c in vars(torch.optim).items()
                       if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
                       and c is not torch.optim.Optimizer)
        raise SetupError(f"optimizer={spec!r} is not an optimizer of torch.optim (it has {', '.join(known)}); pass "
                         "one of those names, or the class itself: optimizer=torch.optim.Adam")
    if not callable(spec):
        raise SetupError(f"optimizer={spec!r} is neither an optimizer class, nor an optimizer, nor the name of one "
                         "in torch.optim: pass e.g. optimizer=torch.optim.Adam or optimizer='Adam'")
    return spec


def _scheduler(spec, optimizer):
    """A scheduler from ``SetupParams.scheduler``: a factory called with the optimizer, or an instance over it."""
    if hasattr(spec, "state_dict") and hasattr(spec, "step") and not isinstance(spec, type):
        if getattr(spec, "optimizer", optimizer) is not optimizer:
            raise SetupError(f"the scheduler {type(spec).__name__} steps another optimizer than the one set up here; "
                             "pass a factory (functools.partial(Scheduler, ...)), which is called with it")
        return spec
    if not callable(spec):
        raise SetupError(f"scheduler {spec!r} is neither a scheduler nor a callable that makes one from the optimizer")
    return spec(optimizer)


def setup_training(training_modules: TrainingModules, setup_params: SetupParams) -> tuple:
    """Place the modules on their devices and build the controller and metric tracker.

    In a data-parallel run (under ``torchrun`` or ``srun``), ``device="auto"`` or
    ``"cuda"`` is this rank's GPU. The model may be a
    :class:`~torch.nn.parallel.DistributedDataParallel` wrapper of your own;
    :func:`~experiment_io.train_model` trains with it and saves the plain model.

    :param training_modules: a :class:`~experiment_io.TrainingModules`.
    :param setup_params: a :class:`~experiment_io.SetupParams`.
    :return: ``(training_modules, controller, metric_tracker)``.
    """
    if not isinstance(training_modules, TrainingModules):
        training_modules = TrainingModules(*training_modules)
    model, loss, evaluator = training_modules
    params = setup_params
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, not {type(model).__name__}")
    evaluator = adopt_evaluator(evaluator)  # hippynn's evaluator computes its metrics in one pass
    training_modules = TrainingModules(model, loss, evaluator)
    if unwrap(evaluator.model) is not unwrap(model):
        raise ValueError("the evaluator evaluates another model than the one being trained")
    if params.stopping_key not in evaluator.metric_names and not (evaluator.joint is not None
                                                                  and not evaluator.joint_names):
        raise UnknownNameError(
            f"stopping_key {params.stopping_key!r} is not one of the evaluator's losses "
            f"{sorted(evaluator.metric_names)}"
        )
    if not isinstance(params.larger_is_better, bool):
        raise SetupError(f"larger_is_better must be True or False, not {params.larger_is_better!r}")
    device = resolve_device(params.device, "device")
    place_training_modules(training_modules, device)
    if isinstance(params.optimizer, torch.optim.Optimizer):
        optimizer = params.optimizer
        model_params = {id(p) for p in model.parameters()}
        if not all(id(p) in model_params for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimizer given in SetupParams holds parameters that are not the model's")
    else:
        trained = [p for p in model.parameters() if p.requires_grad]  # frozen parameters (pretraining) stay out
        if not trained:
            raise SetupError("every parameter of the model has requires_grad=False: there is nothing to train")
        optimizer = _optimizer_class(params.optimizer)(trained, lr=params.learning_rate, **params.optimizer_kwargs)
    makers = (params.scheduler if isinstance(params.scheduler, (list, tuple))
              else [params.scheduler] if params.scheduler else [])
    schedulers = [_scheduler(make, optimizer) for make in makers]
    common = dict(eval_batch_size=params.eval_batch_size)
    if params.termination_patience is not None:
        controller: Controller = PatienceController(optimizer, schedulers, params.batch_size, params.max_epochs,
                                                    params.stopping_key,
                                                    termination_patience=params.termination_patience, **common)
    else:
        controller = Controller(optimizer, schedulers, params.batch_size, params.max_epochs, params.stopping_key,
                                **common)
    metric_tracker = MetricTracker(params.stopping_key, larger_is_better=params.larger_is_better)
    log.info("training set up on %s: %s, %d scheduler(s), %s", device, type(optimizer).__name__, len(schedulers),
             type(controller).__name__)
    return training_modules, controller, metric_tracker


def test_model(database: Database, evaluator: Evaluator, batch_size: int, when: str,
               metric_tracker: Optional[MetricTracker] = None) -> dict:
    """Evaluate the model on every non-empty split.

    :param when: a label for these results (e.g. ``"best"``).
    :param metric_tracker: when given, the results are kept in its ``evaluations[when]``.
    :return: ``{split: {name: value}}``.
    """
    results = {split: evaluator.evaluate(split, database=database, batch_size=batch_size)
               for split in SPLITS if database.split_size(split) > 0}
    for split, values in results.items():
        log.info("%s %s: %s", when, split, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
    if metric_tracker is not None:
        metric_tracker.evaluations[str(when)] = results
    return results


def setup_and_train(training_modules: TrainingModules, database: Database, setup_params: SetupParams, *,
                    store_all_better: bool = False, store_best: bool = True, store_every: int = 0, quiet: bool = False,
                    callbacks: Sequence[Callable] | None = None, batch_callbacks: Sequence[Callable] | None = None,
                    directory: str | os.PathLike | None = None, retention: Retention | None = None) -> MetricTracker:
    """Set up, train, then load the best model and test it on every split.

    The keyword arguments are :func:`~experiment_io.train_model`'s.

    :return: the metric tracker (its ``evaluations["best"]`` holds the test results).
    """
    training_modules, controller, metric_tracker = setup_training(training_modules, setup_params)
    train_model(training_modules, database, controller, metric_tracker, callbacks, batch_callbacks,
                store_all_better=store_all_better, store_best=store_best, store_every=store_every, quiet=quiet,
                directory=directory, retention=retention)
    if metric_tracker.best_model_state is not None:
        training_modules.model.load_state_dict(metric_tracker.best_model_state)
    test_model(database, training_modules.evaluator, controller.eval_batch_size, "best", metric_tracker)
    return metric_tracker
