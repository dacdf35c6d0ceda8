"""Databases read from a file and rebuilt from a descriptor: :class:`NPZDatabase`, :class:`HDF5Database`.

They are :class:`Restartable`: the structure file stores a descriptor (the class's
import path and the plain arguments that rebuild it, e.g. the file's path) instead of
the arrays, and :func:`restore_database` rebuilds the database from it at a restart,
importing nothing that is not allowed.
"""
import logging
import os
from typing import Mapping, Optional, Sequence, Union

import h5py
import numpy as np
from numpy.typing import DTypeLike

from experiment_io.errors import DatabaseRestartError, _SetupKeyError
from experiment_io.experiment.databases import Database
from experiment_io.format.names import resolve

__all__ = ["Restartable", "NPZDatabase", "HDF5Database", "restore_database"]

log = logging.getLogger(__name__)


class Restartable:
    """Mixin of databases that can be rebuilt from a descriptor.

    A subclass stores the keyword arguments that rebuild it in ``self.restart_kwargs``
    (plain data only) and is rebuilt as ``cls(**restart_kwargs)``.
    """

    restartable = True
    restart_kwargs: dict

    def descriptor(self) -> dict:
        """``{"class": "module.QualName", "kwargs": {...}}``, plain data."""
        cls = type(self)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": dict(self.restart_kwargs)}


def _common_kwargs(path, inputs, targets, seed, valid_size, test_size, float_dtype, splits=None):
    if splits is None:  # the defaults, written out: a descriptor rebuilds the same split whatever the defaults become
        valid_size = 0.1 if valid_size is None else valid_size
        test_size = 0.1 if test_size is None else test_size
    kwargs = {
        "path": os.path.abspath(os.fspath(path)), "inputs": list(inputs), "targets": list(targets), "seed": seed,
        "valid_size": valid_size, "test_size": test_size,
        "float_dtype": None if float_dtype is None else str(np.dtype(float_dtype)),
    }
    if splits is not None:  # plain lists: the descriptor is plain data
        kwargs["splits"] = {name: np.asarray(indices).tolist() for name, indices in splits.items()}
    return kwargs


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
        and ``targets``. Other parameters as :class:`~experiment_io.experiment.databases.Database` (``test_size`` before
        ``valid_size``, as in hippynn).
    """

    def __init__(self, path: Union[str, os.PathLike], inputs: Sequence[str], targets: Sequence[str], seed: int,
                 test_size: Union[int, float, None] = None, valid_size: Union[int, float, None] = None, *,
                 float_dtype: Optional[DTypeLike] = None,
                 splits: Optional[Mapping[str, Union[Sequence[int], np.ndarray]]] = None, quiet: bool = False):
        self.restart_kwargs = _common_kwargs(path, inputs, targets, seed, valid_size, test_size, float_dtype, splits)
        with np.load(self.restart_kwargs["path"], allow_pickle=False) as archive:
            _check_names(self.restart_kwargs["path"], inputs, targets, list(archive.files), "arrays")
            arrays = {name: archive[name] for name in dict.fromkeys(list(inputs) + list(targets))}
        super().__init__(arrays, inputs, targets, seed, test_size, valid_size, float_dtype=float_dtype, splits=splits)
        self.path = self.restart_kwargs["path"]


class HDF5Database(Restartable, Database):
    """A database read from an HDF5 file; each named array is a dataset of the file.

    :param path: the HDF5 file. Other parameters as :class:`~experiment_io.experiment.databases.Database` (``test_size``
        before ``valid_size``, as in hippynn).
    """

    def __init__(self, path: Union[str, os.PathLike], inputs: Sequence[str], targets: Sequence[str], seed: int,
                 test_size: Union[int, float, None] = None, valid_size: Union[int, float, None] = None, *,
                 float_dtype: Optional[DTypeLike] = None,
                 splits: Optional[Mapping[str, Union[Sequence[int], np.ndarray]]] = None, quiet: bool = False):
        self.restart_kwargs = _common_kwargs(path, inputs, targets, seed, valid_size, test_size, float_dtype, splits)
        with h5py.File(self.restart_kwargs["path"], "r") as h5:
            held = []
            h5.visititems(lambda name, obj: held.append(name) if isinstance(obj, h5py.Dataset) else None)
            _check_names(self.restart_kwargs["path"], inputs, targets, held, "datasets")
            arrays = {name: h5[name][()] for name in dict.fromkeys(list(inputs) + list(targets))}
        super().__init__(arrays, inputs, targets, seed, test_size, valid_size, float_dtype=float_dtype, splits=splits)
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
            + ("is not a restartable Database" if isinstance(cls, type)
               else "cannot be found among the modules imported or allowed")
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
        raise DatabaseRestartError(f"rebuilding the database {class_path} from {where} failed: {e}. "
                                   "Pass database= yourself.") from e
    log.info("database rebuilt: %s from %s", class_path, where)
    return database

