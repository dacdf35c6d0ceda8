"""A checkpoint block: ``with model.checkpoint(id) as cp: cp.setup(...); cp.train(...)``.

A block checks on entry that it continues from the state it continued from when it
was first run (its parent checkpoint, as loaded then), sets up the components it
names, and trains or reads back each ``train()`` call by its position. Its record
(``block.pt``) holds the parent, the recipe, each call's result with the random
streams at its end, and whether the block ran to its end.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, cast

import torch

from experiment_io.errors import IncompatibleCheckpointError, SetupError
from experiment_io.experiment.training_modules import Evaluator, TrainingModules
from experiment_io.frontends.lineage import streams
from experiment_io.frontends.lineage.batches import snapshot
from experiment_io.frontends.lineage.holding import load_arguments, parent_of
from experiment_io.frontends.lineage.plots import plot_results
from experiment_io.frontends.lineage.recipes import COMPONENTS, Recipe, carry_count, check_class, plain
from experiment_io.frontends.lineage.records import (BACKUP_NAME, BLOCK_NAME, PROGRESS_NAME, STATE_NAME, check_pair,
                                                     is_cache_file, payload_write, record_write)
from experiment_io.frontends.lineage.training import Finished, call_spec, save_policy, train_call
from experiment_io.run.payloads import BEST_MODEL_NAME, STRUCTURE_NAME, model_payload, structure_payload
from experiment_io.storage.lock import RunLock
from experiment_io.training.preemption import DEFAULT_SIGNALS
from experiment_io.training.progress import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from experiment_io.frontends.lineage.model import Model

__all__ = ["CheckpointBlock"]

log = logging.getLogger(__name__)


class CheckpointBlock:
    """One checkpoint block of a :class:`Model` (use ``with model.checkpoint(id) as cp``)."""

    def __init__(self, model: "Model", cp_id: str, description: Optional[str]):
        self.model = model
        self.id = cp_id
        self.description = description
        self.directory = model.records.path(cp_id)
        self._where = f"checkpoint {cp_id} of model {model.id}"
        self._calls = 0
        self._setup_done = False
        self._state_loaded = False
        self._rng_restored = False
        self._entered_midway = False
        self._loaders: tuple = ()
        self._record: Optional[dict] = None
        self._lock: Optional[RunLock] = None

    def __enter__(self) -> "CheckpointBlock":
        self._lock = self.model.records.lock(self.id)
        self._lock.__enter__()
        try:
            self._check_entry()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def _check_entry(self):
        """Whether this block may run from what the model holds now; sets its parent."""
        model = self.model
        record = self._record = model.records.block(self.id)
        if record is not None:
            model.check_fingerprint(record, self._where, self.id)
        self._entered_midway = model.holding.midway_in(self.id)
        self._parent, self._parent_token = parent_of(model, record, self.id, self._where)
        self._recipe = Recipe.of(model.recipe)

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        try:
            if kind is None:
                self._finish()
        finally:
            cast(RunLock, self._lock).__exit__(None, None, None)

    # ---------------------------------------------------------------- setup

    def setup(self, *, loss_cls: Optional[type[torch.nn.Module]] = None, loss_args: Optional[dict] = None,
              optimizer_cls: Optional[type[torch.optim.Optimizer]] = None, optimizer_args: Optional[dict] = None,
              epoch_scheduler_cls: Optional[type] = None, epoch_scheduler_args: Optional[dict] = None,
              clear_epoch_scheduler: bool = False, step_scheduler_cls: Optional[type] = None,
              step_scheduler_args: Optional[dict] = None, clear_step_scheduler: bool = False) -> None:
        """Build the components this block names; the others carry over, with their states, from the previous
        checkpoint.

        A component given only ``*_args`` keeps its class with new arguments;
        ``clear_*_scheduler=True`` removes a scheduler. A scheduler that is not named
        while the optimizer is built anew is rebuilt on the new optimizer from its
        recipe, keeping its count of steps.

        :raises SetupError: on a second call, after ``train()``, or for arguments that are not plain data.
        :raises IncompatibleCheckpointError: when the checkpoint on disk was set up
            otherwise (delete it first: ``model.delete_checkpoint(id)``).
        """
        if self._calls:
            raise SetupError(f"setup() comes before train() in a checkpoint block ({self._where})")
        if self._setup_done:
            raise SetupError(f"setup() is called at most once per checkpoint block ({self._where})")
        self._setup_done = True
        given = {"loss": (loss_cls, loss_args, False), "optimizer": (optimizer_cls, optimizer_args, False),
                 "epoch_scheduler": (epoch_scheduler_cls, epoch_scheduler_args, clear_epoch_scheduler),
                 "step_scheduler": (step_scheduler_cls, step_scheduler_args, clear_step_scheduler)}
        recipe = Recipe.of(self.model.recipe)
        named = set()
        for component, (cls, args, clear) in given.items():
            if clear:
                if cls is not None or args is not None:
                    raise SetupError(f"clear_{component}=True goes without {component}_cls and {component}_args")
                recipe[component] = None
                named.add(component)
                continue
            if cls is None and args is None:
                continue
            if cls is None:
                if recipe.get(component) is None:
                    raise SetupError(f"{component}_args without {component}_cls: the model has no {component} to "
                                     "give them to")
                name = recipe[component]["cls"]
            else:
                check_class(component, cls)
                name = self.model.classes.remember(cls)
            recipe[component] = {"cls": name, "args": plain(dict(args or {}), f"{component}_args")}
            named.add(component)
        rebuilt = set()
        if "optimizer" in named:
            for component in ("epoch_scheduler", "step_scheduler"):
                if component not in named and recipe.get(component) is not None:
                    named.add(component)  # rebuilt on the new optimizer, its step count carried
                    rebuilt.add(component)
        self._check_recipe(recipe)
        carried = {c: getattr(self.model, c) for c in rebuilt}
        if named:
            self.model.hold_midway(self.id)  # its components differ from the parent's until the block ends
        self.model.build_components(recipe, self._where, keep=frozenset(COMPONENTS) - named)
        for component, old in carried.items():
            carry_count(old, getattr(self.model, component))
        self._recipe = recipe

    def _check_recipe(self, recipe):
        record = self._record
        if record is None:
            return
        if dict(record["recipe"]) != dict(recipe):
            stored = Recipe.of(record["recipe"])
            differs = [c for c in COMPONENTS if stored.get(c) != recipe.get(c)]
            lines = "; ".join(f"{c}: {stored.describe(c)} on disk, {recipe.describe(c)} now" for c in differs)
            raise IncompatibleCheckpointError(
                f"{self._where} was trained with another set-up ({lines}). Its saved states do not fit the new "
                f"components; delete the checkpoint first to train it anew: {self.model.deletion_hint(self.id)}")

    # ---------------------------------------------------------------- train

    def train(self, train_dl: Iterable, val_dl: Optional[Iterable] = None, *, epochs: int, watch: str = "loss",
              mode: Optional[str] = None, load_best: bool = False, metrics: Sequence[Callable] = (),
              save_every: Optional[int] = None, save_every_seconds: Optional[float] = 60.0,
              signals: Iterable = DEFAULT_SIGNALS, exit_on_preemption: bool = True) -> dict:
        """Train for ``epochs`` epochs, or return this call's cached result.

        Each epoch trains on ``train_dl`` (batches ``(inputs, targets)``), then
        evaluates the loss and ``metrics`` on ``val_dl`` (when given), steps the epoch
        scheduler, and keeps the best epoch by ``watch`` (on ``val_dl`` when given,
        else on the training batches).

        While the call trains, ``signals`` (by default SIGTERM, SIGUSR1 and SIGINT)
        stop it at the next batch boundary, after a progress save: re-running the
        block continues the call from there. After SIGTERM or SIGUSR1 (a scheduler's
        time limit or preemption) the process exits with status
        :data:`~experiment_io.PREEMPTED_EXIT_CODE` (75), as
        :func:`~experiment_io.train_model` does, so that the job is requeued; after
        SIGINT (Ctrl-C, a notebook's interrupt) the call raises
        :class:`KeyboardInterrupt`. A second Ctrl-C raises at once.

        :param watch: ``"loss"`` or a metric's name.
        :param mode: ``"min"`` or ``"max"``; by default what the metric's
            ``higher_is_better`` says (see :func:`metric`); for ``loss`` and
            undecorated names with ``loss``, ``error``, ``mse``, ``mae`` ``"min"``;
            otherwise ``"max"``.
        :param load_best: end on the best epoch's model and optimizer state; the
            schedulers keep their end state, so the next call continues at their
            learning rate. With ``False``, when the best epoch was not the last, its
            states are kept as a backup (``model.load_checkpoint(id, from_backup=True)``).
        :param metrics: metric functions (see :func:`metric`).
        :param save_every: also save progress every this many optimizer steps (counted
            along the lineage, as ``model.step``).
        :param save_every_seconds: also save progress when this much time has passed
            since the last save (``None``: only at epoch ends and ``save_every``).
        :param signals: the signals that stop the call after a progress save (``()``: none).
        :param exit_on_preemption: exit the process with status 75 after a signal other
            than SIGINT; with ``False`` the call raises :class:`KeyboardInterrupt` instead.
        :return: ``{"history": {"epoch": [...], "lr": [...], "train_loss": [...],
            "val_loss": [...], "val_<metric>": [...], ...}, "watch": "val_<watch>",
            "best_epoch": int, "best_value": float}``; epochs are counted along
            the lineage (the first epoch of the model is 1).
        :raises SystemExit: with status 75, see above.
        """
        spec = call_spec(self._calls, train_dl, val_dl, epochs=epochs, watch=watch, mode=mode, load_best=load_best,
                         metrics=metrics)
        policy = save_policy(save_every, save_every_seconds)
        if self.model.loss_fn is None or self.model.optimizer is None:
            raise SetupError(f"{self._where}: train() needs a loss and an optimizer; give them to setup() "
                             "(loss_cls=..., optimizer_cls=...) in this block or an earlier one")
        call = self._calls
        self._calls += 1
        record = self._record
        if record is not None and call < len(record["results"]):
            return self._cached(record, call, spec.key, train_dl, val_dl)
        self._begin()
        lost_start = self._lost_start(call) if self._entered_midway and not self._state_loaded else None
        result = train_call(self.model, self.id, self._where, spec, train_dl, val_dl, policy=policy, signals=signals,
                            exit_on_preemption=exit_on_preemption, lost_start=lost_start,
                            commit=lambda finished: self._commit(finished, (train_dl, val_dl)))
        return copy.deepcopy(result)

    def _cached(self, record, call, key, train_dl, val_dl):
        """The result of cached call ``call``, with the random streams as it left them."""
        cached = record["results"][call]
        if cached["key"] != key:
            log.warning("%s: train() call %d was trained with %s; this run asks %s. The cached result is returned; "
                        "delete the checkpoint to train it again: %s",
                        self._where, call + 1, cached["key"], key, self.model.deletion_hint(self.id))
        if call == len(record["results"]) - 1 and not self._state_loaded:
            self._load_end_state()  # the code after the block's last cached call sees the model it left
        streams.restore(cached["rng"], train_dl, val_dl)
        self._rng_restored = True
        done = cached["result"]
        Report(self.model.quiet).line(
            f"{self._where}: train() call {call + 1} read from the checkpoint "
            f"({len(done['history']['epoch'])} epochs, "
            f"best {done['watch']} {done['best_value']:.4g} at epoch {done['best_epoch']})")
        return copy.deepcopy(cached["result"])

    def _lost_start(self, call):
        """Why call ``call`` cannot start: the model holds what its interrupted run left, not where it starts."""
        record = cast(dict, self._record)
        return (f"{self._where}: the model holds what its interrupted train() call {call + 1} left, and the "
                "progress save of that call is for other arguments, so the state this call starts from is gone "
                "from this session. "
                + (f"Load its parent (model.load_checkpoint({load_arguments(record)}))"
                   if record["parent"] is not None
                   else "Build the model again (re-run the cell that creates it)") + " and run the block again.")

    def _load_end_state(self):
        states = self.model.records.read(self.id, STATE_NAME)
        check_pair(cast(dict, self._record), states, self._where)
        self.model.hold_midway(self.id)  # until the block ends: its parent's state is gone
        self.model.set_states(states)
        self._state_loaded = True

    def _save_record(self):
        self.model.records.save(self.id, {BLOCK_NAME: record_write(cast(dict, self._record), "block")})

    def _ensure_record(self):
        """The block's record, written when the block first trains or ends."""
        model = self.model
        if self._record is None:
            self._record = {"id": self.id, "parent": self._parent, "parent_token": self._parent_token,
                            "token": uuid.uuid4().hex, "fingerprint": model.fingerprint(),
                            "description": self.description or "", "model_description": model.description,
                            "recipe": dict(self._recipe), "results": [], "complete": False, "created": time.time()}
            self._save_record()
        elif not self._setup_done:
            self._check_recipe(self._recipe)
        return self._record

    def _begin(self):
        """Before a call is trained: the record says the block is unfinished, the components hold the state of
        the call before."""
        record = self._ensure_record()
        if record["complete"]:  # a finished block gets another call: unfinished until it ends again
            record["complete"] = False
            self._save_record()
        if record["results"] and not self._state_loaded:
            self._load_end_state()
        self.model.hold_midway(self.id)

    def _commit(self, finished: Finished, loaders: tuple) -> None:
        """After a call: its result, the end state, the best model and a backup (or none) in one save."""
        model, records = self.model, self.model.records
        record = cast(dict, self._record)
        self._loaders = loaders
        record["results"].append({"key": finished.key, "result": finished.result, "rng": finished.rng})
        record["epoch"], record["step"] = model.epoch, model.step
        record["token"] = uuid.uuid4().hex  # a new end state: checkpoints that continued from the old one no longer fit
        calls = len(record["results"])
        end_states, best_states = finished.end_states, finished.backup
        writes = {BLOCK_NAME: record_write(record, "block"),
                  STATE_NAME: record_write({**end_states, "calls": calls}, "state", epochs_done=model.epoch)}
        if records.record(self.id, STRUCTURE_NAME) is None:  # written once: the best model's records name its digest
            evaluator = Evaluator(model.model, {"loss": model.loss_fn})
            structure = structure_payload(TrainingModules(model.model, model.loss_fn, evaluator), None, None)
            try:
                records.save(self.id, {STRUCTURE_NAME: payload_write(structure)})
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                log.warning("%s: the model does not pickle (%s), so load_model_from_cwd cannot load this checkpoint; "
                            "its block, states and cache are kept as usual", self._where, e)
        structure_record = records.record(self.id, STRUCTURE_NAME)
        if structure_record is not None:
            best_model = (best_states or end_states)["model"]
            writes[BEST_MODEL_NAME] = payload_write(model_payload(best_model, finished.result["best_epoch"], model.step,
                                                                  structure_record["digest"], model.device))
        # cached operations were on the old end state
        retire = [name for name in records.live(self.id) if name == PROGRESS_NAME or is_cache_file(name)]
        if best_states is not None:
            writes[BACKUP_NAME] = record_write({**best_states, "calls": calls}, "backup")
        elif records.record(self.id, BACKUP_NAME) is not None:
            retire.append(BACKUP_NAME)
        records.save(self.id, writes, retire=retire)
        self._state_loaded = True

    def _finish(self):
        model = self.model
        fresh = self._record is None
        record = self._ensure_record()
        if record["results"] and not self._state_loaded:
            self._load_end_state()
            if not self._rng_restored:
                streams.restore(record["results"][-1]["rng"], *self._loaders)
        if self._calls < len(record["results"]):
            log.warning("%s holds %d train() calls; this run made %d. The model is left as the last cached call "
                        "ended.", self._where, len(record["results"]), self._calls)
        if not record["results"]:  # a block that trains nothing: the parent's end state, with its own set-up
            if fresh or model.records.record(self.id, STATE_NAME) is None:
                model.records.save(self.id, {STATE_NAME: record_write({**snapshot(model.states()), "calls": 0},
                                                                      "state", epochs_done=model.epoch)})
            else:
                self._load_end_state()
        if not record["complete"]:
            record["complete"] = True
            self._save_record()
        model.stand_at(self.id, record["token"])

    # ---------------------------------------------------------------- plots

    def plot_metrics(self, path: "str | os.PathLike | None" = None) -> "Figure":
        """Plot the loss and metrics of this block's ``train()`` calls over the lineage's epochs.

        :param path: also save the figure there (PNG, PDF... by its suffix).
        :return: the matplotlib ``Figure`` (a notebook shows it).
        :raises SetupError: when matplotlib is not installed (``pip install experiment_io[plots]``).
        """
        return plot_results((self._record or {}).get("results", []), self._where, path)
