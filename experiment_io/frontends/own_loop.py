"""Checkpoints for your own training loop: :func:`~experiment_io.atomic_save` and :func:`~experiment_io.verified_load`.

They give one object the guarantees of the library's own writes, for users who do
not train with :func:`~experiment_io.train_model`:

- :func:`~experiment_io.atomic_save` (or :meth:`AtomicSaver.save <experiment_io.AtomicSaver.save>`) writes
  through the directory's :class:`~experiment_io.storage.writer.RunWriter`
  (temporary file in the same directory, flush, fsync, :func:`os.replace`, directory
  fsync; the digest is computed while writing), keeps the previous generation of the
  file as ``<name>.prev<ext>``, and then records the new file's digest and size in
  the directory's manifest (:data:`~experiment_io.storage.manifest.MANIFEST_NAME`), written
  atomically after the file. A process killed at any instant leaves a generation
  that verifies: the newest committed one, or the one before it.
- :func:`~experiment_io.verified_load` verifies the file against the manifest before unpickling
  anything, falls back to the previous generation when the current one does not
  verify (or raises, with ``strict=True``), and loads with
  ``torch.load(..., weights_only=True)``, always passed explicitly.

The file itself is exactly what ``torch.save(obj, path)`` writes, so plain
``torch.load`` reads it too (without the verification).

**One writer per directory.** The manifest is shared by every file of a directory
and each save rewrites it, so two processes saving into one directory at the same
time can drop each other's records. In a data-parallel loop, save from global rank
0 only: :func:`~experiment_io.rank_zero_save` does it and makes every rank wait
for the commit, so that any rank may load the file next. A dropped record is not a silent error: the
file it described no longer verifies and :func:`~experiment_io.verified_load` refuses it. Save
from one process (rank 0 in data-parallel training) or give each process its own
directory, and keep :func:`~experiment_io.atomic_save` out of a directory that
:func:`~experiment_io.train_model` is writing. :func:`~experiment_io.atomic_save` takes
no lock itself: a lock held for one save would only catch two writers whose saves
happen to overlap, and would collide with the lock that a job holds for its whole
run. To have a second job refused at its start (a requeued job starting while the
old one is still dying), hold :class:`~experiment_io.RunLock` around your
training loop, as ``train_model`` does::

    with RunLock(directory):
        for step in ...:
            ...
            atomic_save(state, os.path.join(directory, "checkpoint.pt"))

Each directory's manifest is kept by one
:class:`~experiment_io.storage.writer.RunWriter` per :class:`~experiment_io.AtomicSaver` (and
:func:`~experiment_io.atomic_save` uses one process-wide :class:`~experiment_io.AtomicSaver`), so a save does not
read the previous file again to rotate it.

Readers take no lock; a load that runs while another process saves the same file
may fall back to the previous generation or, rarely, fail; load again.
"""
import atexit
import functools
import logging
import os
import sys
import threading
from typing import Any, Optional, Union, cast

import torch

from experiment_io.platform import archive
from experiment_io.platform.threads import in_forked_children
from experiment_io.training.asynchronous import BackgroundWriter, surfaced
from experiment_io.training.distributed import current
from experiment_io.errors import (SetupError)
from experiment_io.storage.generations import is_previous_name, previous_name
from experiment_io.storage.writer import RunWriter
from experiment_io.storage.lock import LOCK_NAME
from experiment_io.format.names import qualified_name
from experiment_io.storage.verification import FileRecord
from experiment_io.version import __version__
from experiment_io.frontends.verified_loading import split_path
from experiment_io.storage.manifest import MANIFEST_NAME

__all__ = ["AtomicSaver", "PendingSave", "atomic_save", "rank_zero_save"]

log = logging.getLogger(__name__)

#: The ``kind`` of the manifest records that :func:`atomic_save` writes.
USER_KIND = "user"


#: The longest file name atomic_save takes, in bytes: its previous generation adds ``.prev``.
MAX_NAME_BYTES = 250


def _check_name(path, name):
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise ValueError(f"{path}: the file name has {len(os.fsencode(name))} bytes; at most {MAX_NAME_BYTES} are "
                         "taken, so that the name of its previous generation (with '.prev') fits the file system's "
                         "limit.")
    if name in (MANIFEST_NAME, LOCK_NAME):
        raise ValueError(f"{path}: {name} is a file of experiment_io itself; save under another name.")
    if is_previous_name(name):
        raise ValueError(
            f"{path}: names of the form <name>.prev<ext> hold the previous generation of <name><ext>; "
            "save under a name without '.prev'."
        )


class PendingSave:
    """A save of :class:`AtomicSaver` with ``async_save=True`` that may still be in flight."""

    def __init__(self, path: str, saver: "AtomicSaver"):
        self.path = path
        self._saver = saver
        self._serial: Optional[int] = None  # the background writer's number of this save
        self._committed = threading.Event()
        self._record: Optional[FileRecord] = None
        self._error: Optional[BaseException] = None

    def _run(self, write, staged):
        """Run ``write(staged)`` (in the writer's thread) and keep its outcome."""
        try:
            self._record = write(staged)
            return self._record
        except BaseException as e:
            self._error = e
            raise
        finally:
            self._committed.set()

    def done(self) -> bool:
        """Whether the save has ended (committed or failed)."""
        return self._committed.is_set()

    def wait(self) -> FileRecord:
        """Wait until the save has committed.

        :return: the :class:`~experiment_io.storage.verification.FileRecord` of the file.
        :raises CheckpointWriteError: when the save failed (the previous generation
            is intact).
        """
        self._saver._wait_for(self)
        if self._error is not None:
            raise surfaced(self._error, self.path)
        return cast(FileRecord, self._record)


def _save_loadable(obj, f, path):
    """``torch.save(obj, f)``, refused before it is committed when :func:`verified_load` would refuse the file."""
    archive.save(obj, f)
    names = torch.serialization.get_unsafe_globals_in_checkpoint(f.written())
    registered = {entry[1] if isinstance(entry, tuple) else qualified_name(entry)
                  for entry in torch.serialization.get_safe_globals()}
    refused = sorted(set(names) - registered)
    if refused:
        raise SetupError(
            f"{path} was not written: the object holds {', '.join(refused)}, which verified_load (like "
            "torch.load(weights_only=True)) refuses, so the file could not be loaded back. Save state_dicts and "
            "plain data (tensors, numbers, strings, lists, dicts) instead, or, for classes you trust, register "
            "them before saving and loading: torch.serialization.add_safe_globals([...]).")


class AtomicSaver:
    """Saves objects as ``torch.save`` would, atomically, durably and recorded in the manifest.

    The object that owns the writes of your own training loop: it keeps one
    :class:`~experiment_io.storage.writer.RunWriter` per directory it saves into, and,
    with ``async_save=True``, the background thread that writes. Use it as a
    context manager, or call :meth:`wait` before the end, so that the last save has
    committed and its error (if any) is raised::

        with AtomicSaver(async_save=True) as saver:
            for step in ...:
                ...
                saver.save(model.state_dict(), "run/model.pt")

    :param async_save: :meth:`save` copies the object and returns a
        :class:`PendingSave`; a background thread writes the copy.
    """

    def __init__(self, *, async_save: bool = False):
        self.async_save = async_save
        self._writers: dict[str, RunWriter] = {}
        self._background: Optional[BackgroundWriter] = None
        self._lock = threading.Lock()

    def _writer(self, directory):
        writer = self._writers.get(directory)
        if writer is None:
            writer = self._writers[directory] = RunWriter(directory)
        return writer

    def save(self, obj: Any, path: Union[str, os.PathLike]) -> Union[FileRecord, PendingSave]:
        """Save ``obj`` to ``path``; see :func:`atomic_save`.

        :return: the file's :class:`~experiment_io.storage.verification.FileRecord`, or a
            :class:`PendingSave` with ``async_save=True``.
        """
        path, directory, name = split_path(path)
        _check_name(path, name)
        fields = {"kind": USER_KIND, "library_version": __version__, "torch_version": str(torch.__version__)}

        with self._lock:
            writer = self._writer(directory)

        def write(staged):
            record = writer.save_files({name: (lambda f: _save_loadable(staged, f, path), fields)})[name]
            log.debug("saved %s (%s)", path, record.digest)
            return record

        if not self.async_save:
            return write(obj)
        with self._lock:
            if self._background is None:
                self._background = BackgroundWriter()
            pending = PendingSave(path, self)
            pending._serial = self._background.submit(obj, lambda staged: pending._run(write, staged), path)
        return pending

    def _wait_for(self, pending):
        with self._lock:
            background = self._background
            if background is not None and background.in_flight and background.serial == pending._serial:
                try:  # waited for here, so that the next save does not raise this one's error again
                    background.wait()
                except BaseException:
                    if pending._error is None:  # not the save's error: a Ctrl-C while waiting
                        raise

    def wait(self) -> None:
        """Wait until the save in flight (if any) has committed; raise its error."""
        with self._lock:
            if self._background is not None:
                self._background.wait()

    def remove(self, path: Union[str, os.PathLike]) -> None:
        """Remove a file this saver wrote, and its previous generation, with their manifest records.

        The removal is committed like a save: the records are marked retired in the
        manifest, the files unlinked, then the records dropped; a crash leaves no file
        the manifest does not know. A path without a record is left alone.
        """
        self.wait()  # a save of the same file may be in flight
        path, directory, name = split_path(path)
        _check_name(path, name)
        with self._lock:
            writer = self._writer(directory)
        if writer.record(name) is None and writer.record(previous_name(name)) is None:
            log.debug("nothing to remove at %s: no save of it is recorded", path)
            return
        writer.save_files({}, retire=[name])

    def __enter__(self) -> "AtomicSaver":
        return self

    def __exit__(self, *exc) -> None:
        self.wait()


_defaults: dict[bool, AtomicSaver] = {}  # atomic_save's savers, one per mode, made at its first call in a process
_defaults_lock = threading.Lock()


def _default_saver(async_save: bool) -> AtomicSaver:
    with _defaults_lock:
        saver = _defaults.get(async_save)
        if saver is None:
            in_forked_children(_new_defaults_in_child)
            if async_save:
                _report_at_exit()
            saver = _defaults[async_save] = AtomicSaver(async_save=async_save)
        return saver


def _new_defaults_in_child():
    """A forked child makes savers of its own (it has not the parent's thread)."""
    global _defaults_lock
    _defaults.clear()
    _defaults_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _report_at_exit():
    atexit.register(_report_unwaited_failure)


def _report_unwaited_failure():
    """At exit: an asynchronous save that failed and that nobody waited for is shown on stderr."""
    saver = _defaults.get(True)
    background = saver._background if saver is not None else None
    error = getattr(background, "_error", None) if background is not None else None
    if error is not None:
        sys.stderr.write(f"experiment_io: the asynchronous save of {background._description} failed and nothing "
                         f"waited for it (PendingSave.wait() or a later atomic_save): {error!r}. The previous "
                         "generation of the file is intact.\n")


def atomic_save(obj: Any, path: Union[str, os.PathLike], *, async_save: bool = False) -> Union[FileRecord, PendingSave]:
    """Save ``obj`` as ``torch.save`` would, atomically, durably and recorded in the manifest.

    The previous file at ``path``, if it is the committed generation, is kept as
    ``<name>.prev<ext>`` until the next save, so that a crash at any instant leaves a
    generation that :func:`verified_load` accepts.

    Save what ``torch.load(weights_only=True)`` reads back: tensors, ``state_dict``\\ s,
    plain containers, numbers and strings. Objects of your own classes are written,
    but :func:`verified_load` refuses them unless you register them with
    :func:`torch.serialization.add_safe_globals`.

    One process should write a directory at a time (see the module's description).
    ``atomic_save`` saves through a process-wide :class:`AtomicSaver`; hold an
    :class:`AtomicSaver` of your own to own the background writes yourself.

    With ``async_save=True`` the call copies the tensors of ``obj`` into staging
    buffers (kept for the next save; pinned memory for GPU tensors) and returns; a
    background thread writes the copy with the same guarantees. One save of the
    process is in flight at most: the next ``atomic_save(..., async_save=True)``
    first waits for it to commit, and raises its error if it failed (unless
    :meth:`PendingSave.wait` raised it already). The process
    does not exit before the save in flight has committed (the thread is not a
    daemon); an error of a save nobody waited for is logged when it happens and
    written to stderr again when the process exits.

    :param obj: the object to save.
    :param path: the file to write; its directory is created if missing. The
        directory's manifest (:data:`~experiment_io.storage.manifest.MANIFEST_NAME`) records
        the file's digest and size with ``"kind": "user"``.
    :param async_save: return once ``obj`` is copied, and write it in the background.
    :return: the :class:`~experiment_io.storage.verification.FileRecord` (size and digest) of the
        file; with ``async_save=True`` a :class:`PendingSave`, whose ``wait()``
        returns it.
    :raises CheckpointWriteError: when writing fails (disk full, permissions); the
        previous generation and the manifest are untouched.
    :raises ValueError: for a name that experiment_io uses itself (the manifest, the
        lock file, or a ``.prev`` name).
    """
    return _default_saver(async_save).save(obj, path)


def rank_zero_save(obj: Any, path: Union[str, os.PathLike], *,
                   async_save: bool = False) -> Union[FileRecord, PendingSave, None]:
    """:func:`atomic_save` for data-parallel loops: global rank 0 writes, every rank knows when it has committed.

    Call it on every rank at the same point. Rank 0 saves ``obj`` (the other ranks'
    ``obj`` is not used: save what is the same on every rank, such as the model of
    a DDP run); then every rank waits until the save has committed, so that any rank
    may :func:`verified_load` the file next. With ``async_save=True`` no rank waits:
    rank 0 gets the :class:`PendingSave`, and a rank that wants to read the file
    must wait for a later barrier of yours after ``PendingSave.wait()``. Without a
    process group it is :func:`atomic_save`.

    :return: on rank 0 what :func:`atomic_save` returns; ``None`` on the other ranks.
    :raises RankFailedError: on the other ranks when rank 0's save failed (rank 0
        raises the error itself).
    """
    distribution = current()
    if async_save:
        return atomic_save(obj, path, async_save=True) if distribution.writer else None
    return distribution.on_writer(lambda: atomic_save(obj, path))


