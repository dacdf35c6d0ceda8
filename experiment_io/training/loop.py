"""The training loop: epochs, batches, a save policy that says when to save, one exit."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

from experiment_io.storage.run_directory import RunDirectory
from experiment_io.training.checkpointing import RunCheckpointer
from experiment_io.experiment.controllers import Controller, TrainingPosition
from experiment_io.experiment.devices import module_device
from experiment_io.training.distributed import data_parallel, join, unwrap
from experiment_io.errors import IncompatibleCheckpointError, MissingDatabaseError, RankFailedError, SetupError
from experiment_io.experiment.metric_tracker import MetricTracker
from experiment_io.experiment.databases import SPLITS, Database
from experiment_io.run.payloads import BEST_EVALUATION_NAME, LAST_NAME
from experiment_io.training.policy import SavePolicy
from experiment_io.training.retention import Retention
from experiment_io.training.preemption import DEFAULT_SIGNALS, Preemption, Stop, StopKind
from experiment_io.training.progress import Report
from experiment_io.experiment.training_modules import TrainingModules, as_tuple, loss_value

__all__ = ["train_model"]

log = logging.getLogger(__name__)


def train_model(training_modules: TrainingModules, database: Database, controller: Controller,
                metric_tracker: MetricTracker, callbacks: Optional[Sequence[Callable]],
                batch_callbacks: Optional[Sequence[Callable]],
                store_all_better: bool = False, store_best: bool = True, store_every: int = 0, quiet: bool = False, *,
                directory: Optional[str | os.PathLike] = None, checkpoint_every_batches: int = 0,
                checkpoint_every_seconds: Optional[float] = None, signals: Iterable = DEFAULT_SIGNALS,
                exit_on_preemption: bool = True, requeue: bool = False, async_save: bool | str = False,
                overwrite: bool = False, max_epochs: Optional[int] = None, evaluate_best: bool = True,
                plots: bool = True, retention: Optional[Retention] = None) -> MetricTracker:
    """Train, writing checkpoints into the run directory.

    Writes ``experiment_structure.pt`` once, ``last_checkpoint.pt`` after every epoch,
    ``best_checkpoint.pt`` and ``best_model.pt`` when the stopping metric improves
    (with ``store_best``), and ``checkpoint_epoch_N.pt`` / ``model_epoch_N.pt`` every
    ``store_every`` epochs and, with ``store_all_better``, at every better epoch.
    Training starts (or continues) at the controller's ``position`` (a
    :class:`~experiment_io.TrainingPosition`), which a loader restores.

    What training does is shown without any set-up: a progress bar per epoch, a
    line per epoch (losses, the stopping metric, whether it is the best so far) and
    a summary at the end, written by the progress display to stderr. Once logging
    is configured (``logging.basicConfig(level=logging.INFO)``), the lines go to
    the log of ``experiment_io`` instead, at INFO; ``quiet=True`` shows no bar and
    leaves them to the log only. Warnings (a fallback to an older checkpoint, a
    signal) always reach stderr unless logging is configured otherwise.

    Signals (``signals``, by default SIGTERM, SIGUSR1 and SIGINT) stop training at the
    next batch boundary, after a mid-epoch ``last_checkpoint.pt`` is written; resuming
    from it continues with the next sample. After SIGINT (Ctrl-C) ``train_model``
    returns; a second Ctrl-C raises :class:`KeyboardInterrupt` at once. After SIGTERM
    or SIGUSR1 (a scheduler's time limit or preemption) the process exits with
    status :data:`~experiment_io.PREEMPTED_EXIT_CODE` (75), which a job
    script can test to requeue the job, unless ``exit_on_preemption=False``, in
    which case ``train_model`` returns as for SIGINT.

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
    at the next save, or when training ends), and ``train_model`` never returns,
    exits or raises before the last save has committed (a Ctrl-C while it waits is
    raised once the save has committed).

    :param training_modules: :class:`~experiment_io.TrainingModules` ``(model, loss, evaluator)``.
    :param database: a :class:`~experiment_io.Database`.
    :param controller: a :class:`~experiment_io.Controller`.
    :param metric_tracker: a :class:`~experiment_io.MetricTracker`.
    :param callbacks: ``None`` or callables ``cb(epoch, better_model)``, called after each epoch.
    :param batch_callbacks: ``None`` or callables ``cb(batch_inputs, batch_model_outputs, batch_targets)``.
    :param store_all_better: keep the epoch files of every better epoch.
    :param store_best: write ``best_checkpoint.pt`` and ``best_model.pt``.
    :param store_every: keep the epoch files every this many epochs (0: never).
    :param retention: which epoch files to keep within a disk quota, e.g.
        ``Retention(last=3, best=2, every=10)`` (see :class:`~experiment_io.Retention`). With
        a retention and neither ``store_every`` nor ``store_all_better``, each epoch's
        files are written when the retention keeps that epoch; files it no longer keeps
        are removed once the save that replaces them has committed.
    :param quiet: no progress display: no bar, and the epoch lines and the summary
        go to the log only (see below).
    :param directory: the run directory. Default: the directory the controller was
        loaded from (``train_model(**check)`` continues where the checkpoint came
        from), else the current working directory.
    :param checkpoint_every_batches: also write a mid-epoch ``last_checkpoint.pt``
        every this many batches (0: only at the end of each epoch).
    :param checkpoint_every_seconds: also write a mid-epoch ``last_checkpoint.pt``
        when this many seconds passed since the last save (``None``: never).
    :param signals: the signals that stop training after a checkpoint (``()``: none).
    :param exit_on_preemption: exit the process with status 75 after a signal other than SIGINT.
    :param requeue: after such a signal, under SLURM, requeue the job once with
        ``scontrol requeue $SLURM_JOB_ID``.
    :param async_save: ``False``, ``True`` or ``"copy"``: write checkpoints in a
        background thread (see above); costs host memory for one copy of the
        checkpointed state. A checkpoint of less than 8 MiB of tensors
        (``experiment_io.training.checkpointing.ASYNC_MIN_BYTES``) is written
        synchronously all the same: handing it over would cost training more.
    :param overwrite: start this run even if the directory holds the checkpoints of
        another run, which this run's files then replace. Without it, that is refused.
    :param max_epochs: train until this many epochs are done (sets the controller's
        ``max_epochs``): extends a finished run, or shortens one.
    :param evaluate_best: when training has ended (not when a signal stopped it),
        evaluate the best model on every split that holds samples, as hippynn does:
        the results go to ``metric_tracker.evaluations["best"]`` and, with the best
        epoch, to ``best_evaluation.json`` in the run directory (written atomically and
        recorded in the manifest). The model keeps its last weights.
    :param plots: when training has ended, write the training curves (one PNG per
        metric, see :mod:`experiment_io.training.plots`) into ``plots/`` of the run directory,
        if matplotlib is installed. ``metrics.csv`` (one row per epoch) is appended to
        with every epoch's checkpoint in any case.
    :return: the metric tracker (its ``stop_reason`` says why training ended).
    :raises RunExistsError: when a new run would replace the checkpoints of another
        run in the directory (see ``overwrite``).
    :raises RunLockedError: when another live process is training in the same directory.
    :raises CheckpointWriteError: when a checkpoint cannot be written (disk full, I/O
        error); the previous checkpoint is intact.
    :raises SystemExit: with status 75, see above.
    """
    if not isinstance(training_modules, TrainingModules):
        training_modules = TrainingModules(*training_modules)
    training_modules, wrapped = _unwrapped(training_modules)
    policy = SavePolicy(every_batches=checkpoint_every_batches, every_seconds=checkpoint_every_seconds,
                        keep_every_epochs=store_every, keep_better_epochs=store_all_better, keep_best=store_best,
                        retention=retention)
    _check_database(database)
    if async_save not in (False, True, "copy"):
        raise ValueError(f"async_save must be False, True or 'copy', not {async_save!r}")
    run = RunDirectory(directory or controller.loaded_from or os.getcwd())
    if max_epochs is not None:
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
            raise SetupError(f"max_epochs must be a positive integer, not {max_epochs!r}")
        controller.max_epochs = max_epochs
    preemption = Preemption(signals, exit_on_preemption=exit_on_preemption, requeue=requeue)
    # signals are handled from here on, so that one arriving while the run is set up
    # still ends in a checkpoint and the documented exit status
    with preemption, contextlib.ExitStack() as stack:
        distribution = join(module_device(training_modules.model))
        lock = distribution.on_writer(lambda: stack.enter_context(run.lock()))
        position = controller.position
        resuming = controller.loaded_from is not None or controller.current_epoch > 0 or position.samples_done > 0
        if resuming:
            log.info("resuming at epoch %d, sample %d of the epoch", position.epoch, position.samples_done)
        where = (controller.current_epoch, position.epoch, position.samples_done, position.step)
        if not distribution.same_everywhere(where):
            raise IncompatibleCheckpointError(
                f"the ranks do not start from the same position (rank {distribution.rank}: epoch {position.epoch}, "
                f"sample {position.samples_done}, step {position.step}): every rank must load the same checkpoint. "
                "Keep the run directory on a file system all nodes see, and start or resume every rank alike.")
        continues = controller._loaded_structure if controller.loaded_from is not None else None
        checkpointer = RunCheckpointer(run, training_modules, controller, metric_tracker, database,
                                       resuming=resuming, continues=continues, overwrite=overwrite,
                                       async_save=async_save, distribution=distribution, lock=lock)
        report = Report(quiet or not distribution.writer)
        loop = _Loop(training_modules, wrapped, database, controller, metric_tracker, callbacks, batch_callbacks,
                     report, distribution)
        started = time.perf_counter()
        with checkpointer.committing():
            stop = loop.run(policy, preemption, checkpointer)
        if evaluate_best and stop.kind in (StopKind.MAX_EPOCHS, StopKind.CONTROLLER):
            loop.evaluate_best(checkpointer)
        if plots and distribution.writer and stop.kind in (StopKind.MAX_EPOCHS, StopKind.CONTROLLER):
            _write_plots(metric_tracker, run)
        preemption.exiting(stop, launched=distribution.active)
    metric_tracker.stop_reason = stop.text
    if distribution.writer:
        report.summary(stop, controller, metric_tracker, time.perf_counter() - started, run.location)
    preemption.finish(stop, requeuer=distribution.writer)
    return metric_tracker


def _write_plots(tracker, run):
    """The training curves into ``plots/``; a missing matplotlib or a failing plot never fails the run."""
    from experiment_io.training.plots import PLOTS_DIRECTORY, plot_history, plotting_available

    if not plotting_available():
        log.info("no plots: matplotlib is not installed (pip install 'experiment_io[plots]'); metrics.csv holds the "
                 "history")
        return
    try:
        plot_history(tracker, run.folder(PLOTS_DIRECTORY))
    except Exception as e:  # a plot is a convenience: the run and its files are what matters
        log.warning("the training curves could not be plotted (%r); metrics.csv holds the history", e)


def _unwrapped(training_modules):
    """The training modules with the plain model, and the model to train with (the user's DDP or
    ``torch.compile`` wrapper, or ``None``): the files hold the plain model."""
    model, loss, evaluator = training_modules
    plain = unwrap(model)
    if plain is model:
        return training_modules, None
    if unwrap(evaluator.model) is plain:
        evaluator.model = plain
    return TrainingModules(plain, loss, evaluator), model


def _check_database(database):
    if database is None:
        raise MissingDatabaseError(
            "train_model got no database. A run trained on an in-memory Database cannot rebuild it: "
            "pass database= to load_checkpoint_from_cwd (or to train_model)."
        )
    for split in ("train", "valid"):
        if database.split_size(split) == 0:
            raise ValueError(
                f"the database's {split!r} split is empty; training needs training samples and validation "
                "samples to pick the best model (raise valid_size)"
            )


def _call_all(callbacks, *args):
    for cb in callbacks or ():
        cb(*args)


class _Loop:
    """One training run's epochs and batches, on this rank."""

    def __init__(self, training_modules, wrapped, database, controller, metric_tracker, callbacks, batch_callbacks,
                 report, distribution):
        self.model, self.loss_fn, self.evaluator = training_modules
        self.database, self.controller, self.metric_tracker = database, controller, metric_tracker
        self.callbacks, self.batch_callbacks, self.report = callbacks, batch_callbacks, report
        self.distribution = distribution
        self.trained = data_parallel(wrapped if wrapped is not None else self.model, distribution)
        self.evaluator.database = database
        self.n_train = database.split_size("train")
        # DDP reduces the model's gradients; those of a training loss with parameters are averaged here
        self.loss_parameters = list(self.loss_fn.parameters()) if isinstance(self.loss_fn, torch.nn.Module) else []

    def run(self, policy, preemption, checkpointer) -> Stop:
        """Train until the controller is done or a signal asks to stop; return why it stopped."""
        controller = self.controller
        while not controller.finished:
            self.train_epoch(policy, preemption, checkpointer)
            position = controller.position
            if position.samples_done < self.n_train:  # stopped mid-epoch by a signal
                position.interrupted = preemption.requested
                checkpointer.save()
                log.warning("training interrupted by %s in epoch %d after %d of %d samples; %s written",
                            preemption.requested, position.epoch, position.samples_done, self.n_train, LAST_NAME)
                return Stop.by_signal(preemption.requested)
            self.end_epoch(policy, preemption, checkpointer)
            if self.agree(preemption):
                return Stop.by_signal(preemption.requested)
        if controller.stop_reason is not None:
            return Stop(StopKind.CONTROLLER, controller.stop_reason)
        return Stop(StopKind.MAX_EPOCHS, f"reached max_epochs={controller.max_epochs}")

    def agree(self, preemption, due=False, loss_sum=0.0, failure=None):
        """Settle, with every rank, whether to stop (a signal any rank received) and whether a timed save is due.

        Adds the ranks' loss sums to the position. A ``failure`` of this rank (rank 0's
        background save) is raised here, and the other ranks raise
        :class:`~experiment_io.errors.RankFailedError` instead of waiting for rank 0.
        :return: whether to stop.
        """
        signal, due, loss_sum, failed = self.distribution.agree(preemption.requested, due, loss_sum,
                                                                failure is not None)
        if failure is not None:
            raise failure
        if failed:
            raise RankFailedError(f"rank 0 failed to write a checkpoint, so rank {self.distribution.rank} stops too; "
                                  "see rank 0's error")
        self.controller.position.loss_sum += loss_sum
        if signal is not None:
            preemption.adopt(signal)
        self.due = due
        return signal is not None

    def train_epoch(self, policy, preemption, checkpointer):
        """Train the rest of the current epoch, saving when the policy says; stop early on a signal.

        Every rank checks in (:meth:`agree`) after each optimizer step (and once before
        the first), so that all stop at the same batch boundary and save at the same step.
        """
        controller, position, world = self.controller, self.controller.position, self.distribution
        position.epoch = controller.current_epoch
        self.started = time.perf_counter()
        self.model.train()
        device = module_device(self.model)
        batches = self.database.shard_batches("train", controller.batch_size,
                                              order=self.database.epoch_order(position.epoch),
                                              start=position.samples_done, rank=world.rank, world_size=world.world_size)
        bar = self.report.bar(self.n_train, position.samples_done, f"epoch {position.epoch}")
        with contextlib.closing(bar):
            if self.agree(preemption):  # a signal that came while the run was set up
                return
            for batch_inputs, batch_targets, n, step_size in batches:
                inputs = [t.to(device) for t in batch_inputs]
                targets = [t.to(device) for t in batch_targets]
                controller.optimizer.zero_grad(set_to_none=True)
                outputs = as_tuple(self.trained(*inputs))
                loss = loss_value(self.loss_fn(*outputs, *targets))
                weight = n * world.world_size / step_size  # 1 but in a data-parallel run's last, uneven step
                (loss if weight == 1 else loss * weight).backward()
                world.average_gradients(self.loss_parameters)
                failure = self.staged(checkpointer)
                controller.optimizer.step()
                position.samples_done += step_size
                position.step += 1
                bar.update(step_size)
                if n:  # not for a stand-in sample (see Database.shard_batches)
                    _call_all(self.batch_callbacks, inputs, outputs, targets)
                due = position.samples_done < self.n_train and policy.due(position.step)
                # every rank checks in after each step: all stop at the same batch boundary, save at the same step
                if self.agree(preemption, due, float(loss.detach()) * n, failure):
                    return
                if self.due:
                    checkpointer.save()
                    policy.saved()

    def staged(self, checkpointer):
        """Wait for the save in flight to have copied the state; in a data-parallel run, return its error."""
        if not self.distribution.active:
            checkpointer.staged()
            return None
        try:
            checkpointer.staged()
        except Exception as e:  # raised on every rank at the next agreement
            return e
        return None

    def evaluate(self):
        """The validation metrics, computed on rank 0 and the same on every rank."""
        world = self.distribution
        metrics = world.on_writer(lambda: self.evaluator.evaluate("valid", batch_size=self.controller.eval_batch_size))
        return world.broadcast(metrics)

    def evaluate_best(self, checkpointer):
        """Evaluate the best model on every non-empty split (rank 0); keep and write the results."""
        tracker = self.metric_tracker
        if tracker.best_model_state is None:
            return

        def evaluate():
            last = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(tracker.best_model_state)
            try:
                return {split: self.evaluator.evaluate(split, database=self.database,
                                                       batch_size=self.controller.eval_batch_size)
                        for split in SPLITS if self.database.split_size(split) > 0}
            finally:
                self.model.load_state_dict(last)

        results = self.distribution.broadcast(self.distribution.on_writer(evaluate))
        tracker.evaluations["best"] = results
        if self.distribution.writer:
            checkpointer.write_results(BEST_EVALUATION_NAME, {"best_epoch": tracker.best_epoch, "results": results})
            self.report.line("best model (epoch %s): %s" % (tracker.best_epoch, "; ".join(
                f"{split} " + ", ".join(f"{k} {v:.6g}" for k, v in values.items())
                for split, values in results.items())))

    def end_epoch(self, policy, preemption, checkpointer):
        """Evaluate, record, step the controller, save the epoch's files."""
        controller, tracker = self.controller, self.metric_tracker
        position = controller.position
        epoch = position.epoch
        metrics = {"train": {"loss": position.loss_sum / self.n_train}, "valid": self.evaluate()}
        learning_rates = [group["lr"] for group in controller.optimizer.param_groups]  # those of this epoch
        better = tracker.register_metrics(metrics, epoch, epoch_time=time.perf_counter() - self.started,
                                          learning_rates=learning_rates)
        if better:
            tracker.record_best_model(self.model)
        controller.push_epoch(epoch, better, tracker.stopping_value(metrics))
        controller.position = TrainingPosition(epoch=epoch + 1, step=position.step, interrupted=preemption.requested)
        _call_all(self.callbacks, epoch, better)
        checkpointer.save(policy.files(epoch, better))
        policy.saved()
        if self.distribution.writer:
            self.report.epoch(epoch, controller.max_epochs, metrics, tracker, better,
                              time.perf_counter() - self.started)
