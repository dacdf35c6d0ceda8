"""Importing a run directory written by hippynn's ``train_model`` (hippynn 0.1.x).

hippynn writes ``experiment_structure.pt`` (the training modules and the
controller, pickled), ``best_checkpoint.pt`` (the model and controller states and
the pickled metric tracker at the best epoch) and ``best_model.pt`` (the model's
``state_dict``), without digests. :func:`import_hippynn_run` reads them with full
pickle — the user vouches for them, as for any file loaded with
``weights_only=False`` — and writes an experiment_io run directory from which
:func:`~experiment_io.load_model_from_cwd` gives hippynn's best model and
:func:`~experiment_io.load_checkpoint_from_cwd` (with ``database=``) resumes
training at the epoch hippynn saved. hippynn must be installed; it is imported
only here.
"""
import logging
import os
from typing import Union, cast

import torch

from experiment_io.experiment.controllers import Controller, PatienceController, TrainingPosition
from experiment_io.errors import CheckpointNotFoundError, NotACheckpointError, RunExistsError
from experiment_io.storage.writer import RunWriter
from experiment_io.experiment.metric_tracker import MetricTracker
from experiment_io.run.payloads import (BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, RunStatus,
                                        checkpoint_payload, model_payload, run_status, save_payloads,
                                        structure_payload)
from experiment_io.experiment.rng import get_rng_state
from experiment_io.experiment.training_modules import TrainingModules, adopt_evaluator

__all__ = ["import_hippynn_run"]

log = logging.getLogger(__name__)


def _load_trusted(path):
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path} does not exist: a hippynn run directory holds {os.path.basename(path)}.")
    return torch.load(path, map_location="cpu", weights_only=False)


def _controller(hippynn_controller, state):
    """An experiment_io controller with hippynn's optimizer, schedulers and settings at the saved epoch."""
    hippynn_controller.load_state_dict(state)
    common = dict(eval_batch_size=hippynn_controller.eval_batch_size)
    args = (hippynn_controller.optimizer, list(hippynn_controller.scheduler_list), hippynn_controller.batch_size,
            int(hippynn_controller._max_epochs), hippynn_controller.stopping_key)
    if hasattr(hippynn_controller, "patience"):
        controller = PatienceController(*args, termination_patience=int(hippynn_controller.patience), **common)
    else:
        controller = Controller(*args, **common)
    controller.current_epoch = int(hippynn_controller.current_epoch)
    controller.boredom = int(hippynn_controller.boredom)
    return controller


def _tracker(hippynn_tracker, stopping_key, best_model_state):
    """An experiment_io metric tracker with hippynn's history, replayed epoch by epoch."""
    tracker = MetricTracker(stopping_key)
    times = list(getattr(hippynn_tracker, "epoch_times", []))
    for epoch, metric_info in enumerate(hippynn_tracker.epoch_metric_values):
        tracker.register_metrics({split: {k: float(v) for k, v in values.items()}
                                  for split, values in metric_info.items()},
                                 epoch, epoch_time=times[epoch] if epoch < len(times) else None)
    tracker.best_model_state = {k: v.detach().to("cpu", copy=True) for k, v in best_model_state.items()}
    return tracker


def import_hippynn_run(source: Union[str, os.PathLike], destination: Union[str, os.PathLike], *,
                       overwrite: bool = False) -> RunStatus:
    """Write an experiment_io run directory from a hippynn run directory.

    :param source: the hippynn run directory (``experiment_structure.pt``,
        ``best_checkpoint.pt``, ``best_model.pt``). Its pickles are loaded with full
        pickle: import only runs you trust.
    :param destination: the experiment_io run directory to write (created if missing).
    :param overwrite: replace a run already in ``destination``.
    :return: the :class:`~experiment_io.run.payloads.RunStatus` of the imported run.
    :raises RunExistsError: when ``destination`` holds a run and ``overwrite`` is not given.
    :raises NotACheckpointError: when ``source`` does not hold what hippynn writes.
    """
    import hippynn  # noqa: F401  (the pickles refer to its classes)

    structure = _load_trusted(os.path.join(source, STRUCTURE_NAME))
    state = _load_trusted(os.path.join(source, BEST_NAME))
    best_model = _load_trusted(os.path.join(source, BEST_MODEL_NAME))
    try:
        model, loss, hippynn_evaluator = structure["training_modules"]
        hippynn_controller = structure["controller"]
        model.load_state_dict(state["model"])
        controller = _controller(hippynn_controller, state["controller"])
        tracker = _tracker(state["metric_tracker"], controller.stopping_key, best_model)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise NotACheckpointError(f"{source} does not hold a run of hippynn's train_model that can be imported: "
                                  f"{e!r}") from e
    training_modules = TrainingModules(model, loss, adopt_evaluator(hippynn_evaluator))
    controller.position = TrainingPosition(epoch=controller.current_epoch)
    rng = get_rng_state()
    if isinstance(state.get("torch_rng_state"), torch.Tensor):
        rng = {**rng, "torch": state["torch_rng_state"]}

    writer = RunWriter(destination)
    existing = run_status(writer.files)
    if existing is not None and not overwrite:
        raise RunExistsError(f"{writer.directory} holds a run already ({existing.describe()}); import into another "
                             "directory, or pass overwrite=True (--overwrite) to replace it.")
    # the structure file holds the optimizer without its state, as when train_model writes it (the state files
    # hold the state)
    optimizer_state = controller.optimizer.state_dict()
    controller.optimizer.state.clear()
    structure_record = save_payloads(writer, {STRUCTURE_NAME: structure_payload(training_modules, controller, None)})
    controller.optimizer.load_state_dict(optimizer_state)
    digest = structure_record[STRUCTURE_NAME].digest
    payload = checkpoint_payload(training_modules, controller, tracker, None, digest, [rng])
    db_info = getattr(hippynn_evaluator, "db_info", None) or {}
    if db_info.get("inputs") and db_info.get("targets"):  # a restart's database is realigned to these, or refused
        payload["database"] = {"inputs": list(db_info["inputs"]), "targets": list(db_info["targets"])}
    files = {LAST_NAME: payload, BEST_NAME: payload,
             BEST_MODEL_NAME: model_payload(payload["model"], controller.current_epoch, 0, digest, "cpu")}
    save_payloads(writer, files)
    status = cast(RunStatus, run_status(writer.files))  # never None: the checkpoints were just committed
    log.info("imported the hippynn run %s into %s: %s", source, writer.directory, status.describe())
    return status
