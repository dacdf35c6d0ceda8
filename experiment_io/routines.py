"""Routines: set up an experiment, train it with checkpoints, test it."""
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .asynchronous import BackgroundSaver
from .checkpoint import (
    BEST_MODEL_NAME,
    BEST_NAME,
    LAST_NAME,
    STRUCTURE_NAME,
    RunWriter,
    TrainingPosition,
    checkpoint_payload,
    epoch_checkpoint_name,
    epoch_model_name,
    model_payload,
    structure_payload,
)
from .controllers import Controller, PatienceController
from .databases import SPLITS
from .devices import module_device, resolve_device
from .errors import MissingDatabaseError
from .storage import RunLock
from .metric_tracker import MetricTracker
from .training_modules import Evaluator, TrainingModules, as_tuple

__all__ = ["SetupParams", "setup_training", "train_model", "test_model", "setup_and_train"]

log = logging.getLogger(__name__)


@dataclass
class SetupParams:
    """What :func:`setup_training` needs to build the controller and metric tracker.

    :ivar stopping_key: the evaluation loss (on the validation split) that picks the best model.
    :ivar batch_size: training batch size.
    :ivar max_epochs: number of epochs to train.
    :ivar optimizer: an optimizer class (built over the model's parameters with
        ``learning_rate`` and ``optimizer_kwargs``) or an optimizer instance.
    :ivar learning_rate: the learning rate given to an optimizer class.
    :ivar device: where the model and training loss go: ``"cpu"``, ``"cuda:N"``, ``"auto"``.
    :ivar eval_batch_size: evaluation batch size (default: ``batch_size``).
    :ivar scheduler: ``None``, or a callable ``scheduler(optimizer)`` returning an LR
        scheduler (e.g. ``functools.partial(ReduceLROnPlateau, patience=5)``), or a
        list of such callables.
    :ivar termination_patience: stop after this many epochs without improvement
        (uses a :class:`PatienceController`); ``None`` trains ``max_epochs``.
    :ivar optimizer_kwargs: further keyword arguments for an optimizer class.
    """

    stopping_key: str
    batch_size: int
    max_epochs: int
    optimizer: Any = torch.optim.Adam
    learning_rate: float = 1e-3
    device: Any = "cpu"
    eval_batch_size: int = None
    scheduler: Any = None
    termination_patience: int = None
    optimizer_kwargs: dict = field(default_factory=dict)


def setup_training(training_modules, setup_params):
    """Place the modules on their devices and build the controller and metric tracker.

    :param training_modules: a :class:`TrainingModules`.
    :param setup_params: a :class:`SetupParams`.
    :return: ``(training_modules, controller, metric_tracker)``.
    """
    if not isinstance(training_modules, TrainingModules):
        training_modules = TrainingModules(*training_modules)
    model, loss, evaluator = training_modules
    params = setup_params
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(evaluator, Evaluator):
        raise TypeError(f"the evaluator must be an experiment_io Evaluator, not {type(evaluator).__name__}")
    if evaluator.model is not model:
        raise ValueError("the evaluator evaluates another model than the one being trained")
    if params.stopping_key not in evaluator.evaluation_losses:
        raise KeyError(
            f"stopping_key {params.stopping_key!r} is not one of the evaluator's losses {sorted(evaluator.evaluation_losses)}"
        )
    device = resolve_device(params.device)
    model.to(device)
    if isinstance(loss, torch.nn.Module):
        loss.to(device)
    for fn in evaluator.evaluation_losses.values():
        if isinstance(fn, torch.nn.Module):
            fn.to("cpu")
    if isinstance(params.optimizer, torch.optim.Optimizer):
        optimizer = params.optimizer
        model_params = {id(p) for p in model.parameters()}
        if not all(id(p) in model_params for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the optimizer given in SetupParams holds parameters that are not the model's")
    else:
        optimizer = params.optimizer(model.parameters(), lr=params.learning_rate, **params.optimizer_kwargs)
    makers = params.scheduler if isinstance(params.scheduler, (list, tuple)) else [params.scheduler] if params.scheduler else []
    schedulers = [make(optimizer) for make in makers]
    common = dict(eval_batch_size=params.eval_batch_size)
    if params.termination_patience is not None:
        controller = PatienceController(optimizer, schedulers, params.batch_size, params.max_epochs, params.stopping_key,
                                        termination_patience=params.termination_patience, **common)
    else:
        controller = Controller(optimizer, schedulers, params.batch_size, params.max_epochs, params.stopping_key, **common)
    metric_tracker = MetricTracker(params.stopping_key)
    log.info("training set up on %s: %s, %d scheduler(s), %s", device, type(optimizer).__name__, len(schedulers), type(controller).__name__)
    return training_modules, controller, metric_tracker


#: Exit status of a process that stopped on a preemption signal after saving its
#: checkpoint (``EX_TEMPFAIL``: "try again"); a job script requeues on it.
PREEMPTED_EXIT_CODE = 75

#: The signals that :func:`train_model` turns into "save and stop" by default.
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class _SignalFlag:
    """Turns the signals of a run into a request to stop at the next batch boundary.

    The handler only records the signal. A second SIGINT raises
    :class:`KeyboardInterrupt` at once (the checkpoint files stay intact: every write
    is atomic); further scheduler signals are logged and ignored while the checkpoint
    is written. Nothing is installed outside the main thread; the previous handlers
    are restored on exit.
    """

    def __init__(self, signals):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.requested = None
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning("%s received while stopping after %s; the checkpoint is being written", name, self.requested)
            return
        self.requested = name
        log.warning("%s received: training stops after the current batch, once the checkpoint is written", name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        elif self.signals:
            log.info("train_model runs outside the main thread: no signal handlers installed")
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _requeue_under_slurm():
    """Ask SLURM to requeue this job (once); log what was done."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("requeue=True but not running under SLURM (no SLURM_JOB_ID): nothing requeued")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job, e)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s (restart count so far: %s)", job, os.environ.get("SLURM_RESTART_COUNT", "0"))
    else:
        log.error("scontrol requeue %s failed (exit %d): %s", job, result.returncode, result.stderr.strip())


def _check_database(database):
    for split in ("train", "valid"):
        if database.split_size(split) == 0:
            raise ValueError(
                f"the database's {split!r} split is empty; training needs training samples and validation "
                "samples to pick the best model (raise valid_size)"
            )


def _call_all(callbacks, *args):
    for cb in callbacks or ():
        cb(*args)


class _Saver:
    """Writes the checkpoint files of one training run.

    With ``async_save`` a save copies the state into staging buffers and writes it
    in a background thread (:class:`~experiment_io.asynchronous.BackgroundSaver`);
    with ``async_save=True`` the parameters and optimizer state are copied by that
    thread, and :meth:`staged` waits for that copy before the state may change.
    :meth:`committing` makes sure the last save has committed before training ends.
    The structure file is always written at once.
    """

    def __init__(self, directory, training_modules, controller, metric_tracker, database, resuming, async_save=False):
        self.writer = RunWriter(directory)
        self.training_modules, self.controller = training_modules, controller
        self.metric_tracker, self.database = metric_tracker, database
        if resuming and self.writer.has_intact(STRUCTURE_NAME):
            log.info("resuming: keeping the existing %s", STRUCTURE_NAME)
        else:
            if self.writer.record(STRUCTURE_NAME) is not None:
                log.warning("starting a new run in %s, which holds another run; the new run's checkpoints supersede it "
                            "(use a new directory to keep both)", directory)
            descriptor = database.descriptor() if getattr(database, "restartable", False) else None
            self.writer.save({STRUCTURE_NAME: structure_payload(training_modules, controller, descriptor)})
        self.structure_digest = self.writer.record(STRUCTURE_NAME)["digest"]
        self.background = BackgroundSaver(self.writer) if async_save else None
        self.overlap = async_save is True

    def _deferrable(self):
        """The tensors that change only in the optimizer step (or, for the best model state, never in place)."""
        model, loss, _ = self.training_modules
        tensors = list(model.parameters())
        if isinstance(loss, torch.nn.Module):
            tensors += list(loss.parameters())
        tensors += [v for state in self.controller.optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor)]
        tensors += [v for v in (self.metric_tracker.best_model_state or {}).values() if isinstance(v, torch.Tensor)]
        return tensors

    def staged(self):
        """Wait until the save in flight has copied what it deferred (before the optimizer step)."""
        if self.background is not None:
            self.background.staged()

    def save(self, position, *, better=False, store_best=True, keep_epoch=False):
        payload = checkpoint_payload(self.training_modules, self.controller, self.metric_tracker, self.database,
                                     position, self.structure_digest)
        files = {LAST_NAME: payload}
        model = self.training_modules.model
        model_file = model_payload(payload["model"], position.epoch, position.step, self.structure_digest, module_device(model))
        if better and store_best:
            files[BEST_NAME] = payload
            files[BEST_MODEL_NAME] = model_file
        if keep_epoch:
            ended = position.epoch - 1  # files are named by the 0-based epoch that just ended
            files[epoch_checkpoint_name(ended)] = payload
            files[epoch_model_name(ended)] = model_file
        if self.background is not None:
            self.background.save(files, defer=self._deferrable() if self.overlap else ())
            log.debug("saving %s in the background", ", ".join(files))
        else:
            self.writer.save(files)
            log.debug("saved %s", ", ".join(files))

    @contextlib.contextmanager
    def committing(self):
        """Leave only once the save in flight (if any) has committed.

        On a normal exit an error of that save is raised. When an exception is
        already on its way out, an error of the save is logged and attached to it as
        a note, and the exception goes on.
        """
        try:
            yield self
        except BaseException as e:
            if self.background is not None:
                try:
                    self.background.wait()
                except BaseException as background_error:  # do not hide the exception on its way out
                    log.error("the checkpoint written in the background failed too: %r", background_error)
                    if hasattr(e, "add_note"):
                        e.add_note(f"The checkpoint written in the background failed too: {background_error!r}")
            raise
        if self.background is not None:
            self.background.wait()


@dataclass
class _Options:
    store_all_better: bool
    store_best: bool
    store_every: int
    quiet: bool
    directory: str
    checkpoint_every_batches: int
    checkpoint_every_seconds: float
    signals: tuple
    async_save: object = False


def train_model(training_modules, database, controller, metric_tracker, callbacks, batch_callbacks,
                store_all_better=False, store_best=True, store_every=0, quiet=False, *, directory=None,
                checkpoint_every_batches=0, checkpoint_every_seconds=None, signals=DEFAULT_SIGNALS,
                exit_on_preemption=True, requeue=False, async_save=False):
    """Train, writing checkpoints into the run directory.

    Writes ``experiment_structure.pt`` once, ``last_checkpoint.pt`` after every epoch,
    ``best_checkpoint.pt`` and ``best_model.pt`` when the stopping metric improves
    (with ``store_best``), and ``checkpoint_epoch_N.pt`` / ``model_epoch_N.pt`` every
    ``store_every`` epochs and, with ``store_all_better``, at every better epoch.

    Signals (``signals``, by default SIGTERM, SIGUSR1 and SIGINT) stop training at the
    next batch boundary, after a mid-epoch ``last_checkpoint.pt`` is written; resuming
    from it continues with the next sample. After SIGINT (Ctrl-C) ``train_model``
    returns; a second Ctrl-C raises :class:`KeyboardInterrupt` at once. After SIGTERM
    or SIGUSR1 (a scheduler's time limit or preemption) the process exits with
    status :data:`PREEMPTED_EXIT_CODE` (75), which a job script can test to requeue
    the job, unless ``exit_on_preemption=False``, in which case ``train_model``
    returns as for SIGINT.

    With ``async_save=True`` checkpoints are written by a background thread, with
    the same guarantees as a synchronous save. The state is copied into staging
    buffers (allocated at the first save, reused afterwards; pinned memory for GPU
    tensors): the small parts at once, the parameters, the optimizer state and the
    best model state (on the CPU) by the background thread while training computes
    the next batch's forward and backward pass; the optimizer step waits for that
    copy if it is not done yet. Only the optimizer step may change parameters and
    optimizer state in place meanwhile; a change elsewhere is detected and fails
    the save with :class:`~experiment_io.errors.StagedStateModifiedError` (the
    previous checkpoint is intact). ``async_save="copy"`` copies the whole state
    before training goes on, for models that change their parameters elsewhere.
    One save is in flight at most: the next one waits for it to commit. An error of
    a background save is raised at the first optimizer step after it failed (or
    at the next save, or when training ends), and ``train_model`` never returns, exits or raises before the
    last save has committed (a Ctrl-C while it waits is raised once the save has
    committed).

    :param training_modules: :class:`TrainingModules` ``(model, loss, evaluator)``.
    :param database: a :class:`~experiment_io.databases.Database`.
    :param controller: a :class:`Controller`.
    :param metric_tracker: a :class:`MetricTracker`.
    :param callbacks: ``None`` or callables ``cb(epoch, better_model)``, called after each epoch.
    :param batch_callbacks: ``None`` or callables ``cb(batch_inputs, batch_model_outputs, batch_targets)``.
    :param store_all_better: keep the epoch files of every better epoch.
    :param store_best: write ``best_checkpoint.pt`` and ``best_model.pt``.
    :param store_every: keep the epoch files every this many epochs (0: never).
    :param quiet: no progress bar.
    :param directory: the run directory (default: the current working directory).
    :param checkpoint_every_batches: also write a mid-epoch ``last_checkpoint.pt``
        every this many batches (0: only at the end of each epoch).
    :param checkpoint_every_seconds: also write a mid-epoch ``last_checkpoint.pt``
        when this many seconds passed since the last save (``None``: never).
    :param signals: the signals that stop training after a checkpoint (``()``: none).
    :param exit_on_preemption: exit the process with :data:`PREEMPTED_EXIT_CODE` after
        a signal other than SIGINT.
    :param requeue: after such a signal, under SLURM, requeue the job once with
        ``scontrol requeue $SLURM_JOB_ID``.
    :param async_save: ``False``, ``True`` or ``"copy"``: write checkpoints in a
        background thread (see above); costs host memory for one copy of the
        checkpointed state.
    :return: the metric tracker (its ``stop_reason`` says why training ended).
    :raises RunLockedError: when another live process is training in the same directory.
    :raises CheckpointWriteError: when a checkpoint cannot be written (disk full, I/O
        error); the previous checkpoint is intact.
    :raises SystemExit: with :data:`PREEMPTED_EXIT_CODE`, see above.
    """
    if not isinstance(training_modules, TrainingModules):
        training_modules = TrainingModules(*training_modules)
    for name, value in (("store_every", store_every), ("checkpoint_every_batches", checkpoint_every_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    if checkpoint_every_seconds is not None and not checkpoint_every_seconds > 0:
        raise ValueError(f"checkpoint_every_seconds must be positive or None, not {checkpoint_every_seconds!r}")
    if database is None:
        raise MissingDatabaseError(
            "train_model got no database. A run trained on an in-memory Database cannot rebuild it: "
            "pass database= to load_checkpoint_from_cwd (or to train_model)."
        )
    _check_database(database)
    if async_save not in (False, True, "copy"):
        raise ValueError(f"async_save must be False, True or 'copy', not {async_save!r}")
    directory = os.path.abspath(directory or os.getcwd())
    os.makedirs(directory, exist_ok=True)
    options = _Options(store_all_better, store_best, store_every, quiet, directory, checkpoint_every_batches,
                       checkpoint_every_seconds, tuple(signals), async_save)
    # signals are handled from here on, so that one arriving while the run is set up
    # still ends in a checkpoint and the documented exit status
    with _SignalFlag(options.signals) as interrupt, RunLock(directory):
        tracker = _train(training_modules, database, controller, metric_tracker, callbacks, batch_callbacks, options,
                         interrupt)
    preempted = tracker.stop_reason if tracker.stop_reason and tracker.stop_reason.startswith("interrupted by SIG") else None
    if preempted and not preempted.endswith("SIGINT"):
        if requeue:
            _requeue_under_slurm()
        if exit_on_preemption:
            log.warning("%s: checkpoint saved, exiting with status %d", preempted, PREEMPTED_EXIT_CODE)
            raise SystemExit(PREEMPTED_EXIT_CODE)
    return tracker


def _stop(saver, position, metric_tracker, signame, n_train):
    """Write the checkpoint of a run stopped by ``signame``; return the metric tracker."""
    position.interrupted = signame
    saver.save(position)
    log.warning("training interrupted by %s in epoch %d after %d of %d samples; %s written",
                signame, position.epoch, position.samples_done, n_train, LAST_NAME)
    metric_tracker.stop_reason = f"interrupted by {signame}"
    return metric_tracker


def _train(training_modules, database, controller, metric_tracker, callbacks, batch_callbacks, options, interrupt):
    model, loss_fn, evaluator = training_modules
    position = getattr(controller, "resume_position", None) or TrainingPosition(epoch=controller.current_epoch)
    controller.resume_position = None
    resuming = controller.current_epoch > 0 or position.samples_done > 0
    if resuming:
        log.info("resuming at epoch %d, sample %d of the epoch", position.epoch, position.samples_done)
    saver = _Saver(options.directory, training_modules, controller, metric_tracker, database, resuming, options.async_save)
    evaluator.database = database
    device = module_device(model)
    n_train = database.split_size("train")

    last_save = time.monotonic()
    with saver.committing():
        while controller.current_epoch < controller.max_epochs and controller.stop_reason is None:
            epoch = controller.current_epoch
            position.epoch = epoch
            started = time.perf_counter()
            model.train()
            order = database.epoch_order(epoch)
            bar = tqdm(total=n_train, initial=position.samples_done, disable=options.quiet, desc=f"epoch {epoch}", unit="sample", leave=False)
            with contextlib.closing(bar):
                for batch_inputs, batch_targets in database.batches("train", controller.batch_size, order=order, start=position.samples_done):
                    if interrupt.requested:  # checked before each batch: a signal stops training at the next boundary
                        return _stop(saver, position, metric_tracker, interrupt.requested, n_train)
                    inputs = [t.to(device) for t in batch_inputs]
                    targets = [t.to(device) for t in batch_targets]
                    controller.optimizer.zero_grad(set_to_none=True)
                    outputs = as_tuple(model(*inputs))
                    loss = loss_fn(*outputs, *targets)
                    loss.backward()
                    saver.staged()
                    controller.optimizer.step()
                    n = len(batch_targets[0])
                    position.samples_done += n
                    position.step += 1
                    position.loss_sum += float(loss.detach()) * n
                    bar.update(n)
                    _call_all(batch_callbacks, inputs, outputs, targets)
                    every = options.checkpoint_every_batches
                    due = (every and position.step % every == 0) or (
                        options.checkpoint_every_seconds and time.monotonic() - last_save >= options.checkpoint_every_seconds)
                    if interrupt.requested and position.samples_done < n_train:
                        return _stop(saver, position, metric_tracker, interrupt.requested, n_train)
                    if due and position.samples_done < n_train:
                        saver.save(position)
                        last_save = time.monotonic()

            metrics = {"train": {"loss": position.loss_sum / n_train},
                       "valid": evaluator.evaluate("valid", batch_size=controller.eval_batch_size)}
            better = metric_tracker.register_metrics(metrics, epoch, epoch_time=time.perf_counter() - started)
            if better:
                metric_tracker.record_best_model(model)
            controller.push_epoch(epoch, better, metric_tracker.stopping_value(metrics))
            position = TrainingPosition(epoch=epoch + 1, step=position.step)
            _call_all(callbacks, epoch, better)
            keep = (options.store_every and (epoch + 1) % options.store_every == 0) or (options.store_all_better and better)
            saver.save(position, better=better, store_best=options.store_best, keep_epoch=bool(keep))
            last_save = time.monotonic()
            log.info("epoch %d: train loss %.6g, valid %s %.6g%s", epoch, metrics["train"]["loss"],
                     metric_tracker.stopping_key, metric_tracker.stopping_value(metrics), " (best so far)" if better else "")
            if interrupt.requested:
                return _stop(saver, position, metric_tracker, interrupt.requested, n_train)

    metric_tracker.stop_reason = controller.stop_reason or f"reached max_epochs={controller.max_epochs}"
    log.info("training ended (%s); %s", metric_tracker.stop_reason, metric_tracker.summary())
    return metric_tracker


def test_model(database, evaluator, batch_size, when, metric_tracker=None):
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


def setup_and_train(training_modules, database, setup_params, *, store_all_better=False, store_best=True,
                    store_every=0, quiet=False, callbacks=None, batch_callbacks=None, directory=None):
    """Set up, train, then load the best model and test it on every split.

    :return: the metric tracker (its ``evaluations["best"]`` holds the test results).
    """
    training_modules, controller, metric_tracker = setup_training(training_modules, setup_params)
    train_model(training_modules, database, controller, metric_tracker, callbacks, batch_callbacks,
                store_all_better=store_all_better, store_best=store_best, store_every=store_every, quiet=quiet,
                directory=directory)
    if metric_tracker.best_model_state is not None:
        training_modules.model.load_state_dict(metric_tracker.best_model_state)
    test_model(database, training_modules.evaluator, controller.eval_batch_size, "best", metric_tracker)
    return metric_tracker
