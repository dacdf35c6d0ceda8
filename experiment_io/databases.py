"""Databases: named numpy arrays split into train, valid and test, served in batches.

The split and the per-epoch shuffling are pure functions of the seed (and the
epoch), so a restarted run sees the very same data order without any generator
state to carry: the order of epoch ``e`` is :meth:`Database.epoch_order`\\ ``(e)``.

Databases read from a file (:class:`NPZDatabase`, :class:`HDF5Database`) are
:class:`Restartable`: the structure file stores a descriptor (the class's import
path and the arguments that rebuild it) instead of the arrays.
"""
import logging
import os
from typing import Iterator, Mapping, Optional, Sequence, Union

import h5py
import numpy as np
import torch
import xxhash

from .errors import DatabaseRestartError, IncompatibleCheckpointError, _SetupKeyError
from .names import resolve
from .ordering import epoch_permutation, global_steps

__all__ = ["Database", "Restartable", "NPZDatabase", "HDF5Database", "restore_database", "SPLITS"]

log = logging.getLogger(__name__)

#: The names of the splits, in the order their indices are drawn.
SPLITS = ("train", "valid", "test")

_SPLIT_STREAM = 0x5EED
_EPOCH_STREAM = 0xE90C


def _split_count(size, n, name):
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"{name} must be a fraction in [0, 1) or a number of samples, not {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{name}={size} must be a fraction in [0, 1) or an integer count")
        return int(round(size * n))
    if size < 0 or size > n:
        raise ValueError(f"{name}={size} must lie between 0 and the number of samples ({n})")
    return size


class Database:
    """Named arrays with a seeded split and a seeded shuffle per epoch.

    :param arrays: ``{name: numpy array}``, all with the same first dimension.
    :param inputs: names of the arrays fed to the model, in order.
    :param targets: names of the arrays the loss compares with, in order.
    :param seed: seed of the split and of every epoch's shuffle.
    :param valid_size: fraction (float) or number (int) of samples for validation.
    :param test_size: fraction (float) or number (int) of samples for testing.
    :param float_dtype: dtype that floating arrays are cast to (default: torch's
        default dtype, normally float32).
    """

    restartable = False

    def __init__(self, arrays: Mapping[str, np.ndarray], inputs: Sequence[str], targets: Sequence[str], seed: int,
                 valid_size: Union[int, float] = 0.1, test_size: Union[int, float] = 0.1, *, float_dtype=None):
        inputs, targets = list(inputs), list(targets)
        if not inputs or not targets:
            raise ValueError("a database needs at least one input and one target array")
        missing = [name for name in inputs + targets if name not in arrays]
        if missing:
            raise _SetupKeyError(f"arrays {missing} were named as inputs or targets but are not in the database (it has "
                                 f"{sorted(arrays)}); name arrays it has")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
        dtype = np.dtype(float_dtype) if float_dtype is not None else torch.empty(0).numpy().dtype
        self.arrays = {}
        for name in dict.fromkeys(inputs + targets):
            array = np.asarray(arrays[name])
            if np.issubdtype(array.dtype, np.floating):
                array = array.astype(dtype, copy=False)
            self.arrays[name] = array
        lengths = {name: len(a) for name, a in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must all have the same number of samples, got {lengths}")
        self.n_samples = next(iter(lengths.values()))
        self.inputs, self.targets = inputs, targets
        self.seed = seed
        self.valid_size, self.test_size = valid_size, test_size
        self.float_dtype = str(dtype)
        n_test = _split_count(test_size, self.n_samples, "test_size")
        n_valid = _split_count(valid_size, self.n_samples, "valid_size")
        if n_test + n_valid >= self.n_samples:
            raise ValueError(f"valid_size and test_size leave no training samples out of {self.n_samples}")
        order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(self.n_samples)
        self.splits = {
            "test": np.sort(order[:n_test]),
            "valid": np.sort(order[n_test:n_test + n_valid]),
            "train": np.sort(order[n_test + n_valid:]),
        }

    def __len__(self):
        return self.n_samples

    def split_size(self, split: str) -> int:
        """The number of samples in ``split``."""
        return len(self._split_indices(split))

    def _split_indices(self, split):
        try:
            return self.splits[split]
        except KeyError:
            raise KeyError(f"unknown split {split!r}; the splits are {list(SPLITS)}") from None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the training split.

        :return: positions within the training split, a permutation of
            ``range(split_size("train"))`` that depends only on the seed and the epoch.
        """
        return epoch_permutation(self.seed, _EPOCH_STREAM, epoch, self.split_size("train"))

    def sample_indices(self, split: str, positions: np.ndarray) -> np.ndarray:
        """Map positions within a split to indices of the arrays."""
        return self._split_indices(split)[positions]

    def get(self, indices: np.ndarray) -> tuple:
        """The samples at ``indices`` (of the arrays) as ``(inputs, targets)`` tuples of CPU tensors."""
        def take(name):
            return torch.from_numpy(np.ascontiguousarray(self.arrays[name][indices]))
        return tuple(take(n) for n in self.inputs), tuple(take(n) for n in self.targets)

    def batches(self, split: str, batch_size: int, *, order: Optional[np.ndarray] = None, start: int = 0) -> Iterator[tuple]:
        """Iterate over a split in batches.

        :param order: positions within the split to visit (default: the split in
            index order).
        :param start: number of samples of ``order`` to skip (for a resumed epoch).
        :return: an iterator of ``(inputs, targets)``.
        """
        if order is None:
            order = np.arange(self.split_size(split))
        indices = self.sample_indices(split, order[start:])
        for begin in range(0, len(indices), batch_size):
            yield self.get(indices[begin:begin + batch_size])

    def shard_batches(self, split: str, batch_size: int, *, order: np.ndarray, start: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[tuple]:
        """This rank's batches of a split in a data-parallel run (see :func:`~experiment_io.ordering.global_steps`).

        With one rank, the batches of :meth:`batches`.

        :param start: samples of ``order`` already trained on, by all ranks together.
        :return: an iterator of ``(inputs, targets, n, step_size)``: ``n`` samples of
            this rank, of the ``step_size`` of the whole step. A rank whose share of
            the last step is empty gets a sample of the epoch as a stand-in, with
            ``n = 0``: the training loop gives its loss no weight, but every rank
            takes part in the step's gradient reduction.
        """
        if world_size == 1:
            for inputs, targets in self.batches(split, batch_size, order=order, start=start):
                yield inputs, targets, len(targets[0]), len(targets[0])
            return
        for share, step_size in global_steps(order[start:], batch_size, rank, world_size):
            n = len(share)
            stand_in = order[start:][:1] if n == 0 else share
            yield (*self.get(self.sample_indices(split, stand_in)), n, step_size)

    def fingerprint(self) -> dict:
        """What a resume must find unchanged: the seed, the split sizes and a digest of the data (plain data)."""
        if getattr(self, "_data_digest", None) is None:
            digest = xxhash.xxh3_128()
            for name in sorted(self.arrays):
                array = np.ascontiguousarray(self.arrays[name])
                digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
                digest.update(memoryview(array).cast("B"))
            self._data_digest = f"xxh3_128:{digest.hexdigest()}"
        return {"seed": self.seed, "n_samples": self.n_samples, "split_sizes": {s: self.split_size(s) for s in SPLITS},
                "data": self._data_digest}

    def check_fingerprint(self, state: dict) -> None:
        """Check that this database is the one a checkpoint was trained on.

        :raises IncompatibleCheckpointError: when the seed, the split sizes or the data
            differ (the resumed run would silently train on other data, or in another order).
        """
        mine = self.fingerprint()
        if "data" in state and state["data"] != mine["data"] and {k: v for k, v in state.items() if k != "data"} == \
                {k: v for k, v in mine.items() if k != "data"}:
            where = f" read from {self.path}" if getattr(self, "path", None) else ""
            raise IncompatibleCheckpointError(
                f"the data{where} differ from those the run was trained on (same seed and sizes, other values: "
                "the file was replaced or changed since). The resumed run would train on other data. Restore the "
                "data the run was trained on, or start a new run on the new data.")
        if any(state.get(k) != v for k, v in mine.items() if k in state):
            raise IncompatibleCheckpointError(
                f"the database given for the restart differs from the one the run was trained on "
                f"(checkpoint: {state}, given: {mine}); the resumed run would see other data in another "
                "order. Pass the same data, seed and split sizes, or start a new run."
            )


class Restartable:
    """Mixin of databases that can be rebuilt from a descriptor.

    A subclass stores the keyword arguments that rebuild it in ``self.restart_kwargs``
    (plain data only) and is rebuilt as ``cls(**restart_kwargs)``.
    """

    restartable = True

    def descriptor(self) -> dict:
        """``{"class": "module.QualName", "kwargs": {...}}``, plain data."""
        cls = type(self)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": dict(self.restart_kwargs)}


def _common_kwargs(path, inputs, targets, seed, valid_size, test_size, float_dtype):
    return {
        "path": os.path.abspath(os.fspath(path)), "inputs": list(inputs), "targets": list(targets), "seed": seed,
        "valid_size": valid_size, "test_size": test_size, "float_dtype": None if float_dtype is None else str(np.dtype(float_dtype)),
    }


def _check_names(path, inputs, targets, held, what):
    """Refuse input or target names that the data file does not hold, naming what it holds."""
    for role, names in (("inputs", inputs), ("targets", targets)):
        missing = [n for n in names if n not in held]
        if missing:
            close = {n: [h for h in held if h.lower() == str(n).lower()] for n in missing}
            hint = "".join(f" ({n!r} differs from {c[0]!r} in case only)" for n, c in close.items() if c)
            raise _SetupKeyError(f"{role}={list(names)}: {path} holds no {what} {missing}{hint}; it holds the {what} "
                                 f"{sorted(held)}. Name {what} the file holds.")


class NPZDatabase(Restartable, Database):
    """A database read from a numpy ``.npz`` archive.

    :param path: the archive; its arrays are looked up by the names in ``inputs``
        and ``targets``. Other parameters as :class:`Database`.
    """

    def __init__(self, path, inputs, targets, seed, valid_size=0.1, test_size=0.1, *, float_dtype=None):
        self.restart_kwargs = _common_kwargs(path, inputs, targets, seed, valid_size, test_size, float_dtype)
        with np.load(self.restart_kwargs["path"], allow_pickle=False) as archive:
            _check_names(self.restart_kwargs["path"], inputs, targets, list(archive.files), "arrays")
            arrays = {name: archive[name] for name in dict.fromkeys(list(inputs) + list(targets))}
        super().__init__(arrays, inputs, targets, seed, valid_size, test_size, float_dtype=float_dtype)
        self.path = self.restart_kwargs["path"]


class HDF5Database(Restartable, Database):
    """A database read from an HDF5 file; each named array is a dataset of the file.

    :param path: the HDF5 file. Other parameters as :class:`Database`.
    """

    def __init__(self, path, inputs, targets, seed, valid_size=0.1, test_size=0.1, *, float_dtype=None):
        self.restart_kwargs = _common_kwargs(path, inputs, targets, seed, valid_size, test_size, float_dtype)
        with h5py.File(self.restart_kwargs["path"], "r") as h5:
            held = []
            h5.visititems(lambda name, obj: held.append(name) if isinstance(obj, h5py.Dataset) else None)
            _check_names(self.restart_kwargs["path"], inputs, targets, held, "datasets")
            arrays = {name: h5[name][()] for name in dict.fromkeys(list(inputs) + list(targets))}
        super().__init__(arrays, inputs, targets, seed, valid_size, test_size, float_dtype=float_dtype)
        self.path = self.restart_kwargs["path"]


def restore_database(descriptor: dict, *, allow: Sequence = ()) -> "Database":
    """Rebuild a database from its descriptor.

    Only classes from experiment_io, from modules already imported, or from modules
    named in ``allow`` are used; nothing else is imported.

    :raises DatabaseRestartError: when the class cannot be found or is not a
        restartable database, or its file is gone; the message names both.
    """
    class_path = descriptor.get("class") if isinstance(descriptor, dict) else None
    kwargs = descriptor.get("kwargs") if isinstance(descriptor, dict) else None
    if not isinstance(class_path, str) or not isinstance(kwargs, dict):
        raise DatabaseRestartError(f"the database descriptor {descriptor!r} is malformed; pass database= yourself")
    allowed = ["experiment_io"] + [a for a in allow if isinstance(a, str)]
    cls, _ = resolve(class_path, allowed)
    where = kwargs.get("path", "<no file>")
    if not (isinstance(cls, type) and issubclass(cls, Restartable) and issubclass(cls, Database)):
        raise DatabaseRestartError(
            f"cannot rebuild the database: class {class_path} (data file {where}) "
            + ("is not a restartable Database" if isinstance(cls, type) else "cannot be found among the modules imported or allowed")
            + ". Import its module first, name the module in allow=[...], or pass database= yourself."
        )
    if "path" in kwargs and not os.path.exists(kwargs["path"]):
        raise DatabaseRestartError(
            f"cannot rebuild the database {class_path}: its data file {where} does not exist (moved or deleted?). "
            f"Pass database={cls.__name__}('<new path>', ...) with the same seed and splits to the load function."
        )
    try:
        database = cls(**kwargs)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DatabaseRestartError(f"rebuilding the database {class_path} from {where} failed: {e}. Pass database= yourself.") from e
    log.info("database rebuilt: %s from %s", class_path, where)
    return database
