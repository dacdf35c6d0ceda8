"""Databases: named numpy arrays split into train, valid and test, served in batches.

The split and the per-epoch shuffling are pure functions of the seed (and the
epoch), so a restarted run sees the very same data order without any generator
state to carry: the order of epoch ``e`` is :meth:`Database.epoch_order`\\ ``(e)``.

Databases read from a file are in :mod:`experiment_io.experiment.restartable`.
"""
import logging
from typing import Any, Iterator, Mapping, Optional, Sequence, Union, cast

import numpy as np
import torch
import xxhash

from experiment_io.errors import IncompatibleCheckpointError, SetupError, UnknownNameError
from experiment_io.experiment.ordering import epoch_permutation, global_steps

__all__ = ["Database", "SPLITS"]

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

    :param arr_dict: ``{name: numpy array}``, all with the same first dimension
        (also accepted as ``arrays=``).
    :param inputs: names of the arrays fed to the model, in order.
    :param targets: names of the arrays the loss compares with, in order.
    :param seed: seed of the split and of every epoch's shuffle.
    :param test_size: fraction (float) or number (int) of samples for testing
        (default 0.1).
    :param valid_size: fraction (float) or number (int) of samples for validation
        (default 0.1). The order of these two is hippynn's.
    :param float_dtype: dtype that floating arrays are cast to (default: torch's
        default dtype, normally float32).
    :param splits: explicit split indices instead of a split drawn from the seed:
        ``{"train": indices, "valid": indices, "test": indices}`` (arrays or lists of
        sample indices, disjoint); a split left out is empty, except ``"train"``,
        which then takes the rest. Not with ``test_size`` or ``valid_size``.
    :param auto_split: take the splits from boolean arrays named ``split_train``,
        ``split_valid`` and ``split_test`` of ``arr_dict`` (hippynn's convention).
    :param quiet: accepted for hippynn's signature; experiment_io logs instead of
        printing, so it changes nothing.

    A split drawn from the seed: the samples are permuted with
    ``numpy.random.default_rng([seed, 0x5EED])``; the first ``test_size`` of the
    permutation are the test split, the next ``valid_size`` the validation split, the
    rest the training split (each sorted). This differs from hippynn's draw for the
    same seed: to keep a hippynn split, pass its indices as ``splits``.
    """

    restartable = False

    def __init__(self, arr_dict: Optional[Mapping[str, np.ndarray]] = None, inputs: Optional[Sequence[str]] = None,
                 targets: Optional[Sequence[str]] = None, seed: Optional[int] = None,
                 test_size: Union[int, float, None] = None, valid_size: Union[int, float, None] = None, *,
                 float_dtype: Any = None, splits: Optional[Mapping[str, Any]] = None, auto_split: bool = False,
                 quiet: bool = False, arrays: Optional[Mapping[str, np.ndarray]] = None):
        if (arr_dict is None) == (arrays is None):
            raise SetupError("pass the arrays once: as the first argument (arr_dict) or as arrays=")
        arrays = cast(Mapping[str, np.ndarray], arr_dict if arr_dict is not None else arrays)
        if inputs is None or targets is None or seed is None:
            raise SetupError("a database needs inputs, targets and a seed")
        inputs, targets = list(inputs), list(targets)
        if not inputs or not targets:
            raise SetupError("a database needs at least one input and one target array")
        missing = [name for name in inputs + targets if name not in arrays]
        if missing:
            raise UnknownNameError(f"arrays {missing} were named as inputs or targets but are not in the database "
                                 f"(it has {sorted(arrays)}); name arrays it has")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SetupError(f"seed must be a non-negative integer, not {seed!r}")
        if auto_split:
            if splits is not None:
                raise SetupError("pass splits= or auto_split=True, not both")
            splits = {s: np.flatnonzero(np.asarray(arrays[f"split_{s}"])) for s in SPLITS if f"split_{s}" in arrays}
            if not splits:
                raise SetupError(f"auto_split=True, but the arrays hold none of split_train, split_valid, split_test "
                                 f"(they are {sorted(arrays)})")
        if splits is not None and (test_size is not None or valid_size is not None):
            raise SetupError("explicit splits= (or auto_split=True) decide the split sizes: leave out test_size and "
                             "valid_size")
        test_size = 0.1 if test_size is None and splits is None else test_size
        valid_size = 0.1 if valid_size is None and splits is None else valid_size
        dtype = np.dtype(float_dtype) if float_dtype is not None else torch.empty(0).numpy().dtype
        self.arrays = {}
        for name in dict.fromkeys(inputs + targets):
            array = np.asarray(arrays[name])
            if np.issubdtype(array.dtype, np.floating):
                array = array.astype(dtype, copy=False)
            self.arrays[name] = array
        lengths = {name: len(a) for name, a in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise SetupError(f"arrays must all have the same number of samples, got {lengths}")
        self.n_samples = next(iter(lengths.values()))
        self.inputs, self.targets = inputs, targets
        self.seed = seed
        self.valid_size, self.test_size = valid_size, test_size
        self.float_dtype = str(dtype)
        if splits is not None:
            self.splits = _explicit_splits(splits, self.n_samples)
            return
        n_test = _split_count(test_size, self.n_samples, "test_size")
        n_valid = _split_count(valid_size, self.n_samples, "valid_size")
        if n_test + n_valid >= self.n_samples:
            raise SetupError(f"valid_size and test_size leave no training samples out of {self.n_samples}")
        order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(self.n_samples)
        self.splits = {
            "test": np.sort(order[:n_test]),
            "valid": np.sort(order[n_test:n_test + n_valid]),
            "train": np.sort(order[n_test + n_valid:]),
        }

    @classmethod
    def from_hippynn(cls, database, seed: int = 0, *, float_dtype=None) -> "Database":
        """A database with the arrays, inputs, targets and split of a split hippynn database.

        hippynn's split is kept exactly (by its ``indices``: sample ``i`` of the result is
        hippynn's sample of the ``i``-th smallest index, so that with hippynn's default
        indices the samples keep their numbers); ``seed`` draws the order of every epoch. The
        arrays are copied into memory, so the database is not restartable from a file: pass it
        again with ``load_checkpoint_from_cwd(database=...)``.

        :param database: a ``hippynn.databases.Database`` after its split.
        :raises SetupError: when it has not been split.
        """
        parts = {name: split for name, split in getattr(database, "splits", {}).items() if name in SPLITS}
        if not parts or any("indices" not in split for split in parts.values()):
            raise SetupError("the hippynn database has no split yet (make_random_split / split_the_rest), or its "
                             "splits lack their 'indices'")
        indices = {name: np.asarray(split["indices"].cpu() if isinstance(split["indices"], torch.Tensor)
                                    else split["indices"]) for name, split in parts.items()}
        order = np.concatenate(list(indices.values()))
        if len(np.unique(order)) != len(order):
            raise SetupError("the splits of the hippynn database share indices")
        rank = np.argsort(order, kind="stable")  # sample i of the result is the i-th smallest of hippynn's indices
        position = np.empty(len(order), dtype=np.int64)
        position[rank] = np.arange(len(order))
        arrays = {}
        for key in dict.fromkeys(list(database.inputs) + list(database.targets)):
            merged = np.concatenate([split[key].cpu().numpy() if isinstance(split[key], torch.Tensor)
                                     else np.asarray(split[key]) for split in parts.values()])
            arrays[key] = merged[rank]
        bounds = np.cumsum([0] + [len(idx) for idx in indices.values()])
        splits = {name: position[bounds[i]:bounds[i + 1]] for i, name in enumerate(indices)}
        return cls(arrays, list(database.inputs), list(database.targets), seed, float_dtype=float_dtype, splits=splits)

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

    def batches(self, split: str, batch_size: int, *, order: Optional[np.ndarray] = None,
                start: int = 0) -> Iterator[tuple]:
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
        """This rank's batches of a split in a data-parallel run (see
        :func:`~experiment_io.experiment.ordering.global_steps`).

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
                digest.update(array.data.cast("B"))
            self._data_digest = f"xxh3_128:{digest.hexdigest()}"
        if getattr(self, "_split_digest", None) is None:
            digest = xxhash.xxh3_128()
            for split in SPLITS:
                digest.update(np.ascontiguousarray(self.splits[split], dtype=np.int64).tobytes() + b";")
            self._split_digest = f"xxh3_128:{digest.hexdigest()}"
        return {"seed": self.seed, "n_samples": self.n_samples, "split_sizes": {s: self.split_size(s) for s in SPLITS},
                "data": self._data_digest, "splits": self._split_digest, "inputs": list(self.inputs),
                "targets": list(self.targets)}

    def _align_names(self, state):
        """Put the inputs and targets in the order the run was trained with (the model takes its inputs by
        position); refuse other names."""
        for role in ("inputs", "targets"):
            stored = state.get(role)
            if stored is None:  # written before the names were stored
                continue
            mine = list(getattr(self, role))
            if sorted(mine) != sorted(stored):
                raise IncompatibleCheckpointError(
                    f"the database's {role} are {mine}, but the run was trained with {role} {list(stored)}: the model "
                    f"would be fed other arrays. Build the database with {role}={list(stored)}.")
            if mine != list(stored):
                log.warning("the database's %s %s are in another order than the run was trained with; realigned to %s",
                            role, mine, list(stored))
                setattr(self, role, list(stored))
                self._data_digest = None

    def check_fingerprint(self, state: dict) -> None:
        """Check that this database is the one a checkpoint was trained on.

        The inputs and targets are put in the order the run was trained with (the
        model takes them by position), with a warning.

        :raises IncompatibleCheckpointError: when the seed, the split, the data, or the
            names of the inputs and targets differ (the resumed run would silently
            train on other data, or in another order).
        """
        self._align_names(state)
        mine = self.fingerprint()
        if "data" in state and state["data"] != mine["data"] and {k: v for k, v in state.items() if k != "data"} == \
                {k: v for k, v in mine.items() if k != "data"}:
            path = getattr(self, "path", None)
            where = f" read from {path}" if path else ""
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


def _explicit_splits(splits, n_samples):
    """Checked, sorted index arrays of explicit splits; the training split takes the rest when left out."""
    if not isinstance(splits, Mapping) or not set(splits) <= set(SPLITS):
        raise SetupError(f"splits must be a dict with keys among {list(SPLITS)}, not {splits!r}")
    found = {}
    for name, indices in splits.items():
        array = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if array.dtype == bool:
            array = np.flatnonzero(array)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise SetupError(f"splits[{name!r}] must be a one-dimensional array of sample indices")
        if len(array) and (array.min() < 0 or array.max() >= n_samples):
            raise SetupError(f"splits[{name!r}] holds indices outside 0..{n_samples - 1}")
        found[name] = np.sort(array.astype(np.int64))
    taken = np.concatenate(list(found.values())) if found else np.zeros(0, np.int64)
    if len(np.unique(taken)) != len(taken):
        raise SetupError("the explicit splits overlap (or repeat an index): each sample belongs to one split at most")
    if "train" not in found:
        found["train"] = np.setdiff1d(np.arange(n_samples), taken)
    for name in SPLITS:
        found.setdefault(name, np.zeros(0, np.int64))
    return found


