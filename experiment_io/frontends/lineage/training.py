"""One ``train()`` call of a checkpoint block: its epochs, its progress saves, a resume, a stop on a signal.

The call is made of the library's loop pieces: a
:class:`~experiment_io.training.policy.SavePolicy` says when a progress save is due
mid-epoch (``save_every`` batches, ``save_every_seconds``), a
:class:`~experiment_io.training.preemption.Preemption` turns SIGTERM, SIGUSR1 and
SIGINT into a request to stop at the next batch boundary, the progress display is a
:class:`~experiment_io.training.progress.Report`, and the random streams are those
of :mod:`experiment_io.experiment.rng` (with the DataLoaders' own generators).

A stop on a signal writes the progress save and then acts as
:func:`~experiment_io.train_model` does: after SIGTERM or SIGUSR1 the process exits
with :data:`~experiment_io.training.preemption.PREEMPTED_EXIT_CODE` (75), so that a
scheduler requeues it; after SIGINT (or with ``exit_on_preemption=False``) the call
raises :class:`KeyboardInterrupt`. Either way the block stays unfinished, and the
call continues from its progress save when the block runs again.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, cast

import torch

from experiment_io.errors import IncompatibleCheckpointError, SetupError
from experiment_io.frontends.lineage import streams
from experiment_io.frontends.lineage.batches import (as_float, batch_size, forward, mean_pass, metric_name, samples,
                                                     snapshot, split_batch, to_device)
from experiment_io.frontends.lineage.recipes import quiet_scheduler
from experiment_io.frontends.lineage.records import PROGRESS_NAME, record_write
from experiment_io.training.policy import SavePolicy
from experiment_io.training.preemption import Preemption, Stop
from experiment_io.training.progress import Report

if TYPE_CHECKING:
    from experiment_io.frontends.lineage.model import Model

__all__ = ["CallSpec", "Finished", "call_spec", "save_policy", "train_call"]

log = logging.getLogger(__name__)

_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "rmse")


@dataclass(frozen=True)
class CallSpec:
    """What one ``train()`` call is.

    :ivar index: its position in the block (from 0).
    :ivar key: its arguments as the cache stores and compares them.
    :ivar metrics: the metric functions; :attr:`names` their names.
    :ivar validates: whether it has a validation DataLoader (the watched value is then measured there).
    """

    index: int
    key: dict
    metrics: tuple
    names: tuple
    validates: bool

    @property
    def watched(self) -> str:
        """The name of the watched value in the history: ``val_<watch>`` or ``train_<watch>``."""
        return f"{'val' if self.validates else 'train'}_{self.key['watch']}"


def call_spec(index: int, train_dl: Iterable, val_dl: Optional[Iterable], *, epochs: int, watch: str,
              mode: Optional[str], load_best: bool, metrics: Sequence[Callable]) -> CallSpec:
    """The :class:`CallSpec` of a ``train()`` call with these arguments.

    :raises SetupError: for arguments a call cannot train with.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise SetupError(f"epochs must be a positive integer, not {epochs!r}")
    names = [metric_name(fn) for fn in metrics]
    if len(set(names)) != len(names) or "loss" in names:
        raise SetupError(f"metric names must be distinct and not 'loss': {names}")
    if watch != "loss" and watch not in names:
        raise SetupError(f"watch={watch!r} is neither 'loss' nor one of the metrics {names}")
    if mode is None:
        declared = getattr(metrics[names.index(watch)], "higher_is_better", None) if watch != "loss" else None
        if declared is not None:
            mode = "max" if declared else "min"
        else:
            mode = "min" if watch == "loss" or any(w in watch.lower() for w in _LOWER_IS_BETTER) else "max"
    if mode not in ("min", "max"):
        raise SetupError(f"mode must be 'min' or 'max', not {mode!r}")
    key = {"epochs": epochs, "watch": watch, "mode": mode, "load_best": bool(load_best), "metrics": names,
           "train_samples": samples(train_dl), "val_samples": samples(val_dl) if val_dl is not None else None}
    return CallSpec(index, key, tuple(metrics), tuple(names), val_dl is not None)


def save_policy(save_every: Optional[int], save_every_seconds: Optional[float]) -> SavePolicy:
    """The save policy of ``train(save_every=..., save_every_seconds=...)``.

    :raises SetupError: for a count that is not a positive integer, or a time that is not positive.
    """
    if save_every is not None and (isinstance(save_every, bool) or not isinstance(save_every, int)
                                   or save_every < 1):
        raise SetupError(f"save_every must be a positive integer or None, not {save_every!r}")
    if save_every_seconds is not None and not (isinstance(save_every_seconds, (int, float))
                                               and save_every_seconds > 0):
        raise SetupError(f"save_every_seconds must be positive or None, not {save_every_seconds!r}")
    return SavePolicy(every_batches=save_every or 0, every_seconds=save_every_seconds)


@dataclass
class Finished:
    """A call trained to its end: what its block commits.

    :ivar result: what ``train()`` returns (history, watched value, best epoch and value).
    :ivar key: the call's arguments (:attr:`CallSpec.key`).
    :ivar rng: the random streams at its end.
    :ivar end_states: the model's states at its end (live tensors).
    :ivar backup: the best epoch's states when the call did not end on them, else ``None``.
    """

    result: dict
    key: dict
    rng: dict
    end_states: dict
    backup: Optional[dict]


def train_call(model: "Model", cp_id: str, where: str, spec: CallSpec, train_dl: Iterable,
               val_dl: Optional[Iterable], *, policy: SavePolicy, signals: Iterable, exit_on_preemption: bool,
               lost_start: Optional[str], commit: Callable[[Finished], None]) -> dict:
    """Train one call (or continue it from its progress save), then ``commit`` it; signals stop it.

    The signals are handled from the start of the call until it is committed: one that
    arrives while the call ends stops the process all the same, once it is committed.

    :param lost_start: raise an :class:`~experiment_io.errors.IncompatibleCheckpointError`
        with this message when no progress save fits the call (the state it starts
        from is gone); ``None``: the model holds that state.
    :param commit: writes the finished call into its block.
    :return: the call's result.
    :raises SystemExit: with status 75 after SIGTERM or SIGUSR1 (``exit_on_preemption``).
    :raises KeyboardInterrupt: after SIGINT, or a preemption without ``exit_on_preemption``.
    """
    preemption = Preemption(signals, exit_on_preemption=exit_on_preemption)
    with preemption:
        run = _Call(model, cp_id, where, spec, train_dl, val_dl, policy)
        stop = run.run(preemption, lost_start)
        if stop is None:
            finished = run.finish()
            commit(finished)
            if preemption.requested is None:
                return finished.result
            log.warning("%s: %s received while train() call %d ended; the call is committed", where,
                        preemption.requested, spec.index + 1)
            stop = Stop.by_signal(preemption.requested)
    preemption.finish(stop)  # exits with status 75 after a scheduler's signal, as train_model does
    raise KeyboardInterrupt(f"{where}: train() call {spec.index + 1} {stop.text}; run the block again to continue it")


class _Call:
    """The epochs of one call; a resume from its progress save."""

    def __init__(self, model: "Model", cp_id: str, where: str, spec: CallSpec, train_dl: Iterable,
                 val_dl: Optional[Iterable], policy: SavePolicy):
        self.model, self.cp_id, self.where, self.spec = model, cp_id, where, spec
        self.train_dl, self.val_dl = train_dl, val_dl
        self.policy = policy
        self.report = Report(model.quiet)
        self.history: dict[str, list] = {}
        self.best: Optional[dict] = None

    def _better(self, value):
        if self.best is None:
            return True
        if math.isnan(value):
            return False
        return value < self.best["value"] if self.spec.key["mode"] == "min" else value > self.best["value"]

    def _random(self):
        return streams.capture(self.train_dl, self.val_dl)

    def _progress(self):
        """The progress save of this call, when one fits it (else ``None``)."""
        model, spec = self.model, self.spec
        if not model.records.has(self.cp_id, PROGRESS_NAME):
            return None
        progress = model.records.read(self.cp_id, PROGRESS_NAME)
        if progress["call"] != spec.index or progress["key"] != spec.key:
            log.warning("%s: the progress save of an interrupted train() call (call %d, %s) does not fit this call "
                        "(call %d, %s); training it from its start", self.where, progress["call"] + 1,
                        progress["key"], spec.index + 1, spec.key)
            return None
        return progress

    def _save_progress(self, epoch, batch, random_start, running):
        model = self.model
        progress = {"call": self.spec.index, "key": self.spec.key, "epoch": epoch, "batch": batch,
                    "random_epoch_start": random_start, "random": self._random(), "states": model.states(),
                    "history": self.history, "running": running, "best": self.best}
        model.records.save(self.cp_id, {PROGRESS_NAME: record_write(progress, "progress", epochs_done=model.epoch,
                                                                     step=model.step)})
        self.policy.saved()

    def _new_running(self):
        """The sums of an epoch so far, and the learning rate it started with."""
        return {"loss": 0.0, "count": 0, "lr": self.model.optimizer.param_groups[0]["lr"],
                **{n: 0.0 for n in self.spec.names}}

    def _stopped(self, preemption, when):
        log.warning("%s: train() call %d interrupted by %s %s; %s written", self.where, self.spec.index + 1,
                    preemption.requested, when, PROGRESS_NAME)
        return Stop.by_signal(preemption.requested)

    def run(self, preemption: Preemption, lost_start: Optional[str]) -> Optional[Stop]:
        """Train the call's epochs, from its progress save if one fits; return the stop a signal asked for, or
        ``None`` once every epoch is trained."""
        model, key = self.model, self.spec.key
        progress = self._progress()
        if progress is not None:
            model.set_states(progress["states"])
            self.history, self.best = progress["history"], progress["best"]
            start_epoch, start_batch = progress["epoch"], progress["batch"]
            # where the interrupted epoch began (its order is drawn again), or where the call stood
            streams.restore(progress["random_epoch_start"] if start_batch else progress["random"], self.train_dl,
                            self.val_dl)
            if start_epoch or start_batch:
                at = ("after its last epoch" if start_epoch == key["epochs"]
                      else f"at epoch {start_epoch + 1} of {key['epochs']}, batch {start_batch}")
                log.warning("%s: continuing the interrupted train() call %d %s", self.where, self.spec.index + 1, at)
        else:
            if lost_start is not None:
                raise IncompatibleCheckpointError(lost_start)
            names = self.spec.names
            self.history = {"epoch": [], "lr": [], "train_loss": [], **{f"train_{n}": [] for n in names}}
            if self.val_dl is not None:
                self.history.update({"val_loss": [], **{f"val_{n}": [] for n in names}})
            start_epoch, start_batch = 0, 0
            # the state the call starts from: a call interrupted before its first save starts there again
            self._save_progress(0, 0, None, None)
        self.policy.saved()
        for epoch in range(start_epoch, key["epochs"]):
            if preemption.requested is not None:  # the progress save holds the epochs so far
                return self._stopped(preemption, f"before epoch {model.epoch + 1}")
            resuming = progress is not None and epoch == start_epoch and start_batch
            random_start = progress["random_epoch_start"] if resuming else self._random()
            stop = self._epoch(epoch, random_start, progress if resuming else None, start_batch if resuming else 0,
                               preemption)
            if stop is not None:
                return stop
        return None

    def _epoch(self, epoch, random_start, progress, skip, preemption):
        """Train epoch ``epoch`` of the call (its first ``skip`` batches were trained before a resume); return the
        stop a signal asked for (after a progress save at the batch boundary), or ``None`` when the epoch ended."""
        model, spec = self.model, self.spec
        module, loss_fn, optimizer, device = model.model, model.loss_fn, model.optimizer, model.device
        started = time.monotonic()
        batches = iter(self.train_dl)
        for _ in range(skip):  # the same order as before the interruption: its batches are read, not trained on
            next(batches)
        if skip:
            streams.restore(progress["random"], self.train_dl, self.val_dl)
            running = dict(progress["running"])
        else:
            running = self._new_running()
        total = samples(self.train_dl)
        bar = self.report.bar(total or 0, running["count"], f"{self.where}, epoch {model.epoch + 1}")
        module.train()
        index = skip
        try:
            for batch in batches:
                inputs, targets = to_device(split_batch(batch), device)
                optimizer.zero_grad()
                outputs = forward(module, inputs)
                loss = loss_fn(outputs, targets)
                loss.backward()
                optimizer.step()
                if model.step_scheduler is not None:
                    with quiet_scheduler():
                        model.step_scheduler.step()
                model.step += 1
                index += 1
                n = batch_size(targets)
                running["loss"] += as_float(loss) * n
                running["count"] += n
                with torch.no_grad():
                    for name, fn in zip(spec.names, spec.metrics):
                        running[name] += as_float(fn(outputs.detach(), targets))
                bar.update(n)
                if preemption.requested is not None:  # at this batch boundary: save, then stop
                    self._save_progress(epoch, index, random_start, running)
                    of = f" of {total}" if total is not None else ""
                    return self._stopped(preemption, f"in epoch {model.epoch + 1} after {running['count']}{of} samples")
                if self.policy.due(model.step):
                    self._save_progress(epoch, index, random_start, running)
        finally:
            bar.close()
        self._end_epoch(epoch, running, started)
        return None

    def _end_epoch(self, epoch, running, started):
        """Validate, step the epoch scheduler, keep the best epoch, write the progress save."""
        model, spec = self.model, self.spec
        if not running["count"]:
            raise SetupError(f"{self.where}: the training DataLoader yielded no batch")
        values = {f"train_{n}": running[n] / running["count"] for n in ("loss",) + spec.names}
        if self.val_dl is not None:
            sums, count = mean_pass(model.model, model.loss_fn, model.device, self.val_dl, spec.names, spec.metrics)
            if not count:
                raise SetupError(f"{self.where}: the validation DataLoader yielded no batch")
            values.update({f"val_{n}": sums[n] / count for n in ("loss",) + spec.names})
        lr = running["lr"]
        scheduler = model.epoch_scheduler
        if scheduler is not None:
            with quiet_scheduler():
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(values[spec.watched])
                else:
                    scheduler.step()
        model.epoch += 1
        self.history["epoch"].append(model.epoch)
        self.history["lr"].append(lr)
        for name, value in values.items():
            self.history[name].append(value)
        value = values[spec.watched]
        better = self._better(value)
        if better:
            self.best = {"value": value, "epoch": model.epoch, "states": snapshot(model.states())}
        best = self.best
        shown = ", ".join(f"{n} {v:.4g}" for n, v in values.items())
        self.report.line(f"{self.where}: epoch {model.epoch} ({epoch + 1} of {spec.key['epochs']} in this call, "
                         f"{time.monotonic() - started:.1f} s): {shown}, lr {lr:.3g}"
                         + ("; best so far" if better
                            else f"; best {spec.watched} {best['value']:.4g} at epoch {best['epoch']}"))
        self._save_progress(epoch + 1, 0, None, None)

    def finish(self) -> Finished:
        """The call at its end: on its best epoch's states with ``load_best``, else with them as a backup."""
        model, key, best = self.model, self.spec.key, cast(dict, self.best)  # set by the first epoch that ended
        backup = None
        if best["epoch"] != model.epoch:
            if key["load_best"]:
                optimizer = cast(torch.optim.Optimizer, model.optimizer)  # train() checked there is one
                lrs = [group["lr"] for group in optimizer.param_groups]
                model.model.load_state_dict(best["states"]["model"])
                if isinstance(model.loss_fn, torch.nn.Module) and best["states"].get("loss"):
                    model.loss_fn.load_state_dict(best["states"]["loss"])
                optimizer.load_state_dict(best["states"]["optimizer"])
                for group, lr in zip(optimizer.param_groups, lrs):  # the schedulers keep their end state
                    group["lr"] = lr
                log.info("%s: ended on the best epoch %d (%s %.4g)", self.where, best["epoch"], self.spec.watched,
                         best["value"])
            else:
                backup = best["states"]
        result = {"history": self.history, "watch": self.spec.watched, "best_epoch": best["epoch"],
                  "best_value": best["value"]}
        return Finished(result, key, self._random(), model.states(), backup)
