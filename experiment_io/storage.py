"""Storage: how bytes become a durable file, and how a file is proven intact.

Every file of a run is written by :func:`atomic_write`: the bytes go to a
temporary file in the target's directory, which is flushed and fsynced, renamed
over the target with :func:`os.replace`, after which the directory itself is
fsynced. A process killed at any instant leaves either the old file or the new
one, never a mixture. The digest of a file is computed while it is written, so
hashing costs no second pass over the data.

The manifest (:data:`MANIFEST_NAME`) records, per file, its digest and size and
what it holds; loaders verify a file against it before unpickling anything.
"""
import fcntl
import json
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass

import xxhash

from . import format as fmt
from .errors import CheckpointNotFoundError, CheckpointWriteError, CorruptCheckpointError, RunLockedError

__all__ = [
    "DIGEST_NAME",
    "MANIFEST_NAME",
    "FileRecord",
    "atomic_write",
    "atomic_write_bytes",
    "file_digest",
    "verify_file",
    "read_manifest",
    "write_manifest",
    "remove_stale_temporaries",
    "previous_name",
    "find_generations",
    "RunLock",
    "LOCK_NAME",
]

log = logging.getLogger(__name__)

#: The digest algorithm; its name is stored with every digest.
DIGEST_NAME = "xxh3_128"
#: The manifest's file name inside a run directory.
MANIFEST_NAME = "experiment_manifest.json"
#: The lock file that marks the one process writing a run directory.
LOCK_NAME = "experiment_io.lock"

_CHUNK = 16 * 1024 * 1024
_TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)\.tmp$")


def _stage(stage, path):
    """Called at each step of the write protocol; failure-injection tests replace it."""


@dataclass(frozen=True)
class FileRecord:
    """What is known of a written file: its size in bytes and its digest.

    :ivar size: number of bytes.
    :ivar digest: ``"<algorithm>:<hex>"``.
    """

    size: int
    digest: str

    def as_dict(self):
        """``{"size": ..., "digest": ...}``."""
        return {"size": self.size, "digest": self.digest}


class _HashingWriter:
    """A write-only file wrapper that digests and counts what passes through it."""

    def __init__(self, raw):
        self._raw = raw
        self._hash = xxhash.xxh3_128()
        self.size = 0

    def write(self, data):
        self._hash.update(data)
        n = self._raw.write(data)
        self.size += len(memoryview(data).cast("B")) if n is None else n
        return n

    def flush(self):
        self._raw.flush()

    def record(self):
        return FileRecord(self.size, f"{DIGEST_NAME}:{self._hash.hexdigest()}")


def _temporary_path(path):
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_directory(directory):
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write, *, hashed=True, keep_previous=None):
    """Write a file atomically and durably.

    :param path: the target path; its directory must exist.
    :param write: ``write(f)`` writes the content to the binary file object ``f``.
        With ``hashed=True`` ``f`` only supports ``write`` and ``flush``; otherwise it
        is a real file opened ``"w+b"`` (seekable, as h5py needs).
    :param hashed: compute the digest while writing.
    :param keep_previous: when given, an existing file at ``path`` is renamed to
        this path (in the same directory) just before the new one takes its place,
        so that the previous generation survives until the caller commits the new one.
    :return: the :class:`FileRecord` of the new file, or ``None`` when not hashed.
    :raises CheckpointWriteError: when the write fails (disk full, I/O error); the
        temporary file is removed and the previous file at ``path`` is untouched.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    temporary = _temporary_path(path)
    try:
        with open(temporary, "w+b") as raw:
            target = _HashingWriter(raw) if hashed else raw
            write(target)
            target.flush()
            _stage("written", temporary)
            os.fsync(raw.fileno())
            _stage("fsynced", temporary)
        record = target.record() if hashed else None
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, keep_previous)
            _stage("rotated", keep_previous)
        os.replace(temporary, path)
        _stage("replaced", path)
        fsync_directory(directory)
        _stage("directory_fsynced", path)
    except OSError as e:
        _discard(temporary)
        raise CheckpointWriteError(
            f"Could not write {path}: {e.strerror or e}. The previous file (if any) is intact; "
            "free disk space or fix the directory's permissions and save again."
        ) from e
    except BaseException:
        _discard(temporary)
        raise
    log.debug("wrote %s (%s)", path, record.digest if record else "no digest")
    return record


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda f: f.write(data))


def _discard(temporary):
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - only on a failing disk
        log.warning("could not remove temporary file %s: %s", temporary, e)


def file_digest(path):
    """Digest a file on disk.

    :return: its :class:`FileRecord`.
    """
    hasher = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            hasher.update(chunk)
            size += len(chunk)
    return FileRecord(size, f"{DIGEST_NAME}:{hasher.hexdigest()}")


def verify_file(path, record):
    """Check that the file at ``path`` is the one the manifest ``record`` describes.

    :param record: a manifest record (dict with ``digest`` and ``size``).
    :raises CheckpointNotFoundError: when the file is missing.
    :raises CorruptCheckpointError: when size or digest differ.
    """
    try:
        actual = file_digest(path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path} is listed in the manifest but missing.") from e
    if actual.size != record["size"] or actual.digest != record["digest"]:
        raise CorruptCheckpointError(
            f"{path} does not match its manifest record: expected {record['size']} bytes with digest "
            f"{record['digest']}, found {actual.size} bytes with digest {actual.digest}. "
            "The file was truncated or modified after it was written."
        )
    return actual


def read_manifest(directory):
    """Read the manifest of a run directory.

    :return: ``(header, files)``, or ``None`` when the directory has no manifest.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return fmt.manifest_from_bytes(data, path)


def write_manifest(directory, files, **fields):
    """Write the manifest of a run directory atomically (always the last write of a save)."""
    return atomic_write_bytes(os.path.join(directory, MANIFEST_NAME), fmt.manifest_to_bytes(files, **fields))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory):
    """Remove temporary files left in ``directory`` by writers that no longer run.

    :return: the names removed.
    """
    removed = []
    for name in os.listdir(directory):
        match = _TEMP_PATTERN.match(name)
        if not match:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        _discard(os.path.join(directory, name))
        removed.append(name)
    if removed:
        log.info("removed %d leftover temporary file(s) in %s: %s", len(removed), directory, ", ".join(removed))
    return removed


def previous_name(name):
    """The name under which the previous generation of ``name`` is kept (``a.pt`` -> ``a.prev.pt``)."""
    base, ext = os.path.splitext(name)
    return f"{base}.prev{ext}"


def _describe_mismatch(path, record, actual):
    if record is None:
        return f"{path}: found {actual.size} bytes with digest {actual.digest}, which no manifest record describes"
    return (f"{path}: expected {record['size']} bytes with digest {record['digest']}, "
            f"found {actual.size} bytes with digest {actual.digest}")


def find_generations(directory, name, files):
    """The intact generations of one file of a run, newest first.

    A generation is intact when the file (``name`` or its previous generation) has
    the digest and size of one of the manifest records of ``name`` and
    ``previous_name(name)``; matching by digest keeps a load correct whichever
    instant of a save a crash interrupted.

    :param files: the manifest's records.
    :return: ``(generations, problems)``: ``[(path, record)]`` sorted by step, newest
        first, and one text per file that exists (or should) but does not verify.
    """
    names = (name, previous_name(name))
    records = [files[n] for n in names if n in files]
    found, problems = [], []
    for candidate in names:
        path = os.path.join(directory, candidate)
        try:
            actual = file_digest(path)
        except FileNotFoundError:
            if candidate in files:
                problems.append(f"{path}: missing, although the manifest lists it")
            continue
        match = next((r for r in records if r["digest"] == actual.digest and r["size"] == actual.size), None)
        if match is None:
            problems.append(_describe_mismatch(path, files.get(candidate), actual))
        else:
            found.append((path, match))
    found.sort(key=lambda g: (g[1].get("step", 0), g[1].get("written_at", 0)), reverse=True)
    return found, problems


class RunLock:
    """An advisory lock that admits one writing process per run directory.

    The lock is an ``flock`` on :data:`LOCK_NAME`, so the kernel releases it when its
    holder dies, however it dies: a lock file left by a dead process is taken over
    without any guessing. The file records the holder's pid and host for the error
    that a second writer gets.

    :param directory: the run directory.
    """

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = None

    def acquire(self):
        """Take the lock.

        :raises RunLockedError: naming the pid and host of the live holder.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = self._read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{os.path.dirname(self.path)} is being written by another process "
                f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}). "
                "Wait for it to end, or stop it, before training in this directory; two writers would interleave their checkpoints."
            ) from e
        stale = self._read_holder(fd)
        if stale:
            log.info("taking over the lock of %s left by pid %s on %s, which no longer holds it",
                     self.path, stale.get("pid"), stale.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _read_holder(fd):
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, OSError):
            return {}

    def release(self):
        """Give the lock back."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
