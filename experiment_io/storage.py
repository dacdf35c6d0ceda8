"""Storage: how bytes become a durable file, and how a file is proven intact.

Every file of a run is written by :func:`atomic_write`: the bytes go to a
temporary file in the target's directory, which is flushed and fsynced, renamed
over the target with :func:`os.replace`, after which the directory itself is
fsynced. A process killed at any instant leaves either the old file or the new
one, never a mixture. The digest of a file is computed while it is written, so
hashing costs no second pass over the data.

Writing is paced for throughput: small writes are gathered into large blocks, and
on Linux the kernel is asked (``sync_file_range``) to start writing each block to
the disk while the next one is produced, so that the final fsync waits only for
the tail of the file. Neither changes what is durable when: the file is fsynced
before it is renamed, as always.

The manifest (:data:`MANIFEST_NAME`) records, per file, its digest and size and
what it holds; loaders verify a file against it before unpickling anything.
:class:`Verifier` digests the files of a run directory on demand, each at most
once, and remembers which file (device and inode) it digested, so that a loader
can prove that the file it then reads is the one it verified.
"""
import ctypes
import fcntl
import json
import logging
import mmap
import os
import re
import secrets
import socket
import sys
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
    "file_matches",
    "read_manifest",
    "write_manifest",
    "remove_stale_temporaries",
    "previous_name",
    "find_generations",
    "Verifier",
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

#: Files at least this large are digested through a memory map; smaller ones are
#: read in blocks of :data:`_READ_CHUNK` bytes.
_MAP_AT_LEAST = 1024 * 1024
_READ_CHUNK = 1024 * 1024
#: Writes smaller than this are gathered into blocks of :data:`_WRITE_BLOCK` bytes;
#: larger ones go to the file directly, without a copy.
_DIRECT_WRITE = 256 * 1024
_WRITE_BLOCK = 4 * 1024 * 1024
#: Ask the kernel to start writing back every this many bytes written.
_WRITEBACK_EVERY = 8 * 1024 * 1024
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


def _load_sync_file_range():
    """libc's ``sync_file_range`` (Linux), or ``None`` where it is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages, do not wait


class _HashingWriter:
    """A write-only file that digests and counts what passes through it.

    Small writes (``torch.save`` makes hundreds: zip headers, the pickle) are
    gathered into blocks; large ones (tensor data) are written straight from the
    caller's memory. Every byte is hashed just before it is handed to the kernel,
    so the digest covers exactly the bytes of the file, in order. Every
    :data:`_WRITEBACK_EVERY` bytes the kernel is asked to start writing back what
    was written so far; the final fsync then has little left to wait for.

    :param fd: a file descriptor open for writing, at offset 0.
    """

    def __init__(self, fd):
        self._fd = fd
        self._hash = xxhash.xxh3_128()
        self._pending = bytearray()
        self._written_back = 0
        self.size = 0
        self.error = None  # the first OSError of a write: every later write raises it again

    def write(self, data):
        view = memoryview(data).cast("B")
        n = len(view)
        if n >= _DIRECT_WRITE:
            self._drain()
            self._out(view)
        else:
            self._pending += view
            if len(self._pending) >= _WRITE_BLOCK:
                self._drain()
        return n

    def flush(self):
        self._drain()

    def _drain(self):
        if self._pending:
            self._out(memoryview(self._pending))
            self._pending = bytearray()

    def _out(self, view):
        if self.error is not None:
            raise self.error
        self._hash.update(view)
        try:
            while view:
                written = os.write(self._fd, view)
                self.size += written
                view = view[written:]
        except OSError as e:
            self.error = e
            raise
        if self.size - self._written_back >= _WRITEBACK_EVERY:
            self._start_writeback()

    def _start_writeback(self):
        global _sync_file_range
        if _sync_file_range is not None:
            if _sync_file_range(self._fd, self._written_back, self.size - self._written_back, _SYNC_FILE_RANGE_WRITE) != 0:
                log.debug("sync_file_range is not supported here (errno %d); relying on fsync alone", ctypes.get_errno())
                _sync_file_range = None
        self._written_back = self.size

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
    target = None
    try:
        with open(temporary, "w+b", buffering=0 if hashed else -1) as raw:
            target = _HashingWriter(raw.fileno()) if hashed else raw
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
    except Exception as e:
        _discard(temporary)
        # ``torch.save`` turns an error of a write into a RuntimeError of its own
        # when it then tries to finish the archive: report the write's error
        failed = e if isinstance(e, OSError) else getattr(target, "error", None)
        if failed is None:
            raise
        raise CheckpointWriteError(
            f"Could not write {path}: {failed.strerror or failed}. The previous file (if any) is intact; "
            "free disk space or fix the directory's permissions and save again."
        ) from failed
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


def _digest_fd(fd):
    """Digest the file open at ``fd`` (at offset 0) from its first byte to its end.

    Files of :data:`_MAP_AT_LEAST` bytes or more are hashed through a read-only
    memory map: the hash reads the page cache directly, without copying it (about
    twice as fast as reading); smaller files, and files that cannot be mapped, are
    read in blocks. A file must not be truncated by another process while it is
    digested (a mapped page beyond the end of a file cannot be read); this library
    never truncates a file, it replaces files by renaming new ones over them.
    """
    size = os.fstat(fd).st_size
    if size >= _MAP_AT_LEAST:
        try:
            mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system without mmap: read it
            pass
        else:
            with mapped:
                hasher = xxhash.xxh3_128(mapped)
            return FileRecord(size, f"{DIGEST_NAME}:{hasher.hexdigest()}")
    hasher = xxhash.xxh3_128()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    size = 0
    while True:
        n = os.readv(fd, [buffer])
        if not n:
            break
        hasher.update(view[:n])
        size += n
    return FileRecord(size, f"{DIGEST_NAME}:{hasher.hexdigest()}")


def file_digest(path):
    """Digest a file on disk.

    :return: its :class:`FileRecord`.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return _digest_fd(fd)
    finally:
        os.close(fd)


def file_matches(path, record):
    """Whether the file at ``path`` has the size and digest of the manifest ``record``.

    The size is compared first, so a file of another size is not read. A missing
    file or a ``None`` record does not match.
    """
    if record is None:
        return False
    try:
        if os.stat(path).st_size != record["size"]:
            return False
        actual = file_digest(path)
    except FileNotFoundError:
        return False
    return (actual.digest, actual.size) == (record["digest"], record["size"])


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


def _identity(stat_result):
    return stat_result.st_dev, stat_result.st_ino


class Verifier:
    """Digests the files of one run directory on demand, each at most once.

    A loader asks for the digest of a file only when it needs that file, so a load
    reads the files it uses (and those it skips because they are damaged), not every
    generation of every file. The verifier also remembers which file it digested
    (device and inode): :meth:`unchanged` tells whether the path still names that
    file, so that a loader can prove, after reading a file by its path, that it read
    the bytes it verified even while a writer renames new files into the directory
    (a writer of this library never puts an older file back at a path, so the same
    inode before and after a read means the same file throughout).

    :param directory: the run directory.
    :param files: the manifest's records.
    """

    def __init__(self, directory, files):
        self.directory = directory
        self.files = files
        self._digests = {}

    def path(self, name):
        """The path of ``name`` in the directory."""
        return os.path.join(self.directory, name)

    def digest(self, path):
        """The :class:`FileRecord` of the file at ``path`` (computed once).

        :raises FileNotFoundError: when the file does not exist.
        """
        path = os.path.abspath(path)
        if path not in self._digests:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                identity = _identity(os.fstat(fd))
                self._digests[path] = (_digest_fd(fd), identity)
            finally:
                os.close(fd)
        return self._digests[path][0]

    def matches(self, path, record):
        """Whether the file at ``path`` has the size and digest of ``record``."""
        try:
            actual = self.digest(path)
        except FileNotFoundError:
            return False
        return actual.size == record["size"] and actual.digest == record["digest"]

    def unchanged(self, path):
        """Whether ``path`` still names the file that was digested."""
        path = os.path.abspath(path)
        try:
            return path in self._digests and _identity(os.stat(path)) == self._digests[path][1]
        except FileNotFoundError:
            return False

    def candidates(self, name, records=None):
        """The files that may hold a generation of ``name``, without reading them.

        :param records: the manifest records a generation may have (default: those
            of ``name`` and of its previous generation).
        :return: ``(pairs, problems)``: ``pairs`` lists ``(path, record)`` for every
            existing generation file whose size is that of ``record`` (a file may
            appear with more than one record); ``problems`` describes each listed
            file that is missing and each existing file that no record fits by size.
        """
        names = (name, previous_name(name))
        if records is None:
            records = [self.files[n] for n in names if n in self.files]
        pairs, problems = [], []
        for candidate in names:
            path = self.path(candidate)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                if candidate in self.files:
                    problems.append(f"{path}: missing, although the manifest lists it")
                continue
            fitting = [r for r in records if r["size"] == size]
            if not fitting:
                problems.append(self.describe(path, self.files.get(candidate), size=size))
            pairs += [(path, r) for r in fitting]
        return pairs, problems

    def describe(self, path, record, *, size=None):
        """Why the file at ``path`` is not the generation that ``record`` describes."""
        if size is None:
            actual = self.digest(path)
            found = f"found {actual.size} bytes with digest {actual.digest}"
        else:
            found = f"found {size} bytes"
        if record is None:
            return f"{path}: {found}, which no manifest record describes"
        return f"{path}: expected {record['size']} bytes with digest {record['digest']}, {found}"


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
