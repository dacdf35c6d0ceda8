"""Read-only maps of whole files, part by part, made without holding the GIL.

:func:`map_for_reading` maps a file through direct ``mmap(2)`` calls (:mod:`ctypes`,
which lets go of the GIL) where the C library has them, and through
:class:`mmap.mmap` elsewhere or with the fast paths off
(:mod:`experiment_io.platform.switch`). :func:`libc` gives the typed C functions to
the memory residence of a resume (:mod:`experiment_io.platform.residence`).
"""
import ctypes
import mmap
import os
import sys
from typing import Optional, Union

import numpy as np

from experiment_io.platform import switch

__all__ = ["libc", "map_for_reading", "DIGEST_PART"]

def libc() -> Optional[ctypes.CDLL]:
    """The C library, its ``mmap``, ``munmap``, ``mincore`` and ``madvise`` typed for :mod:`ctypes` (calls made
    through it let go of the GIL); ``None`` where they are missing (not Linux, not 64-bit) or the fast paths are
    off."""
    return _LibcMap._libc if switch.enabled() and _LibcMap.available() else None


#: The digest of a mapped file goes this many bytes at a time: each part is faulted in, hashed, and let go, so
#: that the map never holds more than one part of the file.
DIGEST_PART = 64 * 1024 * 1024
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class _LibcMap:
    """A read-only shared map of a whole file, made by direct ``mmap(2)`` calls, each without the GIL.

    The calls go through :mod:`ctypes`, which lets go of the GIL while they run
    (Python's :class:`mmap.mmap` holds it while ``MAP_POPULATE`` reads a file in, so a
    cold 2 GiB file stopped every other thread for as long as the disk took).
    :meth:`parts` gives the file :data:`DIGEST_PART` bytes at a time (or as asked) and lets each
    part's pages go once it has been used, so that the process never holds the whole
    file's pages: a load that makes memory ready for the file's tensors meanwhile
    (:mod:`experiment_io.platform.residence`) holds about the file's size, not twice that. A
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

    def parts(self, size=DIGEST_PART):
        """The file's bytes, ``size`` (rounded down to whole pages) at a time (read-only views); each part's pages
        are let go when the next is asked for."""
        page_aligned = max(size - size % mmap.PAGESIZE, mmap.PAGESIZE)
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

    def digest(self, offset, length, digest):
        """``digest(bytes)`` of ``length`` bytes at ``offset``: faulted in by one call, let go after (several
        threads may digest parts of one map at once)."""
        start = offset - offset % mmap.PAGESIZE
        if self._cached:
            self._libc.madvise(self._address + start, offset + length - start, _MADV_POPULATE_READ)
        part = self.view[offset:offset + length]
        try:
            return digest(part)
        finally:
            part.release()
            self._libc.madvise(self._address + start, offset + length - start, mmap.MADV_DONTNEED)

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

    def parts(self, size=DIGEST_PART):
        yield self._map

    def digest(self, offset, length, digest):
        """``digest(bytes)`` of ``length`` bytes at ``offset``."""
        with memoryview(self._map) as view:
            return digest(view[offset:offset + length])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._map.close()


def map_for_reading(fd: int, size: int) -> Union[_LibcMap, _PythonMap]:
    """A read-only map of the file that gives it part by part (through direct ``mmap(2)`` calls where it can)."""
    if switch.enabled() and _LibcMap.available():
        return _LibcMap(fd, size)
    return _PythonMap(fd, size)

