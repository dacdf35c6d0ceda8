"""Verification: how a file is proven to be the one a manifest record describes.

A record holds a file's size and its xxh3-128 digest (:data:`DIGEST_NAME`).
:class:`Verifier` digests the files of a run directory on demand, each at most
once, and remembers which file (device and inode) it digested, so that a loader
can prove that the file it then reads is the one it verified.
"""
import ctypes
import errno
import mmap
import os
import stat
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import xxhash

from .errors import NotACheckpointError

__all__ = ["DIGEST_NAME", "FileRecord", "file_digest", "file_matches", "open_regular", "NotARegularFile", "Verifier",
           "archive_directory", "check_archive", "descriptor_path"]

#: The digest algorithm; its name is stored with every digest.
DIGEST_NAME = "xxh3_128"

#: Files at least this large are digested through a memory map; smaller ones are
#: read in blocks of :data:`_READ_CHUNK` bytes.
_MAP_AT_LEAST = 1024 * 1024
_READ_CHUNK = 1024 * 1024


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


def libc():
    """The C library, its ``mmap``, ``munmap``, ``mincore`` and ``madvise`` typed for :mod:`ctypes` (calls made
    through it let go of the GIL); ``None`` where they are missing (not Linux, not 64-bit)."""
    return _LibcMap._libc if _LibcMap.available() else None


#: The digest of a mapped file goes this many bytes at a time: each part is faulted in, hashed, and let go, so
#: that the map never holds more than one part of the file.
_DIGEST_PART = 64 * 1024 * 1024
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class _LibcMap:
    """A read-only shared map of a whole file, made by direct ``mmap(2)`` calls, each without the GIL.

    The calls go through :mod:`ctypes`, which lets go of the GIL while they run
    (Python's :class:`mmap.mmap` holds it while ``MAP_POPULATE`` reads a file in, so a
    cold 2 GiB file stopped every other thread for as long as the disk took).
    :meth:`parts` gives the file :data:`_DIGEST_PART` bytes at a time and lets each
    part's pages go once it has been used, so that the process never holds the whole
    file's pages: a load that makes memory ready for the file's tensors meanwhile
    (:mod:`experiment_io.residence`) holds about the file's size, not twice that. A
    file that is mostly in the page cache has each part faulted in by one call
    (``MADV_POPULATE_READ``: no page faults while it is hashed); a file that is not
    is mapped for sequential reading, so that the kernel reads ahead of the hash
    (populating a cold file reads it about twice as slowly as faulting it in with
    read-ahead).
    """

    _libc = None

    @classmethod
    def available(cls):
        if cls._libc is None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.mmap.restype = ctypes.c_void_p
                libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_int64)
                libc.munmap.restype = ctypes.c_int
                libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
                libc.mincore.restype = ctypes.c_int
                libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
                libc.madvise.restype = ctypes.c_int
                libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                usable = all(hasattr(mmap, n) for n in ("MADV_SEQUENTIAL", "MADV_DONTNEED"))
                linux = sys.platform.startswith("linux")  # the madvise numbers used here are Linux's
                cls._libc = libc if usable and linux and ctypes.sizeof(ctypes.c_void_p) == 8 else False
            except (OSError, AttributeError):  # pragma: no cover - not Linux
                cls._libc = False
        return bool(cls._libc)

    def _map(self, fd, size, flags):
        address = self._libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED | flags, fd, 0)
        if address is None or address == ctypes.c_void_p(-1).value:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        return address

    def _mostly_cached(self, address, size, windows=32, window_pages=16):
        """Whether most of the file is in the page cache, judged on ``windows`` runs of pages spread over it."""
        page = mmap.PAGESIZE
        pages = -(-size // page)
        vector = np.zeros(window_pages, dtype=np.uint8)
        resident = checked = 0
        for start in sorted({pages * i // windows for i in range(windows)}):
            count = min(window_pages, pages - start)
            if self._libc.mincore(address + start * page, min(count * page, size - start * page), vector.ctypes.data):
                return True  # unknown: fault it in
            resident += int(np.count_nonzero(vector[:count] & 1))
            checked += count
        return resident * 2 >= checked

    def __init__(self, fd, size):
        address = self._map(fd, size, 0)
        self._cached = self._mostly_cached(address, size)
        if not self._cached:
            self._libc.madvise(address, size, mmap.MADV_SEQUENTIAL)
        try:
            self.view = memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B").toreadonly()
        except BaseException:
            self._libc.munmap(address, size)
            raise
        self._address, self._size = address, size

    def parts(self):
        """The file's bytes, :data:`_DIGEST_PART` at a time (read-only views); each part's pages are let go when
        the next is asked for."""
        page_aligned = _DIGEST_PART - _DIGEST_PART % mmap.PAGESIZE
        for offset in range(0, self._size, page_aligned):
            length = min(page_aligned, self._size - offset)
            if self._cached:  # one call instead of a page fault for every few pages (Linux 5.14; else faults)
                self._libc.madvise(self._address + offset, length, _MADV_POPULATE_READ)
            part = self.view[offset:offset + length]
            try:
                yield part
            finally:
                part.release()
                self._libc.madvise(self._address + offset, length, mmap.MADV_DONTNEED)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.view.release()
        self._libc.munmap(self._address, self._size)


class _PythonMap:
    """A file mapped by :class:`mmap.mmap` (where :class:`_LibcMap` is not available): one part, the whole file."""

    def __init__(self, fd, size):
        if hasattr(mmap, "MAP_SHARED"):  # POSIX
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        else:
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ)

    def parts(self):
        yield self._map

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._map.close()


def _map_for_reading(fd, size):
    """A read-only map of the file that gives it part by part (:class:`_LibcMap` where it can)."""
    if _LibcMap.available():
        return _LibcMap(fd, size)
    return _PythonMap(fd, size)


def _digest_fd(fd):
    """Digest the file open at ``fd`` (at offset 0) from its first byte to its end.

    Files of :data:`_MAP_AT_LEAST` bytes or more are hashed through a read-only
    memory map, part by part (see :class:`_LibcMap`): the hash reads the page cache
    directly, without copying it (about twice as fast as reading); smaller files,
    and files that cannot be mapped, are read in blocks. A file must not be truncated by another process while it is
    digested (a mapped page beyond the end of a file cannot be read); this library
    never truncates a file, it replaces files by renaming new ones over them.
    """
    size = os.fstat(fd).st_size
    if size >= _MAP_AT_LEAST:
        try:
            mapped = _map_for_reading(fd, size)
        except (OSError, ValueError):  # a file system without mmap: read it
            pass
        else:
            hasher = xxhash.xxh3_128()
            with mapped:
                for part in mapped.parts():
                    hasher.update(part)
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


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class NotARegularFile(OSError):
    """A path names a symbolic link, a FIFO, a device or a directory: not a file this library reads."""


def open_regular(path):
    """Open ``path`` for reading if it is a regular file, without following a symbolic link
    and without blocking on a FIFO.

    :return: ``(fd, stat)``.
    :raises FileNotFoundError: when it is missing; :class:`NotARegularFile` when it
        is anything but a regular file.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:  # a link (ELOOP), a directory, a device: not a regular file; other errors are what they are
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR, errno.EMLINK):
            raise NotARegularFile(f"{path} is not a regular file ({e.strerror or e})") from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotARegularFile(f"{path} is not a regular file")
    return fd, st


def file_digest(path):
    """Digest a regular file on disk (a symbolic link or a special file is refused).

    :return: its :class:`FileRecord`.
    """
    fd, _ = open_regular(path)
    try:
        return _digest_fd(fd)
    finally:
        os.close(fd)


def file_matches(path, record):
    """Whether the file at ``path`` has the size and digest of the manifest ``record``.

    The size is compared first, so a file of another size is not read. A missing
    file or a ``None`` record does not match.
    """
    return record is not None and Verifier(os.path.dirname(os.path.abspath(path)), {}).matches(path, record)


def _identity(stat_result):
    return stat_result.st_dev, stat_result.st_ino


def is_retired(record):
    """Whether a manifest record is of a file being removed (see :mod:`experiment_io.retention`)."""
    return isinstance(record, dict) and record.get("retired") is True


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
    :param files: the manifest's records; those marked ``"retired"`` (files being
        removed by a retention) are kept apart in ``retired`` and never used.
    """

    def __init__(self, directory, files):
        self.directory = directory
        self.files = {name: record for name, record in files.items() if not is_retired(record)}
        self.retired = {name: record for name, record in files.items() if is_retired(record)}
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
            fd, st = open_regular(path)
            try:
                self._digests[path] = (_digest_fd(fd), _identity(st))
            finally:
                os.close(fd)
        return self._digests[path][0]

    def matches(self, path, record):
        """Whether the file at ``path`` has the size and digest of ``record`` (the size is compared first)."""
        try:
            if os.path.abspath(path) not in self._digests and os.lstat(path).st_size != record["size"]:
                return False
            actual = self.digest(path)
        except (FileNotFoundError, NotARegularFile):
            return False
        return actual.size == record["size"] and actual.digest == record["digest"]

    def open_verified(self, path):
        """A descriptor of the very file that was digested at ``path`` (``None`` when ``path`` names another
        file now); read it through :func:`descriptor_path` to read the verified bytes, whatever is renamed
        over ``path`` afterwards."""
        path = os.path.abspath(path)
        fd, st = open_regular(path)
        if path not in self._digests or _identity(st) != self._digests[path][1]:
            os.close(fd)
            return None
        return fd

    def unchanged(self, path):
        """Whether ``path`` still names the file that was digested."""
        path = os.path.abspath(path)
        try:
            return path in self._digests and _identity(os.lstat(path)) == self._digests[path][1]
        except FileNotFoundError:
            return False

    def describe(self, path, record, *, size=None):
        """Why the file at ``path`` is not the generation that ``record`` describes."""
        if size is None:
            try:
                actual = self.digest(path)
            except NotARegularFile as e:
                return str(e)
            except FileNotFoundError:
                return f"{path}: missing (removed or renamed while it was read)"
            found = f"found {actual.size} bytes with digest {actual.digest}"
        else:
            found = f"found {size} bytes"
        if record is None:
            return f"{path}: {found}, which no manifest record describes"
        return f"{path}: expected {record['size']} bytes with digest {record['digest']}, {found}"


def descriptor_path(fd):
    """A path that opens the file of descriptor ``fd`` (Linux's ``/proc/self/fd``), or ``None`` elsewhere."""
    path = f"/proc/self/fd/{fd}"
    return path if os.path.exists(path) else None


def archive_directory(path):
    """The records of the zip directory of the ``torch.save`` archive at ``path``, and the file's size.

    Only the directory, at the file's end, is read. A ``/proc/self/fd`` path (a
    verified descriptor's file, a link by design) is opened as it is; any other path
    only if it names a regular file (no link followed, no FIFO waited on).

    :return: ``(records, size)``, the records as ``zipfile.ZipInfo``.
    :raises NotACheckpointError: when it is not a readable zip archive.
    """
    path = os.fspath(path)
    try:
        if path.startswith("/proc/self/fd/"):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(fd)
        else:
            fd, st = open_regular(path)
        with os.fdopen(fd, "rb") as f, zipfile.ZipFile(f) as archive:
            return archive.infolist(), st.st_size
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise NotACheckpointError(f"{path} is not a torch.save archive that experiment_io wrote ({e}).") from e


def check_archive(path):
    """Refuse a ``torch.save`` archive that could cost more to open than its size.

    experiment_io writes every record of an archive uncompressed. A record that is
    compressed, or that claims more bytes than the whole file holds (a deflate bomb),
    is refused before anything is decompressed. Only the archive's directory, at
    its end, is read (:func:`archive_directory`).

    :raises NotACheckpointError: naming the file and the record.
    """
    records, size = archive_directory(path)
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.file_size > size:
            raise NotACheckpointError(
                f"{os.fspath(path)}: the record {record.filename!r} is compressed or claims {record.file_size} bytes "
                f"in a file of {size}: experiment_io never writes such records; the file is refused without being "
                "decompressed.")
