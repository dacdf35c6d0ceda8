"""Checkpointing a training run: what one save of ``train_model`` writes, now or in the background.

:class:`RunCheckpointer` owns the run directory's
:class:`~experiment_io.storage.writer.RunWriter` for the life of a run. It writes the
structure file once, then, at each save, builds the payloads of the files the
save policy asked for and writes them, synchronously or through a
:class:`~experiment_io.training.asynchronous.BackgroundWriter`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from typing import TYPE_CHECKING, Any, Iterator, cast

import torch

from experiment_io.training.asynchronous import BackgroundWriter
from experiment_io.storage.appended import AppendedFile
from experiment_io.storage.run_directory import RunPlace, as_run_directory
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import (BEST_MODEL_NAME, BEST_NAME, LAST_NAME, METRICS_CSV_NAME, STRUCTURE_NAME,
                                        checkpoint_payload, epoch_checkpoint_name, epoch_model_name, model_payload,
                                        _tensor_bytes, main_module_names, run_status, save_payloads, structure_payload,
                                        unpicklable_part)
from experiment_io.experiment.devices import module_device
from experiment_io.training.distributed import SINGLE
from experiment_io.errors import CheckpointWriteError, RunExistsError, SetupError
from experiment_io.training.policy import EpochFiles
from experiment_io.format.codec import HEADER_KEY
from experiment_io.training.provenance import process_provenance
from experiment_io.training.retention import epoch_of
from experiment_io.storage.verification import is_retired
from experiment_io.experiment.rng import get_rng_state

if TYPE_CHECKING:
    from experiment_io.experiment.controllers import Controller
    from experiment_io.experiment.metric_tracker import MetricTracker
    from experiment_io.experiment.training_modules import TrainingModules
    from experiment_io.storage.lock import RunLock
    from experiment_io.training.distributed import Distribution

__all__ = ["RunCheckpointer"]

log = logging.getLogger(__name__)

#: With ``async_save``, a checkpoint whose tensors hold fewer bytes than this is written synchronously: below
#: it, handing the save to the background thread costs training more than the write itself (measured on the
#: small model of ``benchmarks/bench_small.py``).
ASYNC_MIN_BYTES = 8 * 1024 * 1024


def _run_exists_message(directory, status, continues):
    started = ("the objects given were loaded from another run" if continues
               else "a new run was started there")
    return (f"{directory} holds the checkpoints of another run ({status.describe()}), and {started}: training "
            "would replace that run, its best model included. To go on:\n"
            f"  - resume that run: check = load_checkpoint_from_cwd(directory={directory!r}); "
            "train_model(**check, ...) "
            "(or the one script for start and restart: check = load_checkpoint_from_cwd(missing_ok=True) "
            "or start_fresh());\n"
            "  - replace it: train_model(..., overwrite=True);\n"
            "  - keep it: train in another directory, train_model(..., directory='another/run').")


def _unpicklable_error(training_modules, controller, error):
    model, loss, evaluator = training_modules
    for name, obj in (("model", model), ("loss", loss), ("evaluator", evaluator), ("controller", controller)):
        found = unpicklable_part(name, obj)
        if found is not None:
            path, part, part_error = found
            break
    else:  # nothing of the experiment fails to pickle alone: not a pickling problem, the original error stands
        return error
    what = getattr(part, "__qualname__", type(part).__name__)
    return SetupError(
        f"the experiment cannot be stored: {path} holds {what!r}, which cannot be pickled ({part_error}). "
        "The structure file refers to functions and classes by their import path, so a lambda, a function "
        "defined inside another function, or an open file cannot be stored. Define it with def (or as a "
        "torch.nn.Module) at the top level of a module that the training and prediction scripts both import.")


def _descriptor(database, directory):
    """The database's descriptor, with where its data file is relative to the run directory (a run moved or copied
    with its data finds it there)."""
    if not getattr(database, "restartable", False):
        return None
    descriptor = database.descriptor()
    path = descriptor["kwargs"].get("path")
    if isinstance(path, str):
        try:
            descriptor["run_relative_path"] = os.path.relpath(path, directory)
        except ValueError:  # another drive (Windows): only the absolute path
            pass
    return descriptor


class RunCheckpointer:
    """Writes the checkpoint files of one training run.

    With ``async_save`` a save copies the state into staging buffers and writes it
    in a background thread; with ``async_save=True`` the parameters and optimizer
    state are copied by that thread, and :meth:`staged` waits for that copy before
    the state may change. :meth:`committing` makes sure the last save has committed
    before training ends. The structure file is always written at once.

    In a data-parallel run every rank takes part in every save (each rank's random
    streams are gathered), but only global rank 0 writes; the other ranks wait for a
    synchronous write (and raise if it fails), not for a write in the background;
    all ranks meet once the last save has committed.

    :param directory: the run's :class:`~experiment_io.storage.run_directory.RunDirectory`, storage or directory.
    :param resuming: the objects continue a run: keep an intact structure file instead of writing one.
    :param continues: the digest of the structure file the objects were loaded from: only the
        run of that structure file is continued.
    :param overwrite: start a new run even over the committed checkpoints of another run
        (:class:`~experiment_io.errors.RunExistsError` otherwise).
    :param async_save: ``False``, ``True`` or ``"copy"``.
    :param distribution: the run's :class:`~experiment_io.training.distributed.Distribution`.
    :param lock: the run's :class:`~experiment_io.RunLock` (checked before each save).
    """

    def __init__(self, directory: RunPlace, training_modules: TrainingModules,
                 controller: Controller, metric_tracker: MetricTracker, database: Any, *, resuming: bool,
                 continues: str | None = None, overwrite: bool = False, async_save: bool | str = False,
                 distribution: Distribution = SINGLE, lock: RunLock | None = None):
        self.training_modules, self.controller = training_modules, controller
        self.metric_tracker, self.database = metric_tracker, database
        self.distribution, self.lock = distribution, lock
        self.writer: RunWriter | None = None
        self.history: AppendedFile | None = None
        self.background: BackgroundWriter | None = None
        self.overlap = async_save is True
        distribution.on_writer(lambda: self._start(directory, resuming, continues, overwrite, async_save))

    def _start(self, directory, resuming, continues, overwrite, async_save):
        """Rank 0: keep the structure file of the run that goes on, or write a new one (never over another run's
        checkpoints unless ``overwrite``)."""
        training_modules, controller, database = self.training_modules, self.controller, self.database
        run = as_run_directory(directory)
        self.writer = run.writer
        directory = run.location
        existing = self.writer.record(STRUCTURE_NAME)
        # the run in the directory goes on: the one the objects were loaded from (or, for objects restored
        # by hand, whatever run is there)
        same_run = existing is not None and (existing["digest"] == continues if continues else resuming)
        last = self.writer.record(LAST_NAME) or {}
        self.resumes = 0
        if same_run and self.writer.has_intact(STRUCTURE_NAME):
            log.info("resuming: keeping the existing %s", STRUCTURE_NAME)
            previous = last.get("resumes", 0)
            self.resumes = (previous if isinstance(previous, int) else 0) + (1 if last else 0)
        else:
            status = run_status(self.writer.files) if existing is not None else None
            if same_run:  # this very run, whose structure file is damaged or missing: written again
                log.warning("%s of the run in %s does not verify; it is written again from the objects being trained",
                            STRUCTURE_NAME, directory)
            elif status is not None and not overwrite:
                raise RunExistsError(_run_exists_message(directory, status, continues))
            elif status is not None:
                log.warning("starting a new run in %s with overwrite=True: it replaces the run there (%s)",
                            directory, status.describe())
            descriptor = _descriptor(database, directory)
            try:
                save_payloads(self.writer,
                              {STRUCTURE_NAME: structure_payload(training_modules, controller, descriptor)})
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                explained = _unpicklable_error(training_modules, controller, e)
                if explained is e:
                    raise
                raise explained from e
            local = main_module_names(self.writer.path(STRUCTURE_NAME))
            if local:
                log.warning(
                    "%s are defined in the script being run (__main__): the structure file names them so, and a "
                    "restart or prediction script cannot import them from there. Move them into a module that "
                    "every script imports, or hand them to the loaders: load_model_from_cwd(allow=[%s])",
                    ", ".join(n.split(".", 1)[1] for n in local), ", ".join(n.split(".", 1)[1] for n in local))
        self.structure_digest = self.writer.record(STRUCTURE_NAME)["digest"]
        self.background = BackgroundWriter() if async_save else None
        # the metric history: appended at each epoch, never rewritten (a run of n epochs costs n, not n squared);
        # it starts again at the rows of the tracker it continues, dropping what a lost save appended
        self.history = AppendedFile(run.storage, METRICS_CSV_NAME)
        self.history.start(self.metric_tracker.to_csv().encode("utf-8"))
        self._history_header = self.metric_tracker.csv_header()
        self._history_rows = len(self.metric_tracker.epochs)

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

    def staged(self) -> None:
        """Wait until the save in flight has copied what it deferred (before the optimizer step)."""
        if self.background is not None:
            self.background.staged()

    def save(self, epoch_files: EpochFiles | None = None) -> None:
        """Save the run at the controller's position.

        :param epoch_files: at the end of an epoch, the further files to write;
            ``None`` for a mid-epoch save (``last_checkpoint.pt`` only).
        """
        rng_states = self.distribution.gather(get_rng_state())
        # a failure on rank 0 (disk full...) is raised on every rank, not left for them to wait on
        self.distribution.on_writer(lambda: self._write(epoch_files, rng_states))

    def _write(self, epoch_files, rng_states):
        """Rank 0: build the payloads and write them (or hand them to the background writer)."""
        if self.lock is not None:
            self.lock.check()  # never write a directory whose lock another process may hold now
        position = self.controller.position
        history = self._append_history() if epoch_files is not None else cast(AppendedFile, self.history).record()
        payload = checkpoint_payload(self.training_modules, self.controller, self.metric_tracker, self.database,
                                     self.structure_digest, rng_states,
                                     {"file": METRICS_CSV_NAME, **history.as_dict()})
        files = {LAST_NAME: payload}
        model_file = model_payload(payload["model"], position.epoch, position.step, self.structure_digest,
                                   module_device(self.training_modules.model), self.distribution.world_size)
        # where the files come from: recorded in their manifest records (never a reason for a save to fail)
        for header in (payload[HEADER_KEY], model_file[HEADER_KEY]):
            header.update(process_provenance(), resumes=self.resumes)
        if epoch_files is not None and epoch_files.best:
            files[BEST_NAME] = payload
            files[BEST_MODEL_NAME] = model_file
        retention = (), None
        if epoch_files is not None:
            ended = position.epoch - 1  # files are named by the 0-based epoch that just ended
            keep, retention = self._retention(epoch_files, ended)
            if keep:
                files[epoch_checkpoint_name(ended)] = payload
                files[epoch_model_name(ended)] = model_file
        # the history as far as this save goes, committed with it
        appended = {METRICS_CSV_NAME: (self.history, history, {"kind": "metrics", "rows": self._history_rows})}
        if self.background is not None and _tensor_bytes(payload) < ASYNC_MIN_BYTES:
            # a small save is quicker written here than handed over: the background thread would compete with
            # training for the interpreter for longer than the write takes
            self.background.wait()
            save_payloads(self.writer, files, *retention, appended, durable=False)
            log.debug("saved %s (small: written synchronously)", ", ".join(files))
        elif self.background is not None:
            self.background.submit(files,
                                   lambda staged: save_payloads(self.writer, staged, *retention, appended,
                                                                 durable=False),
                                   f"{', '.join(files)} in {self.writer.directory}",
                                   defer=self._deferrable() if self.overlap else ())
            log.debug("saving %s in the background", ", ".join(files))
        else:
            save_payloads(self.writer, files, *retention, appended, durable=False)
            log.debug("saved %s", ", ".join(files))

    def _append_history(self):
        """Rank 0, at an epoch's end: append the rows of the epochs the file does not hold yet; its record."""
        tracker, history = self.metric_tracker, cast(AppendedFile, self.history)
        header = tracker.csv_header()
        if header != self._history_header or len(tracker.epochs) < self._history_rows:
            # a metric or a parameter group appeared (or the history was cut): the file is written again once
            if self.background is not None:
                self.background.wait()  # the save in flight makes the file it has durable first
            # what it held stays where the checkpoints saved so far find it (none refers to a file without rows)
            history.start(tracker.to_csv().encode("utf-8"), keep_earlier=self._history_rows > 0)
            self._history_header = header
        else:
            history.append(tracker.csv_rows(self._history_rows).encode("utf-8"))
        self._history_rows = len(tracker.epochs)
        return history.record()

    def _retention(self, epoch_files, ended):
        """Whether to write the files of the epoch that ``ended``; the epoch files to remove, and why each kept one
        is kept (``{name: "last 3, every 10"}``)."""
        retention = epoch_files.retention
        if retention is None:
            return epoch_files.keep, ((), None)
        tracker = self.metric_tracker
        # a snapshot (one C-level copy): a save in flight in the background may be changing the records
        names = [name for name, record in list(self.writer.files.items())
                 if epoch_of(name) is not None and not is_retired(record)]
        existing = {epoch_of(name) for name in names} - {ended}
        values = tracker.stopping_values(existing | {ended})  # the kept epochs only: no cost that grows with the run
        keep = epoch_files.keep and retention.keeps(ended, existing, values, tracker.larger_is_better)
        kept = retention.reasons(existing | ({ended} if keep else set()), values, tracker.larger_is_better)
        if keep:
            names += [epoch_checkpoint_name(ended), epoch_model_name(ended)]
        why = {name: ", ".join(kept[epoch_of(name)]) for name in names if epoch_of(name) in kept}
        return keep, (sorted(name for name in names if epoch_of(name) not in kept), why)

    def write_results(self, name: str, document: Any) -> None:
        """Rank 0: write ``document`` as JSON into the run directory (atomically, recorded in the manifest)."""
        data = json.dumps(document, indent=1, sort_keys=True).encode("utf-8")
        # called on rank 0 only, whose writer exists
        cast(RunWriter, self.writer).save_files({name: (lambda f: f.write(data), {"kind": "results"})})

    @contextlib.contextmanager
    def committing(self) -> Iterator[RunCheckpointer]:
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
                    add_note = getattr(e, "add_note", None)  # Python 3.11+; 3.10 has the log line alone
                    if add_note is not None:
                        add_note(f"The checkpoint written in the background failed too: {background_error!r}")
            try:
                self._close_history()
            except CheckpointWriteError as durability_error:  # the exception on its way out stays the one raised
                log.error("%s", durability_error)
            raise
        # every rank waits until the last save has committed, and learns if it failed
        try:
            self.distribution.on_writer(lambda: self.background.wait() if self.background is not None else None)
        finally:
            self._close_history()
        self.distribution.barrier()

    def _close_history(self):
        """Wait until the last save is durable (it was made durable behind the loop), then close the history."""
        try:
            if self.writer is not None:
                self.writer.wait_durable()
        finally:
            if self.history is not None:
                self.history.close()
