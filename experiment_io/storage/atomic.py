"""Atomic, durable writes: how bytes become a file that is either wholly there or not at all.

Every file of a run is written through a :class:`FileBatch` (one file alone:
:func:`atomic_write`): the bytes go to a
temporary file in the target's directory, which is flushed and fsynced, renamed
over the target with :func:`os.replace`, after which the directory itself is
fsynced. A process killed at any instant leaves either the old file or the new
one, never a mixture. The digest of a file is computed while it is written, so
hashing costs no second pass over the data.

The bytes go through a :class:`~experiment_io.storage.hashing.HashingWriter`, which
digests them and paces the writing for throughput; the file is fsynced before it is
renamed, as always.

The manifest (:mod:`experiment_io.storage.manifest`) records, per file, its digest
and size and what it holds; it is written last and commits a save. How a file is
proven intact against it is :mod:`experiment_io.storage.verification`.

Each step of the write protocol is announced to the observers registered with
:func:`observe_write_steps`: the one hook through which crash tests stop a
process at a chosen instant of a save.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
from typing import Any, Callable, Iterator, Literal


from experiment_io.errors import CheckpointWriteError
from experiment_io.platform.threads import worker_thread
from experiment_io.storage.hashing import HashingWriter
from experiment_io.storage.verification import FileRecord

__all__ = [
    "WRITE_STEPS",
    "atomic_write",
    "atomic_write_bytes",
    "FileBatch",
    "remove_stale_temporaries",
    "pid_alive",
    "fsync_directory",
    "make_directory",
    "observe_write_steps",
    "write_step",
]

log = logging.getLogger(__name__)


_TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)\.tmp$")


#: The steps of a save, in order, as :func:`write_step` announces them: a file's
#: bytes are written, fsynced, the committed file rotated to its previous name,
#: the new file renamed into place, the directory fsynced; then, for a run's
#: save, each file is recorded (``file_saved``) and the manifest is written
#: (``manifest``).
WRITE_STEPS = ("written", "fsynced", "rotated", "replaced", "directory_fsynced", "file_saved", "manifest")

_observers: list = []


def write_step(step: str, path: str) -> None:
    """Announce ``step`` (one of :data:`WRITE_STEPS`) of a save of ``path`` to the observers."""
    for observer in tuple(_observers):
        observer(step, path)


@contextlib.contextmanager
def observe_write_steps(observer: Callable[[str, str], None]) -> Iterator[Callable[[str, str], None]]:
    """Call ``observer(step, path)`` at every step of the write protocol, inside the context.

    For crash tests: an observer that ends the process (``os._exit``) or raises at
    a chosen step simulates a crash at that instant of a save. It is called in the
    thread that writes (the background thread of an asynchronous save).

    :param observer: ``observer(step, path)``; ``step`` is one of :data:`WRITE_STEPS`.
    """
    _observers.append(observer)
    try:
        yield observer
    finally:
        _observers.remove(observer)


def _temporary_path(path):
    """A new name beside ``path``; the target's name is cut so that a long name still fits in 255 bytes."""
    directory, name = os.path.split(os.path.abspath(path))
    short = os.fsencode(name)[:180].decode("utf-8", "ignore") if isinstance(name, str) else name[:180]
    return os.path.join(directory, f".{short}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _create(temporary, hashed):
    """Create the temporary file: a new file (never an existing one, never through a symbolic link)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(temporary, flags, 0o644), "w+b", buffering=0 if hashed else -1)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any], *, hashed: bool = True,
                 keep_previous: str | None = None, sync_directory: bool = True) -> FileRecord | None:
    """Write a file atomically and durably.

    :param path: the target path; its directory must exist.
    :param write: ``write(f)`` writes the content to the binary file object ``f``.
        With ``hashed=True`` ``f`` only supports ``write`` and ``flush``; otherwise it
        is a real file opened ``"w+b"`` (seekable, as h5py needs).
    :param hashed: compute the digest while writing.
    :param keep_previous: when given, an existing file at ``path`` is renamed to
        this path (in the same directory) just before the new one takes its place,
        so that the previous generation survives until the caller commits the new one.
    :param sync_directory: make the renames durable before returning (``False``: the
        caller fsyncs the directory itself, once for several files, before it commits them).
    :return: the :class:`~experiment_io.storage.verification.FileRecord` of the new file, or ``None`` when not hashed.
    :raises CheckpointWriteError: when the write fails (disk full, I/O error); the
        temporary file is removed and the previous file at ``path`` is untouched.
    """
    with FileBatch() as batch:
        record = batch.write(path, write, hashed=hashed)
        batch.make_durable()
        batch.publish(path, keep_previous)
        if sync_directory:
            batch.sync_directory(os.path.dirname(os.path.abspath(path)))
            write_step("directory_fsynced", os.path.abspath(path))
    return record


class FileBatch:
    """Several files written atomically and durably at once, with fewer waits for the disk than one by one.

    :meth:`write` writes each file's bytes to a temporary file beside it;
    :meth:`make_durable` fsyncs all of them concurrently (the file system commits
    them together: one wait instead of one per file); :meth:`publish` renames one
    into place; :meth:`sync_directory` makes the renames durable. Used as a context
    manager, whatever was not published is removed on the way out. The steps are
    announced to the :func:`observe_write_steps` observers in :data:`WRITE_STEPS` order
    for each file.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple] = {}  # path: (temporary, raw file or None once closed, record)
        self._unsynced: list[tuple[str, Any]] = []  # published before they were durable: (path, raw file)

    def __enter__(self) -> FileBatch:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        for temporary, raw, _ in self._pending.values():
            if raw is not None:
                raw.close()
            _discard(temporary)
        self._pending.clear()
        for _, raw in self._unsynced:  # published, never detached: they stay as they are
            raw.close()
        self._unsynced.clear()
        return False

    def write(self, path: str | os.PathLike, write: Callable[[Any], Any], *, hashed: bool = True) -> FileRecord | None:
        """Write ``path``'s new content to a temporary file (see :func:`atomic_write`); return its record."""
        path = os.path.abspath(path)
        temporary = _temporary_path(path)
        target = raw = None
        try:
            raw = _create(temporary, hashed)
            self._pending[path] = (temporary, raw, None)
            target = HashingWriter(raw.fileno()) if hashed else raw
            write(target)
            target.flush()
            record = target.record() if hashed else None
            self._pending[path] = (temporary, raw, record)
            write_step("written", temporary)
        except Exception as e:
            self._forget(path)
            # ``torch.save`` turns an error of a write into a RuntimeError of its own
            # when it then tries to finish the archive: report the write's error
            failed = e if isinstance(e, OSError) else getattr(target, "error", None)
            if failed is None:
                raise
            raise CheckpointWriteError(_write_failure(path, os.path.dirname(path), failed)) from failed
        except BaseException:
            self._forget(path)
            raise
        return record

    def _forget(self, path):
        temporary, raw, _ = self._pending.pop(path, (None, None, None))
        if raw is not None:
            raw.close()
        if temporary is not None:
            _discard(temporary)

    def make_durable(self) -> None:
        """fsync every file written and not yet durable, concurrently, and close them."""
        waiting = [(path, temporary, raw) for path, (temporary, raw, _) in self._pending.items() if raw is not None]
        errors = {}

        def sync(path, raw):
            try:
                os.fsync(raw.fileno())
            except OSError as e:
                errors[path] = e

        helpers = [worker_thread(sync, path, raw, name="experiment_io-fsync", daemon=False)
                   for path, _, raw in waiting[1:]]
        for helper in helpers:
            helper.start()
        if waiting:
            sync(waiting[0][0], waiting[0][2])
        for helper in helpers:
            helper.join()
        for path, temporary, raw in waiting:
            raw.close()
            self._pending[path] = (temporary, None, self._pending[path][2])
        for path, temporary, _ in waiting:
            try:
                if path in errors:
                    raise errors[path]
                write_step("fsynced", temporary)
            except OSError as e:
                raise CheckpointWriteError(_write_failure(path, os.path.dirname(path), e)) from e

    def publish(self, path: str | os.PathLike, keep_previous: str | os.PathLike | None = None, *,
                durable: bool = True) -> None:
        """Rename ``path``'s durable new content into place (the file there first to ``keep_previous``, if given).

        :param durable: ``False``: the content need not be durable yet; :meth:`detach_unsynced` hands it over to
            be made durable later.
        """
        path = os.path.abspath(path)
        temporary, raw, record = self._pending[path]
        if raw is not None and durable:
            raise RuntimeError(f"{path} is published before it was made durable")
        if raw is not None:
            self._unsynced.append((path, raw))
            self._pending[path] = (temporary, None, record)
        try:
            if keep_previous is not None and os.path.exists(path):
                os.replace(path, keep_previous)
                write_step("rotated", os.fspath(keep_previous))
            os.replace(temporary, path)
            del self._pending[path]
            write_step("replaced", path)
        except OSError as e:
            raise CheckpointWriteError(_write_failure(path, os.path.dirname(path), e)) from e
        log.debug("wrote %s (%s)", path, record.digest if record else "no digest")

    def detach_unsynced(self) -> Callable[[], None]:
        """What makes the files published with ``durable=False`` durable, with their renames, to be called later
        (in another thread); the batch no longer closes them."""
        files, self._unsynced = self._unsynced, []
        directories = sorted({os.path.dirname(path) for path, _ in files})

        def make_durable():
            try:
                for path, raw in files:
                    try:
                        os.fsync(raw.fileno())
                    except OSError as e:
                        raise CheckpointWriteError(_write_failure(path, os.path.dirname(path), e)) from e
                    write_step("fsynced", path)
                for directory in directories:
                    FileBatch.sync_directory(directory)
                for path, _ in files:  # as for a durable publication: the rename of each path is durable
                    write_step("directory_fsynced", path)
            finally:
                for _, raw in files:
                    raw.close()

        return make_durable

    @staticmethod
    def sync_directory(directory: str | os.PathLike) -> None:
        """Make the renames in ``directory`` durable."""
        try:
            fsync_directory(directory)
        except OSError as e:
            raise CheckpointWriteError(_write_failure(directory, directory, e)) from e


def _write_failure(path, directory, error):
    """What went wrong in a failed write, and what to do, in words."""
    cause = error.strerror or str(error)
    if not os.path.isdir(directory):
        return (f"Could not write {path}: {cause}. The directory {directory} no longer exists (removed while the run "
                "was writing?); nothing could be kept. Recreate it, or save into another directory.")
    if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
        return (f"Could not write {path}: {cause}. The previous file (if any) is intact; free disk space (or "
                "quota) and save again.")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"Could not write {path}: {cause}. The previous file (if any) is intact; make {directory} "
                "writable, or save into another directory.")
    return f"Could not write {path}: {cause}. The previous file (if any) is intact; fix the cause and save again."


def make_directory(directory: str | os.PathLike) -> None:
    """Create ``directory`` (and its parents) if missing.

    :raises CheckpointWriteError: naming the cause (read-only file system, a file in the way, permissions).
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot create the run directory {directory}: {e.strerror or e}. Choose a directory you can write, "
            "or remove what is in the way.") from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> FileRecord | None:
    """Write ``data`` (bytes) to ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda f: f.write(data))


def _discard(temporary):
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - only on a failing disk
        log.warning("could not remove temporary file %s: %s", temporary, e)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of a write (renamed into place when the write completes)."""
    return _TEMP_PATTERN.match(name) is not None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user counts)."""
    if not 0 < pid < 2**22:  # beyond any pid a kernel gives (a name forged with a huge number): no such process
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Remove temporary files left in ``directory`` by writers that no longer run.

    :return: the names removed.
    """
    removed = []
    for name in os.listdir(directory):
        match = _TEMP_PATTERN.match(name)
        if not match:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and pid_alive(pid):
            continue
        _discard(os.path.join(directory, name))
        removed.append(name)
    if removed:
        log.info("removed %d leftover temporary file(s) in %s: %s", len(removed), directory, ", ".join(removed))
    return removed


