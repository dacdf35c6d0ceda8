r"""Checkpoints as a cache for re-runs: named checkpoint blocks, forks, cached evaluations, rollbacks.

A scientist re-runs a notebook from the top; every training block that already ran
is read back from its checkpoint instead of being trained again::

    model = Model("mnist-mlp", build(), "an MLP on MNIST")          # files under ckpts/mnist-mlp/
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam,
                 optimizer_args=dict(lr=5e-4))
        cp.train(train_dl, test_dl, watch="accuracy", epochs=20, metrics=[metric_accuracy])
    model.cache(1).evaluate(test_dl, metrics=[metric_accuracy])     # computed once, then read back

Each checkpoint is a directory ``<root>/<model id>/<checkpoint id>/`` written only
through the library's storage (atomic, fsynced, digested, committed in a manifest)
and read only through :func:`~experiment_io.verified_load` (verified, then
``weights_only``). It holds

* ``block.pt``: the block's record: its parent (the checkpoint the model stood at
  when the block began), the recipe of its components (class names and arguments),
  the result of each ``train()`` call in order with the random streams at its end,
  and whether the block ran to its end;
* ``state.pt``: the model, loss, optimizer and schedulers as the last ``train()``
  call left them;
* ``progress.pt`` while a ``train()`` call runs: everything needed to continue it
  exactly (states, random streams at the epoch's start and now, the position in the
  epoch, the history so far, the best epoch's states), written at each epoch's end
  and every ``save_every`` batches or ``save_every_seconds``;
* ``backup.pt``: the best epoch's states when the last ``train()`` call did not end
  on its best epoch and did not load it (``load_best=False``);
* ``experiment_structure.pt`` and ``best_model.pt``, so that
  ``load_model_from_cwd(directory=...)`` loads the checkpoint's model for prediction;
* ``cache_<name>.pt``: the cached results of :class:`Cache` operations.

A re-run returns a cached ``train()`` result without training and sets the random
streams to what they were when that call ended, so that a block trained after cached
ones draws the same numbers as in the first run. A block killed inside ``train()``
continues that call from its last progress save when the notebook is re-run, and
gives the same result as an uninterrupted run. Blocks record their parent, so
:meth:`Model.tree` (and ``experiment-io lineage DIR``) shows the forks.
"""
import contextlib
import copy
import inspect
import logging
import math
import os
import pickle
import re
import shutil
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union, cast

import torch
import xxhash

from experiment_io.platform import archive
from experiment_io.storage import atomic as storage
from experiment_io.format import codec as fmt
from experiment_io.errors import CheckpointNotFoundError, IncompatibleCheckpointError, SetupError, StructureClassError
from experiment_io.storage.writer import RunWriter
from experiment_io.storage.lock import RunLock
from experiment_io.format.names import qualified_name, resolve
from experiment_io.frontends.own_loop import USER_KIND
from experiment_io.frontends.verified_loading import verified_load
from experiment_io.run.payloads import BEST_MODEL_NAME, STRUCTURE_NAME, model_payload, save_payload, structure_payload
from experiment_io.training.progress import Report
from experiment_io.experiment.rng import get_rng_state, set_rng_state
from experiment_io.experiment.training_modules import Evaluator, TrainingModules
from experiment_io.version import __version__
from experiment_io.storage.manifest import read_manifest

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Model", "CheckpointBlock", "Cache", "metric", "tree"]

log = logging.getLogger(__name__)

BLOCK_NAME = "block.pt"
STATE_NAME = "state.pt"
PROGRESS_NAME = "progress.pt"
BACKUP_NAME = "backup.pt"
_CACHE_PREFIX = "cache_"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_COMPONENTS = ("loss", "optimizer", "epoch_scheduler", "step_scheduler")
_FAMILY = {
    "loss": (torch.nn.Module,),
    "optimizer": (torch.optim.Optimizer,),
    "epoch_scheduler": (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
    "step_scheduler": (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
}
_LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "rmse")


def metric(name: str, higher_is_better: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Name a metric function and say which way is better.

    A metric is called as ``fn(outputs, targets)`` on each batch and returns the
    *sum* of its value over the batch's samples (a count of correct predictions, say);
    the epoch's value is the total divided by the number of samples::

        @metric("accuracy")
        def metric_accuracy(outputs, targets):
            return (outputs.argmax(dim=-1) == targets).sum().item()

    An undecorated function is named after itself without a ``metric_`` prefix and
    taken as higher-is-better.
    """
    if not isinstance(name, str) or not _ID.fullmatch(name):
        raise SetupError(f"a metric's name must be letters, digits, '.', '_' or '-', not {name!r}")

    def decorate(fn):
        fn.name = name
        fn.higher_is_better = bool(higher_is_better)
        return fn
    return decorate


def _metric_name(fn):
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name or name == "<lambda>":
        raise SetupError(f"metric {fn!r} has no usable name: decorate it with @metric('name')")
    return name[len("metric_"):] if name.startswith("metric_") and len(name) > 7 else name


def _check_id(value, what):
    text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    if text is None or not _ID.fullmatch(text):
        raise SetupError(f"{what} must be an int or a string of letters, digits, '.', '_' or '-' "
                         f"(starting with a letter or digit), not {value!r}")
    return text


def _plain(value, where):
    """``value`` as plain data (tuples become lists), or a SetupError naming ``where``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise SetupError(f"{where} must be plain data (numbers, strings, lists, dicts), not {value!r}: the recipe "
                     "of a checkpoint is stored and compared when the notebook is re-run")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _snapshot(obj):
    """A copy of a state (tensors cloned), so that later training does not change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


def _batch_size(batch):
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    raise SetupError("a batch must be (inputs, targets) with tensors whose first dimension is the batch")


def _split_batch(batch):
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise SetupError(f"a DataLoader for experiment_io.frontends.lineage yields (inputs, targets); it yielded a "
                         f"{type(batch).__name__}"
                         + (f" of {len(batch)} items" if isinstance(batch, (list, tuple)) else ""))
    return batch[0], batch[1]


def _needs_closure(cls):
    try:
        parameter = inspect.signature(cls.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _samples(loader):
    """The number of samples of a DataLoader's dataset (``None`` when it has no length): part of a cache key."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _call(module, inputs):
    return module(*inputs) if isinstance(inputs, (list, tuple)) else module(inputs)


def _value(x):
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _save_bytes(obj):
    return lambda f: archive.save(obj, f)


def _payload_write(payload):
    """A write of one of the library's payloads (structure, model) and the fields of its record."""
    return (lambda f: save_payload(payload, f)), fmt.record_fields(payload[fmt.HEADER_KEY])


def _fields(what, **more):
    return {"kind": USER_KIND, "lineage": what, "library_version": __version__, "torch_version": str(torch.__version__),
            **more}


class _Recipe(dict):
    """``{component: {"cls": "module.QualName", "args": {...}} or None}``."""

    def describe(self, component):
        entry = self.get(component)
        if entry is None:
            return "none"
        args = ", ".join(f"{k}={v!r}" for k, v in entry["args"].items())
        return f"{entry['cls'].rsplit('.', 1)[-1]}({args})"


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
    """

    def __init__(self, id: str, model: torch.nn.Module, description: str = "", *,
                 root: "str | os.PathLike" = "ckpts", device: Any = None, quiet: bool = False):
        self.id = _check_id(id, "a model's id")
        if not isinstance(model, torch.nn.Module):
            raise SetupError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model.to(device) if device is not None else model
        self.description = description or ""
        self.directory = os.path.abspath(os.path.join(os.fspath(root), self.id))
        self.quiet = quiet
        self.loss_fn = self.optimizer = self.epoch_scheduler = self.step_scheduler = None
        self.recipe = _Recipe({c: None for c in _COMPONENTS})
        self.current: Optional[str] = None
        self.epoch = 0
        self.step = 0
        self._classes: dict[str, type] = {}
        self._writers: dict[str, RunWriter] = {}
        #: what the components hold: "built" (as your code built them), "checkpoint" (``current``'s end state as
        #: loaded, in the way ``_current_token`` names), or the id of a block whose training left them midway
        self._holds = "built"
        self._current_token = None

    # ------------------------------------------------------------------ files

    def checkpoint_directory(self, id: Union[int, str]) -> str:
        """The directory of checkpoint ``id``."""
        return os.path.join(self.directory, _check_id(id, "a checkpoint's id"))

    def _writer(self, cp_id):
        directory = self.checkpoint_directory(cp_id)
        writer = self._writers.get(directory)
        if writer is None or not os.path.isdir(directory):
            writer = self._writers[directory] = RunWriter(directory)
        return writer

    def _read(self, cp_id, name, required=True):
        path = os.path.join(self.checkpoint_directory(cp_id), name)
        try:
            return verified_load(path, map_location="cpu")  # load_state_dict puts each state where it belongs
        except CheckpointNotFoundError:
            if required:
                raise
            return None

    def _has(self, cp_id, name):
        directory = self.checkpoint_directory(cp_id)
        try:
            files = read_manifest(directory)
        except OSError:
            return False
        if not files:
            return False
        record = files[1].get(name)
        return record is not None and not record.get("retired")

    def _block(self, cp_id):
        """The record of checkpoint ``cp_id`` (``None`` when it has none)."""
        return self._read(cp_id, BLOCK_NAME) if self._has(cp_id, BLOCK_NAME) else None

    def _device(self):
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    # ------------------------------------------------------------- components

    def _class(self, component, name, where):
        cls = self._classes.get(name)
        if cls is None:
            cls, why = resolve(name, importable=("torch",))
            if cls is None:
                raise StructureClassError(
                    f"{where} was set up with {name}, which cannot be found ({why}). Import the module that defines "
                    "it, or run the block's setup() with the class, before loading the checkpoint.")
        if not isinstance(cls, type) or not issubclass(cls, _FAMILY[component]):
            raise StructureClassError(f"{where}: {name} is not a {' or '.join(f.__name__ for f in _FAMILY[component])}")
        return cls

    def _build(self, recipe, where, keep=()):
        """Build the components of ``recipe`` anew (those in ``keep`` are left as they are)."""
        built = {}
        for component in _COMPONENTS:
            if component in keep:
                continue
            entry = recipe.get(component)
            if entry is None:
                built[component] = None
                continue
            cls = self._class(component, entry["cls"], where)
            args = entry["args"]
            try:
                if component == "loss":
                    built[component] = cls(**args)
                elif component == "optimizer":
                    built[component] = cls(self.model.parameters(), **args)
                else:
                    optimizer = built.get("optimizer", self.optimizer)
                    if optimizer is None:
                        raise SetupError(f"{where}: a {component.replace('_', ' ')} needs an optimizer; set one up too")
                    built[component] = cls(optimizer, **args)
            except (TypeError, ValueError) as e:
                raise SetupError(f"{where}: {recipe.describe(component)} could not be built: {e}") from e
        if "loss" in built:
            self.loss_fn = built["loss"]
        if "optimizer" in built:
            self.optimizer = built["optimizer"]
        for component in ("epoch_scheduler", "step_scheduler"):
            if component in built:
                setattr(self, component, built[component])
        self.recipe = _Recipe({c: copy.deepcopy(recipe.get(c)) for c in _COMPONENTS})

    def _states(self):
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

    def fingerprint(self) -> str:
        """A digest of the model's architecture: its class, its ``repr`` and the names, shapes and dtypes of its
        state. A checkpoint trained with another architecture is refused."""
        parts = [qualified_name(type(self.model)), re.sub(r" at 0x[0-9a-f]+", "", repr(self.model))]
        parts += [f"{k}:uninitialized" if torch.nn.parameter.is_lazy(v)
                  else f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in self.model.state_dict().items()]
        return xxhash.xxh3_64("\n".join(parts).encode()).hexdigest()

    def _set_states(self, states, *, schedulers=True, model=True):
        if model:
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

    # ------------------------------------------------------------ public API

    def checkpoint(self, id: Union[int, str], description: Optional[str] = None) -> "CheckpointBlock":
        """A checkpoint block: ``with model.checkpoint(1) as cp: cp.setup(...); cp.train(...)``.

        Inside, :meth:`CheckpointBlock.setup` builds components and
        :meth:`CheckpointBlock.train` trains, each ``train()`` call cached by its
        position in the block. A block whose calls are all cached restores the
        components and parameters at its end and trains nothing.
        """
        return CheckpointBlock(self, _check_id(id, "a checkpoint's id"), description)

    def cache(self, id: Union[int, str]) -> "Cache":
        """Cached operations on checkpoint ``id``'s end state: :meth:`Cache.evaluate`, :meth:`Cache.find_lr`."""
        return Cache(self, _check_id(id, "a checkpoint's id"))

    def checkpoints(self) -> list:
        """The ids of the checkpoints on disk, in the order they were first written."""
        return [entry["id"] for entry in _blocks(self.directory)]

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
        """
        cp_id = _check_id(id, "a checkpoint's id")
        record = self._block(cp_id)
        if record is None:
            raise CheckpointNotFoundError(f"checkpoint {cp_id} of model {self.id} does not exist in {self.directory}")
        if not record["complete"]:
            raise CheckpointNotFoundError(
                f"checkpoint {cp_id} of model {self.id} never ran to its end (its block was interrupted): re-run "
                f"its block to finish it, or model.delete_checkpoint({cp_id!r})")
        where = f"checkpoint {cp_id} of model {self.id}"
        self._check_fingerprint(record, where)
        self._build(_Recipe(record["recipe"]), where)
        built_lrs: list[tuple[Any, Any]] = (
            [(group.get("lr"), group.get("initial_lr")) for group in self.optimizer.param_groups]
            if self.optimizer is not None else [])
        states = self._read(cp_id, STATE_NAME)
        _check_pair(record, states, where)
        variant = ""
        if from_backup:
            if self._has(cp_id, BACKUP_NAME):
                backup = self._read(cp_id, BACKUP_NAME)
                _check_pair(record, backup, where)
                states = backup
                variant += "+backup"
            else:
                log.warning("%s has no backup: its last train() ended on its best epoch or loaded it "
                            "(load_best=True); loading its end state", where)
        self._set_states(states, schedulers=load_schedulers)
        if not load_schedulers:
            variant += "+fresh-schedulers"
            if self.epoch_scheduler is not None or self.step_scheduler is not None:
                for group, (lr, initial) in zip(self.optimizer.param_groups, built_lrs):  # the schedules start again
                    group["lr"] = lr
                    if initial is not None:
                        group["initial_lr"] = initial
        if record["results"]:  # a rollback restores the random streams too (not a DataLoader's own generator)
            set_rng_state(record["results"][-1]["rng"]["streams"])
        self._stands_at(cp_id, record["token"] + variant)
        log.info("model %s now at checkpoint %s%s (epoch %d)", self.id, cp_id, " (backup)" if from_backup else "",
                 self.epoch)

    def _stands_at(self, cp_id, token):
        self.current, self._current_token, self._holds = cp_id, token, "checkpoint"

    def _check_fingerprint(self, record, where):
        if record.get("fingerprint") not in (None, self.fingerprint()):
            raise IncompatibleCheckpointError(
                f"{where} was trained with another model architecture (its layers, shapes or dtypes differ from this "
                f"model's). Build the model as it was, or delete the checkpoint to train it anew: "
                f"model.delete_checkpoint({record['id']!r})")

    def delete_checkpoint(self, id: Union[int, str]) -> None:
        """Delete checkpoint ``id`` with its cache (checkpoints that continued from it keep their own files)."""
        cp_id = _check_id(id, "a checkpoint's id")
        directory = self.checkpoint_directory(cp_id)
        if not os.path.isdir(directory):
            log.info("checkpoint %s of model %s does not exist; nothing to delete", cp_id, self.id)
            return
        _remove_tree(directory)
        self._writers.pop(directory, None)
        if self.current == cp_id or self._holds == f"block {cp_id}":  # its state stays, which nothing holds now
            self._holds = f"deleted checkpoint {cp_id}"
            if self.current == cp_id:
                self.current, self._current_token = None, None
        log.info("deleted checkpoint %s of model %s", cp_id, self.id)

    def delete(self) -> None:
        """Delete every checkpoint of this model (the in-memory model is left as it is)."""
        if os.path.isdir(self.directory):
            _remove_tree(self.directory)
        self._writers.clear()
        if self._holds != "built":
            self._holds = "a deleted checkpoint"
        self.current, self._current_token = None, None
        log.info("deleted model %s (%s)", self.id, self.directory)

    def tree(self) -> str:
        """The checkpoints as a tree of forks, with what each trained."""
        return tree(self.directory, title=f"{self.id}" + (f": {self.description}" if self.description else ""))


def _load_arguments(record):
    """The arguments of the ``load_checkpoint`` that gives a block's parent as the block began from it."""
    token = record.get("parent_token") or ""
    return repr(record["parent"]) + (", from_backup=True" if "+backup" in token else "") + (
        ", load_schedulers=False" if "+fresh-schedulers" in token else "")


def _remove_tree(directory):
    """Remove ``directory``: renamed aside first (one atomic step), then removed, then its parent synced."""
    parent = os.path.dirname(directory)
    aside = os.path.join(parent, f".deleting-{os.path.basename(directory)}-{os.getpid()}")
    os.replace(directory, aside)
    storage.fsync_directory(parent)
    shutil.rmtree(aside)


def _check_pair(record, states, where):
    if states.get("calls") != len(record["results"]):
        raise IncompatibleCheckpointError(
            f"{where}: its state file is of call {states.get('calls')} and its record of call {len(record['results'])} "
            "(one of them fell back to an older generation); re-run its block after deleting it")


class CheckpointBlock:
    """One checkpoint block of a :class:`Model` (use ``with model.checkpoint(id) as cp``)."""

    def __init__(self, model: Model, cp_id: str, description: Optional[str]):
        self.model = model
        self.id = cp_id
        self.description = description
        self.directory = model.checkpoint_directory(cp_id)
        self._where = f"checkpoint {cp_id} of model {model.id}"
        self._calls = 0
        self._setup_done = False
        self._state_loaded = False
        self._trained = False
        self._rng_restored = False
        self._entered_midway = False
        self._loaders = ()
        self._record: Optional[dict] = None
        self._lock: Optional[RunLock] = None

    def __enter__(self) -> "CheckpointBlock":
        storage.make_directory(self.model.directory)
        storage.make_directory(self.directory)
        self._lock = RunLock(self.directory)
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
        record = self._record = model._block(self.id)
        if record is not None:
            model._check_fingerprint(record, self._where)
        self._entered_midway = model._holds == f"block {self.id}"
        if record is not None and model.current == self.id and model._current_token == record["token"] \
                and model._holds in ("checkpoint", f"block {self.id}"):
            # the same cell again (finished, or interrupted in a call it added)
            self._parent, self._parent_token = record["parent"], record.get("parent_token")
        else:
            if model._holds not in ("built", "checkpoint") and model._holds != f"block {self.id}":
                interrupted = model._holds.startswith("block ")
                holder = model._holds.replace("block", "checkpoint")
                raise IncompatibleCheckpointError(
                    f"the model holds the state that {holder} "
                    + ("left when it was interrupted" if interrupted else "left")
                    + f", which no checkpoint holds, so {self._where} cannot record what it continues from. "
                    + (f"Run {holder}'s block again to finish it, load" if interrupted else "Load")
                    + " a checkpoint (model.load_checkpoint(id)), or build the model again (re-run the cell that "
                    "creates it).")
            parent = model.current
            if record is not None and record["parent"] != parent:
                load = (f"load its parent first (model.load_checkpoint({_load_arguments(record)}))"
                        if record["parent"] is not None else "build the model again (re-run the cell that creates it)")
                raise IncompatibleCheckpointError(
                    f"{self._where} continued from "
                    + ("the model as built" if record["parent"] is None else f"checkpoint {record['parent']}")
                    + f", but the model now stands at {'no checkpoint' if parent is None else 'checkpoint ' + parent}. "
                    f"To read it back, {load}; to train it from here, delete it: model.delete_checkpoint({self.id!r})")
            if record is not None and record.get("parent_token") != model._current_token:
                raise IncompatibleCheckpointError(
                    f"{self._where} continued from another state of checkpoint {parent}: that checkpoint was trained "
                    f"again or extended since, or it is loaded another way now (from_backup=, load_schedulers=). "
                    f"Delete {self._where} to train it from the state the model stands at: "
                    f"model.delete_checkpoint({self.id!r})")
            self._parent, self._parent_token = parent, model._current_token
        self._recipe = _Recipe(copy.deepcopy(dict(model.recipe)))

    def __exit__(self, kind, error, traceback) -> None:
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
        recipe = _Recipe(copy.deepcopy(dict(self.model.recipe)))
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
                if not isinstance(cls, type) or not issubclass(cls, _FAMILY[component]):
                    raise SetupError(f"{component}_cls must be a class of "
                                     f"{' or '.join(f.__name__ for f in _FAMILY[component])}, not {cls!r}")
                if component == "step_scheduler" and issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    raise SetupError("ReduceLROnPlateau steps on a metric once per epoch: give it as "
                                     "epoch_scheduler_cls")
                if component == "optimizer" and _needs_closure(cls):
                    raise SetupError(f"{cls.__name__} needs a closure at each step (as LBFGS does), which train() "
                                     "does not give; choose an optimizer whose step() takes no argument")
                name = qualified_name(cls)
                self.model._classes[name] = cls
            recipe[component] = {"cls": name, "args": _plain(dict(args or {}), f"{component}_args")}
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
            self.model._holds = f"block {self.id}"  # its components differ from the parent's until the block ends
        self.model._build(recipe, self._where, keep=set(_COMPONENTS) - named)
        for component, old in carried.items():
            _carry_count(old, getattr(self.model, component))
        self._recipe = recipe

    def _check_recipe(self, recipe):
        record = self._record
        if record is None:
            return
        if dict(record["recipe"]) != dict(recipe):
            stored = _Recipe(record["recipe"])
            differs = [c for c in _COMPONENTS if stored.get(c) != recipe.get(c)]
            lines = "; ".join(f"{c}: {stored.describe(c)} on disk, {recipe.describe(c)} now" for c in differs)
            raise IncompatibleCheckpointError(
                f"{self._where} was trained with another set-up ({lines}). Its saved states do not fit the new "
                f"components; delete the checkpoint first to train it anew: model.delete_checkpoint({self.id!r})")

    # ---------------------------------------------------------------- train

    def train(self, train_dl: Iterable, val_dl: Optional[Iterable] = None, *, epochs: int, watch: str = "loss",
              mode: Optional[str] = None, load_best: bool = False, metrics: Sequence[Callable] = (),
              save_every: Optional[int] = None, save_every_seconds: Optional[float] = 60.0) -> dict:
        """Train for ``epochs`` epochs, or return this call's cached result.

        Each epoch trains on ``train_dl`` (batches ``(inputs, targets)``), then
        evaluates the loss and ``metrics`` on ``val_dl`` (when given), steps the epoch
        scheduler, and keeps the best epoch by ``watch`` (on ``val_dl`` when given,
        else on the training batches).

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
        :param save_every: also save progress every this many batches.
        :param save_every_seconds: also save progress when this much time has passed
            since the last save (``None``: only at epoch ends and ``save_every``).
        :return: ``{"history": {"epoch": [...], "lr": [...], "train_loss": [...],
            "val_loss": [...], "val_<metric>": [...], ...}, "watch": "val_<watch>",
            "best_epoch": int, "best_value": float}``; epochs are counted along
            the lineage (the first epoch of the model is 1).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise SetupError(f"epochs must be a positive integer, not {epochs!r}")
        if save_every is not None and (isinstance(save_every, bool) or not isinstance(save_every, int)
                                       or save_every < 1):
            raise SetupError(f"save_every must be a positive integer or None, not {save_every!r}")
        if save_every_seconds is not None and not save_every_seconds > 0:
            raise SetupError(f"save_every_seconds must be positive or None, not {save_every_seconds!r}")
        names = [_metric_name(fn) for fn in metrics]
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
        if self.model.loss_fn is None or self.model.optimizer is None:
            raise SetupError(f"{self._where}: train() needs a loss and an optimizer; give them to setup() "
                             "(loss_cls=..., optimizer_cls=...) in this block or an earlier one")
        key = {"epochs": epochs, "watch": watch, "mode": mode, "load_best": bool(load_best), "metrics": names,
               "train_samples": _samples(train_dl), "val_samples": _samples(val_dl) if val_dl is not None else None}
        call = self._calls
        self._calls += 1
        record = self._record
        if record is not None and call < len(record["results"]):
            cached = record["results"][call]
            if cached["key"] != key:
                log.warning("%s: train() call %d was trained with %s; this run asks %s. The cached result is returned; "
                            "delete the checkpoint to train it again: model.delete_checkpoint(%r)",
                            self._where, call + 1, cached["key"], key, self.id)
            if call == len(record["results"]) - 1 and not self._state_loaded:
                self._load_end_state()  # the code after the block's last cached call sees the model it left
            _set_random(cached["rng"], train_dl, val_dl)
            self._rng_restored = True
            done = cached["result"]
            Report(self.model.quiet).line(
                f"{self._where}: train() call {call + 1} read from the checkpoint "
                f"({len(done['history']['epoch'])} epochs, "
                f"best {done['watch']} {done['best_value']:.4g} at epoch {done['best_epoch']})")
            return copy.deepcopy(cached["result"])
        self._begin()
        runner = _Training(self, call, key, train_dl, val_dl, metrics, names, save_every, save_every_seconds)
        result = runner.run()
        self._trained = True
        return copy.deepcopy(result)

    def _load_end_state(self):
        states = self.model._read(self.id, STATE_NAME)
        _check_pair(self._record, states, self._where)
        self.model._holds = f"block {self.id}"  # until the block ends: its parent's state is gone
        self.model._set_states(states)
        self._state_loaded = True

    def _ensure_record(self):
        """The block's record, written when the block first trains or ends."""
        model = self.model
        if self._record is None:
            self._record = {"id": self.id, "parent": self._parent, "parent_token": self._parent_token,
                            "token": uuid.uuid4().hex, "fingerprint": model.fingerprint(),
                            "description": self.description or "", "model_description": model.description,
                            "recipe": dict(self._recipe), "results": [], "complete": False, "created": time.time()}
            model._writer(self.id).save_files({BLOCK_NAME: (_save_bytes(self._record), _fields("block"))})
        elif not self._setup_done:
            self._check_recipe(self._recipe)
        return self._record

    def _begin(self):
        """Before a call is trained: the record says the block is unfinished, the components hold the state of
        the call before."""
        model = self.model
        record = self._ensure_record()
        if record["complete"]:  # a finished block gets another call: unfinished until it ends again
            record["complete"] = False
            model._writer(self.id).save_files({BLOCK_NAME: (_save_bytes(record), _fields("block"))})
        if record["results"] and not self._state_loaded:
            self._load_end_state()
        model._holds = f"block {self.id}"

    def _commit(self, result, rng, end_states, best_states):
        """After a call: its result, the end state, the best model and a backup (or none) in one save."""
        model = self.model
        record = self._record
        record["results"].append({"key": result.pop("_key"), "result": result, "rng": rng})
        record["epoch"], record["step"] = model.epoch, model.step
        record["token"] = uuid.uuid4().hex  # a new end state: checkpoints that continued from the old one no longer fit
        calls = len(record["results"])
        writer = model._writer(self.id)
        writes = {BLOCK_NAME: (_save_bytes(record), _fields("block")),
                  STATE_NAME: (_save_bytes({**end_states, "calls": calls}), _fields("state", epochs_done=model.epoch))}
        if writer.record(STRUCTURE_NAME) is None:  # written once: the best model's records name its digest
            evaluator = Evaluator(model.model, {"loss": model.loss_fn})
            structure = structure_payload(TrainingModules(model.model, model.loss_fn, evaluator), None, None)
            try:
                writer.save_files({STRUCTURE_NAME: _payload_write(structure)})
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                log.warning("%s: the model does not pickle (%s), so load_model_from_cwd cannot load this checkpoint; "
                            "its block, states and cache are kept as usual", self._where, e)
        if writer.record(STRUCTURE_NAME) is not None:
            digest = writer.record(STRUCTURE_NAME)["digest"]
            best_model = (best_states or end_states)["model"]
            writes[BEST_MODEL_NAME] = _payload_write(model_payload(best_model, result["best_epoch"], model.step, digest,
                                                                   model._device()))
        retire = [name for name in writer.files if (name == PROGRESS_NAME or name.startswith(_CACHE_PREFIX))
                  and not writer.files[name].get("retired")]  # cached operations were on the old end state
        if best_states is not None:
            writes[BACKUP_NAME] = (_save_bytes({**best_states, "calls": calls}), _fields("backup"))
        elif writer.record(BACKUP_NAME) is not None:
            retire.append(BACKUP_NAME)
        writer.save_files(writes, retire=retire)
        self._state_loaded = True

    def _finish(self):
        model = self.model
        fresh = self._record is None
        record = self._ensure_record()
        writer = model._writer(self.id)
        if record["results"] and not self._state_loaded:
            self._load_end_state()
            if not self._rng_restored:
                _set_random(record["results"][-1]["rng"], *self._loaders)
        if self._calls < len(record["results"]):
            log.warning("%s holds %d train() calls; this run made %d. The model is left as the last cached call "
                        "ended.", self._where, len(record["results"]), self._calls)
        if not record["results"]:  # a block that trains nothing: the parent's end state, with its own set-up
            if fresh or writer.record(STATE_NAME) is None:
                writer.save_files({STATE_NAME: (_save_bytes({**_snapshot(model._states()), "calls": 0}),
                                                _fields("state", epochs_done=model.epoch))})
            else:
                self._load_end_state()
        if not record["complete"]:
            record["complete"] = True
            writer.save_files({BLOCK_NAME: (_save_bytes(record), _fields("block"))})
        model._stands_at(self.id, record["token"])

    # ---------------------------------------------------------------- plots

    def plot_metrics(self, path: "str | os.PathLike | None" = None) -> "Figure":
        """Plot the loss and metrics of this block's ``train()`` calls over the lineage's epochs.

        :param path: also save the figure there (PNG, PDF... by its suffix).
        :return: the matplotlib ``Figure`` (a notebook shows it).
        :raises SetupError: when matplotlib is not installed (``pip install experiment_io[plots]``).
        """
        try:  # a Figure without pyplot: matplotlib's backend (a notebook's inline one) is left alone
            from matplotlib.figure import Figure
        except ImportError as e:
            raise SetupError("plot_metrics() needs matplotlib: pip install 'experiment_io[plots]'") from e
        results = (self._record or {}).get("results", [])
        series: dict[str, tuple[list, list]] = {}
        for entry in results:
            history = entry["result"]["history"]
            for name, values in history.items():
                if name in ("epoch", "lr"):
                    continue
                series.setdefault(name, ([], []))
                series[name][0].extend(history["epoch"])
                series[name][1].extend(values)
        kinds = sorted({n.split("_", 1)[1] for n in series})
        figure = Figure(figsize=(6, 3 * max(len(kinds), 1)))
        axes = figure.subplots(len(kinds) or 1, 1, squeeze=False)
        for ax, kind in zip(axes[:, 0], kinds):
            for split in ("train", "val"):
                if f"{split}_{kind}" in series:
                    ax.plot(*series[f"{split}_{kind}"], label=split, marker=".")
            ax.set_ylabel(kind)
            ax.legend()
        axes[-1, 0].set_xlabel("epoch")
        figure.suptitle(self._where)
        figure.tight_layout()
        if path is not None:
            figure.savefig(path)
        return figure


def _carry_count(old, new):
    """A scheduler rebuilt on a new optimizer continues the count of steps of the one it replaces: it is stepped
    as many times, so that the learning rate is the schedule's at that count, from the new optimizer's rate."""
    if isinstance(new, torch.optim.lr_scheduler.ReduceLROnPlateau):
        for field in ("num_bad_epochs", "best", "cooldown_counter", "last_epoch"):
            if hasattr(old, field):
                setattr(new, field, getattr(old, field))
        return
    with _quiet_scheduler():
        for _ in range(max(getattr(old, "last_epoch", 0) - getattr(new, "last_epoch", 0), 0)):
            new.step()


@contextlib.contextmanager
def _quiet_scheduler():
    """Without torch's warning about a scheduler stepped before its optimizer (a resume or a carried count
    steps a scheduler first, on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        yield


def _generators(*loaders):
    """The :class:`torch.Generator` objects a DataLoader draws its order from (its own, its sampler's)."""
    found = []
    for loader in loaders:
        if loader is None:
            continue
        sampler = getattr(loader, "sampler", None)
        inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        for generator in (getattr(loader, "generator", None), getattr(sampler, "generator", None),
                          getattr(inner, "generator", None)):
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found


def _random(*loaders):
    """The random streams: the process's, and those of the loaders' own generators."""
    return {"streams": get_rng_state(), "loaders": [g.get_state() for g in _generators(*loaders)]}


def _set_random(state, *loaders):
    set_rng_state(state["streams"])
    generators = _generators(*loaders)
    if len(generators) == len(state["loaders"]):
        for generator, saved in zip(generators, state["loaders"]):
            generator.set_state(saved)
    elif loaders:
        log.warning("the DataLoaders have %d generators of their own, the checkpoint saved %d: their order is not "
                    "restored", len(generators), len(state["loaders"]))


def _mean_pass(model, loader, names, metrics):
    """``(sums, count)`` of the loss and ``metrics`` of ``model`` (a :class:`Model`) over one pass of ``loader``,
    in evaluation mode."""
    module, loss_fn, device = model.model, model.loss_fn, model._device()
    sums = {"loss": 0.0, **{n: 0.0 for n in names}}
    count = 0
    module.eval()
    with torch.no_grad():
        for batch in loader:
            inputs, targets = _to(_split_batch(batch), device)
            outputs = _call(module, inputs)
            n = _batch_size(targets)
            sums["loss"] += _value(loss_fn(outputs, targets)) * n
            for name, fn in zip(names, metrics):
                sums[name] += _value(fn(outputs, targets))
            count += n
    return sums, count


class _Training:
    """One ``train()`` call: epochs, progress saves, resume from a progress save."""

    def __init__(self, block, call, key, train_dl, val_dl, metrics, names, save_every, save_every_seconds):
        self.block, self.model = block, block.model
        self.call, self.key = call, key
        self.train_dl, self.val_dl = train_dl, val_dl
        self.metrics, self.names = list(metrics), names
        self.save_every, self.save_every_seconds = save_every, save_every_seconds
        self.prefix = "val" if val_dl is not None else "train"
        self.watched = f"{self.prefix}_{key['watch']}"
        self.report = Report(self.model.quiet)

    def _better(self, value, best):
        if best is None:
            return True
        if math.isnan(value):
            return False
        return value < best["value"] if self.key["mode"] == "min" else value > best["value"]

    def _progress(self):
        """The progress save of this call, when one fits it (else ``None``)."""
        model, block = self.model, self.block
        if not model._has(block.id, PROGRESS_NAME):
            return None
        progress = model._read(block.id, PROGRESS_NAME)
        if progress["call"] != self.call or progress["key"] != self.key:
            log.warning("%s: the progress save of an interrupted train() call (call %d, %s) does not fit this call "
                        "(call %d, %s); training it from its start", block._where, progress["call"] + 1,
                        progress["key"], self.call + 1, self.key)
            return None
        return progress

    def _save_progress(self, epoch, batch, random_start, history, running, best):
        model, block = self.model, self.block
        progress = {"call": self.call, "key": self.key, "epoch": epoch, "batch": batch,
                    "random_epoch_start": random_start, "random": _random(self.train_dl, self.val_dl),
                    "states": model._states(), "history": history, "running": running, "best": best}
        model._writer(block.id).save_files({PROGRESS_NAME: (_save_bytes(progress), _fields(
            "progress", epochs_done=model.epoch, step=model.step))})
        self.saved_at = time.monotonic()

    def _new_running(self):
        """The sums of an epoch so far, and the learning rate it started with."""
        return {"loss": 0.0, "count": 0, "lr": self.model.optimizer.param_groups[0]["lr"],
                **{n: 0.0 for n in self.names}}

    def run(self):
        model, block, key = self.model, self.block, self.key
        progress = self._progress()
        if progress is not None:
            model._set_states(progress["states"])
            history, best = progress["history"], progress["best"]
            start_epoch, start_batch = progress["epoch"], progress["batch"]
            # where the interrupted epoch began (its order is drawn again), or where the call stood
            _set_random(progress["random_epoch_start"] if start_batch else progress["random"], self.train_dl,
                        self.val_dl)
            if start_epoch or start_batch:
                where = ("after its last epoch" if start_epoch == key["epochs"]
                         else f"at epoch {start_epoch + 1} of {key['epochs']}, batch {start_batch}")
                log.warning("%s: continuing the interrupted train() call %d %s", block._where, self.call + 1, where)
        else:
            if block._entered_midway and not block._state_loaded:
                parent = block._record["parent"]
                raise IncompatibleCheckpointError(
                    f"{block._where}: the model holds what its interrupted train() call {self.call + 1} left, and the "
                    "progress save of that call is for other arguments, so the state this call starts from is gone "
                    "from this session. "
                    + (f"Load its parent (model.load_checkpoint({_load_arguments(block._record)}))"
                       if parent is not None
                       else "Build the model again (re-run the cell that creates it)") + " and run the block again.")
            history = {"epoch": [], "lr": [], "train_loss": [], **{f"train_{n}": [] for n in self.names}}
            if self.val_dl is not None:
                history.update({"val_loss": [], **{f"val_{n}": [] for n in self.names}})
            best, start_epoch, start_batch = None, 0, 0
            # the state the call starts from: a call interrupted before its first save starts there again
            self._save_progress(0, 0, None, history, None, None)
        self.saved_at = time.monotonic()
        for epoch in range(start_epoch, key["epochs"]):
            resuming = progress is not None and epoch == start_epoch and start_batch
            random_start = progress["random_epoch_start"] if resuming else _random(self.train_dl, self.val_dl)
            best = self._epoch(epoch, history, best, random_start, progress if resuming else None,
                               start_batch if resuming else 0)
        return self._end(history, best)

    def _epoch(self, epoch, history, best, random_start, progress, skip):
        model, key = self.model, self.key
        module, loss_fn, optimizer, device = model.model, model.loss_fn, model.optimizer, model._device()
        started = time.monotonic()
        batches = iter(self.train_dl)
        for _ in range(skip):  # the same order as before the interruption: its batches are read, not trained on
            next(batches)
        if skip:
            _set_random(progress["random"], self.train_dl, self.val_dl)
            running = dict(progress["running"])
        else:
            running = self._new_running()
        total = _samples(self.train_dl) or 0
        bar = self.report.bar(total, running["count"], f"{self.block._where}, epoch {model.epoch + 1}")
        module.train()
        index = skip
        try:
            for batch in batches:
                inputs, targets = _to(_split_batch(batch), device)
                optimizer.zero_grad()
                outputs = _call(module, inputs)
                loss = loss_fn(outputs, targets)
                loss.backward()
                optimizer.step()
                if model.step_scheduler is not None:
                    with _quiet_scheduler():
                        model.step_scheduler.step()
                model.step += 1
                index += 1
                n = _batch_size(targets)
                running["loss"] += _value(loss) * n
                running["count"] += n
                with torch.no_grad():
                    for name, fn in zip(self.names, self.metrics):
                        running[name] += _value(fn(outputs.detach(), targets))
                bar.update(n)
                if (self.save_every and index % self.save_every == 0) or (
                        self.save_every_seconds is not None
                        and time.monotonic() - self.saved_at >= self.save_every_seconds):
                    self._save_progress(epoch, index, random_start, history, running, best)
        finally:
            bar.close()
        if not running["count"]:
            raise SetupError(f"{self.block._where}: the training DataLoader yielded no batch")
        values = {f"train_{n}": running[n] / running["count"] for n in ["loss"] + self.names}
        if self.val_dl is not None:
            sums, count = _mean_pass(model, self.val_dl, self.names, self.metrics)
            if not count:
                raise SetupError(f"{self.block._where}: the validation DataLoader yielded no batch")
            values.update({f"val_{n}": sums[n] / count for n in ["loss"] + self.names})
        lr = running["lr"]
        scheduler = model.epoch_scheduler
        if scheduler is not None:
            with _quiet_scheduler():
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(values[self.watched])
                else:
                    scheduler.step()
        model.epoch += 1
        history["epoch"].append(model.epoch)
        history["lr"].append(lr)
        for name, value in values.items():
            history[name].append(value)
        value = values[self.watched]
        better = self._better(value, best)
        if better:
            best = {"value": value, "epoch": model.epoch, "states": _snapshot(model._states())}
        shown = ", ".join(f"{n} {v:.4g}" for n, v in values.items())
        self.report.line(f"{self.block._where}: epoch {model.epoch} ({epoch + 1} of {key['epochs']} in this call, "
                         f"{time.monotonic() - started:.1f} s): {shown}, lr {lr:.3g}"
                         + ("; best so far" if better
                            else f"; best {self.watched} {best['value']:.4g} at epoch {best['epoch']}"))
        self._save_progress(epoch + 1, 0, None, history, None, best)
        return best

    def _end(self, history, best):
        model, block, key = self.model, self.block, self.key
        last = model.epoch
        backup = None
        if best["epoch"] != last:
            if key["load_best"]:
                lrs = [group["lr"] for group in model.optimizer.param_groups]
                model.model.load_state_dict(best["states"]["model"])
                if isinstance(model.loss_fn, torch.nn.Module) and best["states"].get("loss"):
                    model.loss_fn.load_state_dict(best["states"]["loss"])
                model.optimizer.load_state_dict(best["states"]["optimizer"])
                for group, lr in zip(model.optimizer.param_groups, lrs):  # the schedulers keep their end state
                    group["lr"] = lr
                log.info("%s: ended on the best epoch %d (%s %.4g)", block._where, best["epoch"], self.watched,
                         best["value"])
            else:
                backup = best["states"]
        result = {"history": history, "watch": self.watched, "best_epoch": best["epoch"], "best_value": best["value"],
                  "_key": key}
        block._loaders = (self.train_dl, self.val_dl)
        block._commit(result, _random(self.train_dl, self.val_dl), model._states(), backup)
        return result


class Cache:
    """Operations on a checkpoint's end state, computed once and read back afterwards.

    Each result is kept in the checkpoint's directory under its name (by default the
    operation's); a later call with the same name returns it without computing. The
    random streams are left as they were, whether computed or read back.
    """

    def __init__(self, model: Model, cp_id: str):
        self.model = model
        self.id = cp_id
        self._where = f"checkpoint {cp_id} of model {model.id}"

    def _file(self, name):
        return _CACHE_PREFIX + _check_id(name, "a cached result's name") + ".pt"

    def get(self, name: str) -> Any:
        """The cached result ``name`` (``None`` when there is none)."""
        file = self._file(name)
        if not self.model._has(self.id, file):
            return None
        return self.model._read(self.id, file)["result"]

    def names(self) -> list:
        """The names of the cached results."""
        try:
            manifest = read_manifest(self.model.checkpoint_directory(self.id))
        except OSError:
            return []
        files = manifest[1] if manifest else {}
        return sorted(n[len(_CACHE_PREFIX):-3] for n, r in files.items()
                      if n.startswith(_CACHE_PREFIX) and n.endswith(".pt") and not r.get("retired"))

    def _cached(self, name, key, compute, loaders=()):
        file = self._file(name)
        model = self.model
        record = model._block(self.id)
        if record is None or not record["complete"]:
            raise CheckpointNotFoundError(f"{self._where} does not exist or never ran to its end: run its block first")
        if model._has(self.id, file):
            stored = model._read(self.id, file)
            if stored["key"] != key:
                log.warning("%s: the cached %r was computed with %s; this call asks %s. The cached result is returned; "
                            "delete it to compute it again: model.cache(%r).delete(%r)",
                            self._where, name, stored["key"], key, self.id, name)
            log.info("%s: %s read from the cache", self._where, name)
            return stored["result"]
        kept = _random(*loaders)  # computing draws nothing from the streams that follow it
        try:
            with self._end_state(record) as target:
                result = compute(target)
        finally:
            _set_random(kept, *loaders)
        directory = model.checkpoint_directory(self.id)
        with RunLock(directory):
            model._writer(self.id).save_files({file: (_save_bytes({"key": key, "result": result}), _fields("cache"))})
        return result

    @contextlib.contextmanager
    def _end_state(self, record):
        """A :class:`Model` holding the checkpoint's end state: the model itself when it stands there, else a copy."""
        model = self.model
        if model._holds == "checkpoint" and model.current == self.id and model._current_token == record["token"]:
            yield model
            return
        other = copy.copy(model)
        other.model = copy.deepcopy(model.model)
        other._writers = {}
        other.load_checkpoint(self.id)
        yield other

    def evaluate(self, dataloader: Iterable, metrics: Sequence[Callable] = (), *, name: str = "evaluate") -> dict:
        """The mean loss and metrics of the checkpoint's model on ``dataloader``: ``{"loss": ..., "<metric>": ...}``."""
        names = [_metric_name(fn) for fn in metrics]
        key = {"op": "evaluate", "metrics": names, "samples": _samples(dataloader)}

        def compute(target):
            if target.loss_fn is None:
                raise SetupError(f"{self._where} has no loss to evaluate")
            sums, count = _mean_pass(target, dataloader, names, metrics)
            if not count:
                raise SetupError("the DataLoader to evaluate on yielded no batch")
            return {n: sums[n] / count for n in sums}
        return self._cached(name, key, compute, (dataloader,))

    def find_lr(self, dataloader: Iterable, optimizer_cls: Optional[type[torch.optim.Optimizer]] = None,
                optimizer_args: Optional[dict] = None, loss_cls: Optional[type[torch.nn.Module]] = None, *,
                epochs: int = 1, min_rate: float = 1e-8, max_rate: float = 1.0, name: str = "find_lr") -> dict:
        """A learning-rate range test on a copy of the checkpoint's model (the checkpoint is not changed).

        The learning rate grows geometrically from ``min_rate`` to ``max_rate`` over
        ``epochs`` passes of ``dataloader`` (it stops early when the loss diverges).

        :param optimizer_cls: the optimizer to test (default: the checkpoint's, with its state).
        :return: ``{"lrs": [...], "losses": [...] (smoothed), "suggested_lr": float}``: the
            suggestion is where the smoothed loss falls fastest.
        """
        if not 0 < min_rate < max_rate:
            raise SetupError(f"need 0 < min_rate < max_rate, not {min_rate!r}, {max_rate!r}")
        key = {"op": "find_lr", "optimizer": qualified_name(optimizer_cls) if optimizer_cls else None,
               "optimizer_args": _plain(dict(optimizer_args or {}), "optimizer_args"),
               "loss": qualified_name(loss_cls) if loss_cls else None, "epochs": epochs, "min_rate": min_rate,
               "max_rate": max_rate, "samples": _samples(dataloader)}

        def compute(target):
            module = copy.deepcopy(target.model)
            loss_fn = loss_cls() if loss_cls is not None else target.loss_fn
            if loss_fn is None:
                raise SetupError(f"{self._where} has no loss; give loss_cls=")
            if optimizer_cls is not None:
                optimizer = optimizer_cls(module.parameters(), **{**(optimizer_args or {}), "lr": min_rate})
            elif target.optimizer is not None:
                entry = target.recipe["optimizer"]
                cls = target._class("optimizer", entry["cls"], self._where)
                optimizer = cls(module.parameters(), **{**entry["args"], **(optimizer_args or {})})
                optimizer.load_state_dict(copy.deepcopy(target.optimizer.state_dict()))  # the live state stays
            else:
                raise SetupError(f"{self._where} has no optimizer; give optimizer_cls=")
            if not hasattr(dataloader, "__len__"):
                raise SetupError("find_lr needs a DataLoader with a length (not over an IterableDataset)")
            total = epochs * len(dataloader)
            factor = (max_rate / min_rate) ** (1 / max(total - 1, 1))
            lrs, losses = [], []
            average, best, lr = 0.0, math.inf, min_rate
            device = next(module.parameters()).device
            module.train()
            for _ in range(epochs):
                for batch in dataloader:
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    inputs, targets = _to(_split_batch(batch), device)
                    optimizer.zero_grad()
                    loss = loss_fn(_call(module, inputs), targets)
                    loss.backward()
                    optimizer.step()
                    average = 0.98 * average + 0.02 * _value(loss)
                    smoothed = average / (1 - 0.98 ** (len(losses) + 1))
                    lrs.append(lr)
                    losses.append(smoothed)
                    best = min(best, smoothed)
                    if not math.isfinite(smoothed) or smoothed > 4 * best:
                        break
                    lr *= factor
                else:
                    continue
                break
            slopes = [(losses[i + 1] - losses[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(len(losses) - 1)]
            suggested = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[0]
            return {"lrs": lrs, "losses": losses, "suggested_lr": suggested}
        return self._cached(name, key, compute, (dataloader,))

    def delete(self, name: Optional[str] = None) -> None:
        """Delete the cached result ``name``, or every cached result of the checkpoint."""
        directory = self.model.checkpoint_directory(self.id)
        files = [self._file(name)] if name is not None else [self._file(n) for n in self.names()]
        files = [f for f in files if self.model._has(self.id, f)]
        if not files:
            return
        with RunLock(directory):
            self.model._writer(self.id).save_files({}, retire=files)


def _blocks(directory):
    """The records of the checkpoints under a model directory, oldest first (unreadable ones logged)."""
    entries = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        try:
            manifest = read_manifest(path)
            if not manifest or BLOCK_NAME not in manifest[1]:
                continue
            record = verified_load(os.path.join(path, BLOCK_NAME), map_location="cpu")
        except Exception as e:  # a damaged checkpoint is shown, not fatal to the listing
            log.warning("checkpoint directory %s cannot be read: %s", path, e)
            continue
        record["cached"] = sorted(n[len(_CACHE_PREFIX):-3] for n, r in manifest[1].items()
                                  if n.startswith(_CACHE_PREFIX) and not r.get("retired"))
        entries.append(record)
    entries.sort(key=lambda r: (r.get("created", 0), r["id"]))
    return entries


def _label(record):
    results = record["results"]
    parts = []
    if results:
        epochs = sum(len(r["result"]["history"]["epoch"]) for r in results)
        last = results[-1]["result"]
        parts.append(f"{len(results)} train call{'s' if len(results) > 1 else ''}, {epochs} epochs to epoch "
                     f"{record.get('epoch')}, best {last['watch']} {last['best_value']:.4g} "
                     f"at epoch {last['best_epoch']}")
    else:
        parts.append("no training")
    if record.get("cached"):
        parts.append("cached: " + ", ".join(record["cached"]))
    if not record["complete"]:
        parts.append("UNFINISHED")
    text = f"{record['id']}"
    if record.get("description"):
        text += f" \"{record['description']}\""
    return text + " (" + "; ".join(parts) + ")"


def tree(directory: "str | os.PathLike", title: Optional[str] = None) -> str:
    """The checkpoints of a model directory (``<root>/<model id>``) as a tree of forks."""
    directory = os.fspath(directory)
    records = _blocks(directory)
    ids = {r["id"] for r in records}
    children: dict[Optional[str], list[dict]] = {}
    for record in records:
        parent = record["parent"] if record["parent"] in ids else None
        children.setdefault(parent, []).append(record)
    if title is None:
        described = [r.get("model_description") for r in records if r.get("model_description")]
        title = os.path.basename(os.path.abspath(directory)) + (f": {described[-1]}" if described else "")
    lines = [title]
    if not records:
        lines.append("  (no checkpoints)")

    def walk(record, prefix, last):
        lines.append(prefix + ("└── " if last else "├── ") + _label(record)
                     + (f" [parent {record['parent']} deleted]" if record["parent"] is not None
                        and record["parent"] not in ids else ""))
        kids = children.get(record["id"], [])
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("    " if last else "│   "), i == len(kids) - 1)
    roots = children.get(None, [])
    for i, record in enumerate(roots):
        walk(record, "", i == len(roots) - 1)
    return "\n".join(lines)
