"""The model of a lineage: a module, its components, and the tree of checkpoints it was trained through."""
from __future__ import annotations

import copy
import logging
import os
import re
from typing import Any, Mapping, Optional, Union

import torch
import xxhash

from experiment_io.errors import CheckpointNotFoundError, IncompatibleCheckpointError, SetupError
from experiment_io.experiment.rng import set_rng_state
from experiment_io.format.names import qualified_name
from experiment_io.frontends.lineage.blocks import CheckpointBlock
from experiment_io.frontends.lineage.cache import Cache
from experiment_io.frontends.lineage.holding import BUILT, Held, Holding
from experiment_io.frontends.lineage.listing import blocks, descendants, tree
from experiment_io.frontends.lineage.recipes import Classes, Recipe, build_components
from experiment_io.frontends.lineage.records import BACKUP_NAME, STATE_NAME, Records, check_id, check_pair

__all__ = ["Model"]

log = logging.getLogger(__name__)


class Model:
    """A model whose training is kept as a tree of named checkpoints.

    :param id: the model's name: its checkpoints go to ``<root>/<id>/``.
    :param model: the :class:`torch.nn.Module`, as built by your code (each re-run
        builds it again; its states come from the checkpoints).
    :param description: a line shown by :meth:`tree`.
    :param root: the directory of every model's checkpoints (default ``ckpts`` in the
        current directory).
    :param device: move the model there first (default: leave it where it is).
    :param quiet: no progress bars or per-epoch lines (they still go to the log).

    :ivar model: the module; ``loss_fn``, ``optimizer``, ``epoch_scheduler`` and
        ``step_scheduler`` are the components that ``setup()`` built (or ``None``).
    :ivar current: the id of the checkpoint whose end state the components hold
        (``None`` before any).
    :ivar epoch: epochs trained along the lineage that led to ``current``.

    The blocks and the cache of this package use a few more members, which are not
    for notebooks: ``records`` (the checkpoints' files), ``classes`` (the classes the
    recipes name), ``holding`` with ``stand_at``, ``hold_midway`` and
    ``holds_end_of`` (what the components hold), ``build_components``, ``states``,
    ``set_states``, ``check_fingerprint``, ``device`` and ``detached``.
    """

    def __init__(self, id: str, model: torch.nn.Module, description: str = "", *,
                 root: "str | os.PathLike" = "ckpts", device: Any = None, quiet: bool = False):
        self.id = check_id(id, "a model's id")
        if not isinstance(model, torch.nn.Module):
            raise SetupError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model.to(device) if device is not None else model
        self.description = description or ""
        self.directory = os.path.abspath(os.path.join(os.fspath(root), self.id))
        self.quiet = quiet
        self.loss_fn: Any = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.epoch_scheduler: Any = None
        self.step_scheduler: Any = None
        self.recipe = Recipe.of({})
        self.current: Optional[str] = None
        self.epoch = 0
        self.step = 0
        #: the files of the model's checkpoints
        self.records = Records(self.directory, sweep=True)
        #: the classes the recipes name
        self.classes = Classes()
        self._holding = BUILT
        self._current_token: Optional[str] = None

    # ------------------------------------------------- what the components hold

    @property
    def holding(self) -> Holding:
        """What the components hold now (a :class:`~experiment_io.frontends.lineage.holding.Holding`)."""
        return self._holding

    @property
    def current_token(self) -> Optional[str]:
        """The token of the end state of ``current`` the components were loaded with (with its variant:
        ``+backup``, ``+fresh-schedulers``), or ``None``."""
        return self._current_token

    def stand_at(self, cp_id: str, token: str) -> None:
        """Note that the components hold the end state of checkpoint ``cp_id`` named ``token``."""
        self.current, self._current_token, self._holding = cp_id, token, Holding(Held.CHECKPOINT)

    def hold_midway(self, cp_id: str) -> None:
        """Note that the components hold what block ``cp_id`` left so far (no checkpoint holds it yet)."""
        self._holding = Holding.midway(cp_id)

    def holds_end_of(self, cp_id: str, token: str) -> bool:
        """Whether the components hold the end state of checkpoint ``cp_id`` named ``token``, as loaded plainly."""
        return self._holding.held is Held.CHECKPOINT and self.current == cp_id and self._current_token == token

    # ------------------------------------------------------------- components

    @property
    def device(self) -> torch.device:
        """The device of the module's first parameter (the CPU for a module without parameters)."""
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def build_components(self, recipe: Recipe, where: str, keep: frozenset = frozenset()) -> None:
        """Build the components of ``recipe`` anew (those in ``keep`` are left as they are); the recipe becomes
        the model's."""
        built = build_components(recipe, self.classes, self.model, self.optimizer, where, keep)
        for component, value in built.items():
            setattr(self, "loss_fn" if component == "loss" else component, value)
        self.recipe = Recipe.of(recipe)

    def states(self) -> dict[str, Any]:
        """The states of the model and its components (live tensors: serialize or snapshot them at once)."""
        return {
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict() if isinstance(self.loss_fn, torch.nn.Module) else {},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "epoch_scheduler": self.epoch_scheduler.state_dict() if self.epoch_scheduler is not None else None,
            "step_scheduler": self.step_scheduler.state_dict() if self.step_scheduler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
        }

    def set_states(self, states: Mapping[str, Any], *, schedulers: bool = True) -> None:
        """Load ``states`` (from :meth:`states`) into the model and its components.

        :param schedulers: load the schedulers' states too.
        :raises IncompatibleCheckpointError: when the states do not fit the model or its components.
        """
        try:
            self.model.load_state_dict(states["model"])
        except RuntimeError as e:
            raise IncompatibleCheckpointError(f"the checkpoint's model does not fit this model: {e}") from e
        if isinstance(self.loss_fn, torch.nn.Module) and states.get("loss"):
            self.loss_fn.load_state_dict(states["loss"])
        for component in ("optimizer",) + (("epoch_scheduler", "step_scheduler") if schedulers else ()):
            live, saved = getattr(self, component), states.get(component)
            if (live is None) != (saved is None):
                raise IncompatibleCheckpointError(
                    f"the checkpoint has {'a' if saved is not None else 'no'} {component.replace('_', ' ')} but the "
                    f"model {'has none' if live is None else 'has one'}; its recipe and its states disagree")
            if live is not None:
                live.load_state_dict(saved)
        self.epoch, self.step = int(states["epoch"]), int(states["step"])

    def fingerprint(self) -> str:
        """A digest of the model's architecture: its class, its ``repr`` and the names, shapes and dtypes of its
        state. A checkpoint trained with another architecture is refused."""
        parts = [qualified_name(type(self.model)), re.sub(r" at 0x[0-9a-f]+", "", repr(self.model))]
        parts += [f"{k}:uninitialized" if torch.nn.parameter.is_lazy(v)
                  else f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in self.model.state_dict().items()]
        return xxhash.xxh3_64("\n".join(parts).encode()).hexdigest()

    def check_fingerprint(self, record: Mapping[str, Any], where: str, cp_id: str) -> None:
        """Refuse the block record of a checkpoint trained with another architecture.

        :raises IncompatibleCheckpointError: naming the fix.
        """
        if record.get("fingerprint") not in (None, self.fingerprint()):
            raise IncompatibleCheckpointError(
                f"{where} was trained with another model architecture (its layers, shapes or dtypes differ from this "
                f"model's). Build the model as it was, or delete the checkpoint to train it anew: "
                f"{self.deletion_hint(cp_id)}")

    def detached(self) -> "Model":
        """A copy with a module of its own, to load another checkpoint into without changing this model (its
        records and classes are shared)."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        return other

    # ------------------------------------------------------------ public API

    def checkpoint_directory(self, id: Union[int, str]) -> str:
        """The directory of checkpoint ``id``."""
        return self.records.path(check_id(id, "a checkpoint's id"))

    def checkpoint(self, id: Union[int, str], description: Optional[str] = None) -> CheckpointBlock:
        """A checkpoint block: ``with model.checkpoint(1) as cp: cp.setup(...); cp.train(...)``.

        Inside, :meth:`CheckpointBlock.setup` builds components and
        :meth:`CheckpointBlock.train` trains, each ``train()`` call cached by its
        position in the block. A block whose calls are all cached restores the
        components and parameters at its end and trains nothing.
        """
        return CheckpointBlock(self, check_id(id, "a checkpoint's id"), description)

    def cache(self, id: Union[int, str]) -> Cache:
        """Cached operations on checkpoint ``id``'s end state: :meth:`Cache.evaluate`, :meth:`Cache.find_lr`."""
        return Cache(self, check_id(id, "a checkpoint's id"))

    def checkpoints(self) -> list:
        """The ids of the checkpoints on disk, in the order they were first written."""
        return [entry["id"] for entry in blocks(self.directory)]

    def load_checkpoint(self, id: Union[int, str], from_backup: bool = False, load_schedulers: bool = True) -> None:
        """Roll back to checkpoint ``id``: its components are built anew from its recipe and their states loaded.

        :param from_backup: load the best epoch's states kept when the block's last
            ``train()`` did not end on its best epoch (``load_best=False``).
        :param load_schedulers: also load the schedulers' states (otherwise they start
            afresh, as built from the recipe).

        The random streams of the process are set to what they were when the
        checkpoint's last ``train()`` call ended, so that blocks forked from one
        checkpoint start from the same streams.

        :raises CheckpointNotFoundError: when the checkpoint does not exist or never ran to its end.
        :raises IncompatibleCheckpointError: when its files were written by a newer
            version of experiment_io, or do not fit this model.
        """
        cp_id = check_id(id, "a checkpoint's id")
        record = self.records.block(cp_id)
        if record is None:
            raise CheckpointNotFoundError(f"checkpoint {cp_id} of model {self.id} does not exist in {self.directory}")
        if not record["complete"]:
            raise CheckpointNotFoundError(
                f"checkpoint {cp_id} of model {self.id} never ran to its end (its block was interrupted): re-run "
                f"its block to finish it, or model.delete_checkpoint({cp_id!r})")
        where = f"checkpoint {cp_id} of model {self.id}"
        self.check_fingerprint(record, where, cp_id)
        self.build_components(Recipe.of(record["recipe"]), where)
        built_lrs: list[tuple[Any, Any]] = (
            [(group.get("lr"), group.get("initial_lr")) for group in self.optimizer.param_groups]
            if self.optimizer is not None else [])
        states = self.records.read(cp_id, STATE_NAME)
        check_pair(record, states, where)
        variant = ""
        if from_backup:
            if self.records.has(cp_id, BACKUP_NAME):
                backup = self.records.read(cp_id, BACKUP_NAME)
                check_pair(record, backup, where)
                states = backup
                variant += "+backup"
            else:
                log.warning("%s has no backup: its last train() ended on its best epoch or loaded it "
                            "(load_best=True); loading its end state", where)
        self.set_states(states, schedulers=load_schedulers)
        if not load_schedulers:
            variant += "+fresh-schedulers"
            if self.optimizer is not None and (self.epoch_scheduler is not None or self.step_scheduler is not None):
                for group, (lr, initial) in zip(self.optimizer.param_groups, built_lrs):  # the schedules start again
                    group["lr"] = lr
                    if initial is not None:
                        group["initial_lr"] = initial
        if record["results"]:  # a rollback restores the random streams too (not a DataLoader's own generator)
            set_rng_state(record["results"][-1]["rng"]["streams"])
        self.stand_at(cp_id, record["token"] + variant)
        log.info("model %s now at checkpoint %s%s (epoch %d)", self.id, cp_id, " (backup)" if from_backup else "",
                 self.epoch)

    def descendants(self, id: Union[int, str]) -> list[str]:
        """The ids of the checkpoints that continued from checkpoint ``id``, directly or through others (nearest
        first): those a changed set-up of ``id`` makes stale too."""
        return descendants(self.directory, check_id(id, "a checkpoint's id"))

    def deletion_hint(self, cp_id: str) -> str:
        """How to delete checkpoint ``cp_id`` to train it anew, naming the checkpoints that continued from it (they
        would fail next, one by one)."""
        after = self.descendants(cp_id)
        if not after:
            return f"model.delete_checkpoint({cp_id!r})"
        return (f"model.delete_checkpoint({cp_id!r}, descendants=True), which also deletes the {len(after)} "
                f"checkpoint(s) that continued from it: {', '.join(after)}")

    def delete_checkpoint(self, id: Union[int, str], *, descendants: bool = False) -> None:
        """Delete checkpoint ``id`` with its cache.

        :param descendants: also delete every checkpoint that continued from it,
            directly or through others (:meth:`descendants`), the farthest first;
            without it they keep their own files.
        """
        cp_id = check_id(id, "a checkpoint's id")
        if descendants:
            for other in reversed(self.descendants(cp_id)):
                self.delete_checkpoint(other)
        if not os.path.lexists(self.records.path(cp_id)):
            log.info("checkpoint %s of model %s does not exist; nothing to delete", cp_id, self.id)
            return
        self.records.remove(cp_id)
        if self.current == cp_id or self._holding.midway_in(cp_id):  # its state stays, which nothing holds now
            self._holding = Holding.deleted(cp_id)
            if self.current == cp_id:
                self.current, self._current_token = None, None
        log.info("deleted checkpoint %s of model %s", cp_id, self.id)

    def delete(self) -> None:
        """Delete every checkpoint of this model (the in-memory model is left as it is)."""
        self.records.remove_all()
        if self._holding.held is not Held.BUILT:
            self._holding = Holding.deleted(None)
        self.current, self._current_token = None, None
        log.info("deleted model %s (%s)", self.id, self.directory)

    def tree(self) -> str:
        """The checkpoints as a tree of forks, with what each trained."""
        return tree(self.directory, title=f"{self.id}" + (f": {self.description}" if self.description else ""))

