"""The run directory: one object for where a run's files are, its lock and its writer.

Code above the storage layer never joins a run's paths itself: it holds a
:class:`RunDirectory` and asks it. The object is made once per run (by
``train_model``, a saver, the command line) and handed down, so that the directory
is made absolute, created and locked in one place, and one writer commits its saves.
"""
from __future__ import annotations

import os
from typing import Union

from experiment_io.errors import CheckpointWriteError
from experiment_io.storage.interface import RunStorage, as_storage
from experiment_io.storage.lock import RunLock
from experiment_io.storage.writer import RunWriter

__all__ = ["RunDirectory", "RunPlace", "as_run_directory"]


class RunDirectory:
    """A run's place: its :class:`~experiment_io.storage.interface.RunStorage`, its lock, its writer.

    :param where: the run's storage, or its directory (a path; ``None``: the current directory). Nothing is
        created until :meth:`create`, :meth:`lock` or :attr:`writer` needs it.
    """

    def __init__(self, where: RunStorage | str | os.PathLike | None = None):
        self.storage = as_storage(where)
        self._writer: RunWriter | None = None

    def __repr__(self) -> str:
        return f"RunDirectory({self.location!r})"

    @property
    def location(self) -> str:
        """Where the run lives, in words a user recognises (a directory's absolute path)."""
        return self.storage.location

    def path(self, name: str) -> str:
        """The path at which the run's file ``name`` is read."""
        return self.storage.path(name)

    def folder(self, name: str) -> str:
        """The path of the run's sub-folder ``name`` (files that are not checkpoints, such as the plots).

        :raises CheckpointWriteError: when something other than a real folder is there: a link (which the library
            never makes) would send what is written into it to a place outside the run.
        """
        path = os.path.join(self.location, name)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            what = f"a link to {os.readlink(path)}" if os.path.islink(path) else "not a folder"
            raise CheckpointWriteError(
                f"{path} is {what}: the run's {name!r} folder must be a folder of the run, which the library makes "
                f"itself. Remove it ({path}) and the next write makes the folder.")
        return path

    def exists(self) -> bool:
        """Whether the run's place exists."""
        return self.storage.exists()

    def create(self) -> None:
        """Make the run's place if it is missing.

        :raises CheckpointWriteError: naming the cause.
        """
        self.storage.create()

    def lock(self) -> RunLock:
        """The run's :class:`~experiment_io.RunLock` (the place is created first); enter it to hold it."""
        self.create()
        return self.storage.lock()

    @property
    def writer(self) -> RunWriter:
        """The run's :class:`~experiment_io.storage.writer.RunWriter`, made at the first use (the place created)."""
        if self._writer is None:
            self._writer = RunWriter(self.storage)
        return self._writer


#: What the functions of the library take as a run's place.
RunPlace = Union[RunDirectory, RunStorage, str, os.PathLike, None]


def as_run_directory(where: RunPlace) -> RunDirectory:
    """``where`` as a :class:`RunDirectory` (one given is returned as it is)."""
    return where if isinstance(where, RunDirectory) else RunDirectory(where)
