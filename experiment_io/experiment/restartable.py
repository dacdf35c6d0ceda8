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

from experiment_io.errors import DataFileNotFoundError, DatabaseRestartError, UnknownNameError
from experiment_io.experiment.databases import Database
from experiment_io.format.names import resolve

__all__ = ["Restartable", "NPZDatabase", "HDF5Database", "restore_database", "data_file_of"]

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


def _require_data_file(given, path, suffixes):
    """Refuse a data file that is not there, naming the files of that directory that look like one."""
    if os.path.isfile(path):
        return
    folder = os.path.dirname(path)
    try:
        near = sorted(n for n in os.listdir(folder) if n.lower().endswith(suffixes))[:8]
    except OSError:
        near = None
    where = f" ({path})" if os.fspath(given) != path else ""
    if near is None:
        hint = f"its directory {folder} does not exist either"
    elif near:
        hint = f"{folder} holds {', '.join(near)}"
    else:
        hint = f"{folder} holds no file ending in {' or '.join(suffixes)}"
    raise DataFileNotFoundError(f"data file {os.fspath(given)!r}{where} does not exist: {hint}. Give the path of the "
                                "data file (relative to the current directory, or absolute).")


def _check_names(path, inputs, targets, held, what):
    """Refuse input or target names that the data file does not hold, naming what it holds."""
    for role, names in (("inputs", inputs), ("targets", targets)):
        missing = [n for n in names if n not in held]
        if missing:
            close = {n: [h for h in held if h.lower() == str(n).lower()] for n in missing}
            hint = "".join(f" ({n!r} differs from {c[0]!r} in case only)" for n, c in close.items() if c)
            raise UnknownNameError(f"{role}={list(names)}: {path} holds no {what} {missing}{hint}; it holds the {what} "
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
        _require_data_file(path, self.restart_kwargs["path"], (".npz",))
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
        _require_data_file(path, self.restart_kwargs["path"], (".h5", ".hdf5", ".hdf", ".he5"))
        with h5py.File(self.restart_kwargs["path"], "r") as h5:
            held = []
            h5.visititems(lambda name, obj: held.append(name) if isinstance(obj, h5py.Dataset) else None)
            _check_names(self.restart_kwargs["path"], inputs, targets, held, "datasets")
            arrays = {name: h5[name][()] for name in dict.fromkeys(list(inputs) + list(targets))}
        super().__init__(arrays, inputs, targets, seed, test_size, valid_size, float_dtype=float_dtype, splits=splits)
        self.path = self.restart_kwargs["path"]


def data_file_of(descriptor: dict, run_directory: Optional[str] = None,
                 data_file: Union[str, os.PathLike, None] = None) -> Optional[str]:
    """The data file a database rebuilt from ``descriptor`` reads, and why, when that is not the recorded one.

    In this order: ``data_file`` (the user's word); a data file kept inside the run
    directory, found relative to where the run is now (a run copied or moved with its
    data reads its own copy); the recorded absolute path; the recorded path relative
    to the run, from where the run is now (a project moved as a whole); a file of the
    same name in the run directory. A choice other than the recorded path is logged at
    WARNING.

    :return: the path, or ``None`` for a descriptor without a data file.
    """
    kwargs = descriptor["kwargs"]
    recorded = kwargs.get("path")
    if recorded is None and data_file is None:
        return None
    if data_file is not None:
        chosen = os.path.abspath(os.fspath(data_file))
        if chosen != recorded:
            log.warning("the database reads %s (data_file=), not %s where the run was trained on it", chosen, recorded)
        return chosen
    relative = descriptor.get("run_relative_path")
    inside = beside = None
    kept = False  # a data file kept inside the run directory travels with the run
    if run_directory is not None and isinstance(relative, str):
        inside = os.path.normpath(os.path.join(run_directory, relative))
        up = os.path.normpath(relative)
        kept = up != os.pardir and not up.startswith(os.pardir + os.sep)
    if run_directory is not None and isinstance(recorded, str):
        beside = os.path.join(run_directory, os.path.basename(recorded))
    candidates = [inside if kept else None, recorded, inside, beside]
    for path in dict.fromkeys(c for c in candidates if isinstance(c, str)):
        if os.path.isfile(path):
            if path != recorded:
                log.warning("the run was trained on %s; the restart reads %s instead (the data file %s with the run "
                            "directory). Pass data_file=<path> to the load function to read another.", recorded, path,
                            "kept" if kept else "found")
            return path
    return recorded


def restore_database(descriptor: dict, *, allow: Sequence = (), run_directory: Optional[str] = None,
                     data_file: Union[str, os.PathLike, None] = None) -> "Database":
    """Rebuild a database from its descriptor.

    Only classes from experiment_io, from modules already imported, or from modules
    named in ``allow`` are used; nothing else is imported.

    :param run_directory: the directory of the run the descriptor comes from, as it is
        now: a data file kept inside it is found relative to it (see :func:`data_file_of`).
    :param data_file: the data file to read instead of the recorded one (a moved data
        file); the database's fingerprint, checked by the loaders, makes sure it holds
        the same data.
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
    path = data_file_of(descriptor, run_directory, data_file)
    if path is not None:
        if not os.path.isfile(path):
            raise DatabaseRestartError(
                f"cannot rebuild the database {class_path}: its data file {path} does not exist (moved or deleted?). "
                "Pass data_file='<its new path>' to the load function: the run's inputs, targets, seed and splits "
                "are kept, and the data is checked against the run's fingerprint of it.")
        kwargs = {**kwargs, "path": path}
    try:
        database = cls(**kwargs)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DatabaseRestartError(f"rebuilding the database {class_path} from {path or where} failed: {e}. "
                                   "Pass data_file=<path> or database= yourself.") from e
    log.info("database rebuilt: %s from %s", class_path, path or where)
    return database
