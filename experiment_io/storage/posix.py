"""The run's files in a directory of a POSIX file system: the default
:class:`~experiment_io.storage.interface.RunStorage`.

Each file is the name it has in the run, directly in the directory. Writes go
through :class:`~experiment_io.storage.atomic.FileBatch` (temporary file beside the
target, fsync, rename, directory fsync); reads open regular files only.
"""
from __future__ import annotations

import os
import stat as stat_module
from typing import Iterator, Optional

from experiment_io.platform.files import open_regular
from experiment_io.storage import atomic
from experiment_io.storage.interface import FileStat, RunStorage, WriteBatch
from experiment_io.storage.lock import RunLock

__all__ = ["PosixStorage"]


class _Batch(WriteBatch):
    """A :class:`~experiment_io.storage.atomic.FileBatch` addressed by the names of a run."""

    def __init__(self, storage: "PosixStorage"):
        self._storage = storage
        self._files = atomic.FileBatch()
        self._directories: set = set()  # of the files written: their renames are made durable by sync()

    def write(self, name, write, *, hashed=True):
        path = self._storage.path(name)
        self._directories.add(os.path.dirname(path))
        return self._files.write(path, write, hashed=hashed)

    def make_durable(self):
        self._files.make_durable()

    def publish(self, name, keep_previous=None):
        self._files.publish(self._storage.path(name),
                            None if keep_previous is None else self._storage.path(keep_previous))

    def sync(self):
        for directory in sorted(self._directories) or [self._storage.location]:
            self._files.sync_directory(directory)

    def publish_unsynced(self, name, keep_previous=None):
        self._files.publish(self._storage.path(name),
                            None if keep_previous is None else self._storage.path(keep_previous), durable=False)

    def detach(self):
        return self._files.detach_unsynced()

    def __exit__(self, *exc):
        return self._files.__exit__(*exc)


class PosixStorage(RunStorage):
    """The files of a run in ``directory``.

    :param directory: the run directory (made absolute; created by :meth:`create`, never by the constructor).
    """

    def __init__(self, directory: str | os.PathLike):
        self.location = os.path.abspath(os.fspath(directory))

    def __repr__(self):
        return f"PosixStorage({self.location!r})"

    def __eq__(self, other):
        return isinstance(other, PosixStorage) and other.location == self.location

    def __hash__(self):
        return hash(self.location)

    def create(self) -> None:
        atomic.make_directory(self.location)

    def exists(self) -> bool:
        return os.path.isdir(self.location)

    def batch(self) -> WriteBatch:
        return _Batch(self)

    def path(self, name: str) -> str:
        return os.path.join(self.location, name)

    def stat(self, name: str) -> Optional[FileStat]:
        try:
            st = os.lstat(self.path(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return FileStat(st.st_size, stat_module.S_ISREG(st.st_mode), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
                        stat_module.S_ISDIR(st.st_mode))

    def open(self, name: str) -> tuple[int, os.stat_result]:
        return open_regular(self.path(name))

    def open_for_append(self, name: str) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.path(name), flags | getattr(os, "O_NONBLOCK", 0), 0o644)
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{self.path(name)} is not a regular file")
        return fd

    def names(self) -> Iterator[str]:
        try:
            return iter(sorted(os.listdir(self.location)))
        except FileNotFoundError:
            return iter(())

    def remove(self, name: str) -> bool:
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            return False
        return True

    def move_aside(self, name: str, new_name: str) -> None:
        os.replace(self.path(name), self.path(new_name))

    def remove_stale_temporaries(self) -> list:
        return atomic.remove_stale_temporaries(self.location)

    def lock(self) -> RunLock:
        return RunLock(self.location)
