"""The storage interface: where the files of one run live, and the only way the library reaches them.

A :class:`RunStorage` holds the files of one run under plain names
(``"last_checkpoint.pt"``, the manifest, the lock). It offers what the layers above
need and nothing else:

* **write a set of files and commit them**: :meth:`RunStorage.batch` gives a
  :class:`WriteBatch`, which writes each file's new bytes beside it, makes them all
  durable at once, publishes (renames) them into place one by one, and makes the
  renames durable; the caller commits a generation by publishing the manifest last
  (:class:`~experiment_io.storage.writer.RunWriter`);
* **read a committed file, verified**: :meth:`RunStorage.open` opens a regular file
  for reading (never through a link, never waiting on a FIFO) and :meth:`RunStorage.stat`
  tells its size and identity without reading it; the
  :class:`~experiment_io.storage.verification.Verifier` proves its bytes against the
  manifest; :meth:`RunStorage.path` is where a reader that needs a path (``torch.load``
  with ``mmap``) finds it;
* **list** (:meth:`RunStorage.names`), **remove** (:meth:`RunStorage.remove`,
  :meth:`RunStorage.move_aside`), **clean up** what killed writers left
  (:meth:`RunStorage.remove_stale_temporaries`) and **lock**
  (:meth:`RunStorage.lock`).

:class:`~experiment_io.storage.posix.PosixStorage` is the implementation for a
directory of a local or parallel POSIX file system (the default wherever a
directory is given). A new medium is a new implementation of this class.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Optional, overload

if TYPE_CHECKING:
    from experiment_io.storage.lock import RunLock
    from experiment_io.storage.verification import FileRecord

__all__ = ["FileStat", "WriteBatch", "RunStorage", "as_storage"]


@dataclass(frozen=True)
class FileStat:
    """What a storage knows of a file without reading it.

    :ivar size: its size in bytes.
    :ivar regular: whether it is a regular file (not a link, a FIFO, a device, a directory).
    :ivar identity: a value that changes whenever another file takes the name (device, inode, size, mtime).
    :ivar folder: whether it is a folder (such as the run's ``plots/``).
    """

    size: int
    regular: bool
    identity: tuple
    folder: bool = False


class WriteBatch(abc.ABC):
    """Several files of a run written at once; used as a context manager, whatever was not published is removed.

    The steps, per file, are announced to :func:`~experiment_io.storage.atomic.observe_write_steps` observers.
    """

    @overload
    def write(self, name: str, write: Callable, *, hashed: Literal[True] = True) -> FileRecord: ...

    @overload
    def write(self, name: str, write: Callable, *, hashed: bool = True) -> FileRecord | None: ...

    @abc.abstractmethod
    def write(self, name: str, write: Callable, *, hashed: bool = True) -> FileRecord | None:
        """Write ``name``'s new bytes (``write(f)`` writes them to ``f``) beside it; return its
        :class:`~experiment_io.storage.verification.FileRecord` (``None`` when not ``hashed``)."""

    @abc.abstractmethod
    def make_durable(self) -> None:
        """Make every file written and not yet durable durable (at once)."""

    @abc.abstractmethod
    def publish(self, name: str, keep_previous: Optional[str] = None) -> None:
        """Put ``name``'s durable new bytes in place; the file there first is kept as ``keep_previous``, if given."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make the publications so far durable."""

    def publish_unsynced(self, name: str, keep_previous: Optional[str] = None) -> None:
        """Put ``name``'s new bytes in place before they are durable (:meth:`detach` makes them durable later).

        A storage that cannot defer durability keeps this default: durable first, then in place."""
        self.make_durable()
        self.publish(name, keep_previous)

    def detach(self) -> Callable[[], None]:
        """What makes the files published by :meth:`publish_unsynced` durable, with their publication, to be
        called later (in another thread). The default makes them durable now and returns a call that does
        nothing."""
        self.sync()
        return lambda: None

    def __enter__(self) -> "WriteBatch":
        return self

    @abc.abstractmethod
    def __exit__(self, *exc) -> bool:
        """Remove whatever was written and not published."""


class RunStorage(abc.ABC):
    """The files of one run (see the module's description)."""

    #: where the run lives, in words a user recognises (a directory's absolute path)
    location: str

    @abc.abstractmethod
    def create(self) -> None:
        """Make the run's place if it is missing.

        :raises CheckpointWriteError: naming the cause.
        """

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the run's place exists (a run may still be empty)."""

    @abc.abstractmethod
    def batch(self) -> WriteBatch:
        """A new :class:`~experiment_io.storage.interface.WriteBatch` of this run's files."""

    def write_file(self, name: str, write: Callable) -> FileRecord:
        """Write one file of the run atomically and durably, on its own (a batch of one: written beside, made
        durable, published, the publication made durable); return its record."""
        from experiment_io.storage.atomic import write_step

        with self.batch() as batch:
            record = batch.write(name, write)
            batch.make_durable()
            batch.publish(name)
            batch.sync()
            write_step("directory_fsynced", self.path(name))
        return record

    @abc.abstractmethod
    def path(self, name: str) -> str:
        """A path at which ``name`` is read (by ``torch.load``, by
        :func:`~experiment_io.platform.files.open_regular`)."""

    @abc.abstractmethod
    def stat(self, name: str) -> Optional[FileStat]:
        """What ``name`` is now, without following a link (``None`` when there is no such file)."""

    @abc.abstractmethod
    def open(self, name: str) -> tuple[int, os.stat_result]:
        """``(fd, os.stat_result)`` of ``name`` opened for reading, only if it is a regular file.

        :raises FileNotFoundError: when it is missing.
        :raises ~experiment_io.platform.files.NotARegularFile: for anything but a regular file.
        """

    @abc.abstractmethod
    def open_for_append(self, name: str) -> int:
        """A descriptor of ``name`` opened for appending (created if missing; never through a link).

        :raises OSError: when it cannot be opened, or is not a regular file.
        """

    @abc.abstractmethod
    def names(self) -> Iterator[str]:
        """The names of the files the run holds now (temporaries of writes included)."""

    @abc.abstractmethod
    def remove(self, name: str) -> bool:
        """Remove ``name``; whether there was such a file.

        :raises OSError: when it cannot be removed.
        """

    @abc.abstractmethod
    def move_aside(self, name: str, new_name: str) -> None:
        """Give the file ``name`` the name ``new_name`` (a rename within the run)."""

    @abc.abstractmethod
    def remove_stale_temporaries(self) -> list:
        """Remove the temporaries of writes whose writers no longer run; return their names."""

    @abc.abstractmethod
    def lock(self) -> RunLock:
        """The run's :class:`~experiment_io.storage.lock.RunLock` (one writing process at a time)."""


def as_storage(where: RunStorage | str | os.PathLike | None) -> RunStorage:
    """``where`` as a :class:`RunStorage`: a storage as it is; a directory (a path, ``None`` for the current one) as
    a :class:`~experiment_io.storage.posix.PosixStorage` of it."""
    if isinstance(where, RunStorage):
        return where
    from experiment_io.storage.posix import PosixStorage  # the default medium; the interface does not depend on it

    return PosixStorage(where if where is not None else os.getcwd())
