"""The writer of a file's bytes: digested while written, small writes gathered, write-back started early.

:class:`HashingWriter` is the file object that a save's serializer writes into. It
digests exactly the bytes of the file, in order, in consecutive parts
(:mod:`experiment_io.storage.parts`): a write of at least
:data:`~experiment_io.storage.parts.PART_AT_LEAST` bytes (a large tensor's data)
makes parts of its own, at most :data:`~experiment_io.storage.parts.PART_AT_MOST`
bytes each, and the bytes between such writes make the other parts, so that a load
can verify the parts on every core and a tensor's parts where the load maps it.
Large writes are digested on the side thread
(:func:`~experiment_io.platform.threads.side_thread`) while they are written. The
writer gathers small writes into blocks of :data:`WRITE_BLOCK` bytes, writes large
ones straight from the caller's memory, and every :data:`WRITEBACK_EVERY` bytes asks
the kernel to start writing back what was written so far
(:class:`~experiment_io.platform.writeback.Writeback`), so that the final fsync
has little left to wait for.
"""
from __future__ import annotations

import io
import os
from typing import Any

import xxhash

from experiment_io.platform.threads import SIDE_DIGEST_BYTES, side_thread
from experiment_io.platform.writeback import Writeback
from experiment_io.format.codec import parts_digest
from experiment_io.storage.parts import PART_AT_LEAST, PART_AT_MOST
from experiment_io.storage.verification import DIGEST_NAME, FileRecord

__all__ = ["HashingWriter", "DIRECT_WRITE", "WRITE_BLOCK", "WRITEBACK_EVERY"]


#: Writes smaller than this are gathered into blocks of :data:`WRITE_BLOCK` bytes;
#: larger ones go to the file directly, without a copy.
DIRECT_WRITE = 256 * 1024


#: The size of the blocks into which small writes are gathered.
WRITE_BLOCK = 4 * 1024 * 1024


#: Ask the kernel to start writing back every this many bytes written.
WRITEBACK_EVERY = 8 * 1024 * 1024


class HashingWriter:
    """A write-only file that digests and counts what passes through it.

    Small writes (``torch.save`` makes hundreds: zip headers, the pickle) are
    gathered into blocks; large ones (tensor data) are written straight from the
    caller's memory (and digested on the side thread while they are written).
    The digest covers exactly the bytes of the file, in order. Every
    :data:`WRITEBACK_EVERY` bytes the kernel is asked to start writing back what
    was written so far; the final fsync then has little left to wait for.

    :param fd: a file descriptor open for writing, at offset 0.
    :param writeback: the file's :class:`~experiment_io.platform.writeback.Writeback` (default: a new one).
    """

    def __init__(self, fd: int, writeback: Writeback | None = None):
        self._fd = fd
        self._writeback = writeback if writeback is not None else Writeback()
        self._hash = xxhash.xxh3_128()  # of the part being written
        self._part_size = 0
        self._parts: list[tuple[int, str]] = []  # (size, xxh3-128 hex) of each part written whole
        self._pending = bytearray()
        self._written_back = 0
        self.size = 0
        self.error = None  # the first OSError of a write: every later write raises it again

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if n >= DIRECT_WRITE:
            self._drain()
            self._out(view)
        else:
            self._pending += view
            if len(self._pending) >= WRITE_BLOCK:
                self._drain()
        return n

    def flush(self) -> None:
        self._drain()

    def _drain(self):
        if self._pending:
            self._out(memoryview(self._pending))
            self._pending = bytearray()

    def _out(self, view):
        if self.error is not None:
            raise self.error
        # a large write is digested on the side thread while it is written, and the digest is complete before this
        # returns: the caller may free or reuse its buffer as soon as write() returns
        digesting = side_thread().submit(self._digest, view) if len(view) >= SIDE_DIGEST_BYTES else None
        if digesting is None:
            self._digest(view)
        try:
            while view:
                written = os.write(self._fd, view[:WRITEBACK_EVERY])
                self.size += written
                view = view[written:]
                if self.size - self._written_back >= WRITEBACK_EVERY:
                    self._start_writeback()
        except OSError as e:
            self.error = e
            raise
        finally:
            if digesting is not None:
                digesting.result()

    def _digest(self, view):
        if len(view) >= PART_AT_LEAST:  # a part (or parts) of its own
            self._end_part()
            for start in range(0, len(view), PART_AT_MOST):
                piece = view[start:start + PART_AT_MOST]
                self._parts.append((len(piece), xxhash.xxh3_128(piece).hexdigest()))
            return
        while view:
            piece = view[:PART_AT_MOST - self._part_size]
            self._hash.update(piece)
            self._part_size += len(piece)
            view = view[len(piece):]
            if self._part_size == PART_AT_MOST:
                self._end_part()

    def _end_part(self):
        if self._part_size:
            self._parts.append((self._part_size, self._hash.hexdigest()))
            self._hash, self._part_size = xxhash.xxh3_128(), 0

    def _start_writeback(self):
        self._writeback.start(self._fd, self._written_back, self.size - self._written_back)
        self._written_back = self.size

    def record(self) -> FileRecord:
        """The file's record: its size and digest, and its parts when it has more than one."""
        self.flush()
        self._end_part()
        if len(self._parts) <= 1:  # the digest of the whole file, as a file of one part always had
            whole = self._parts[0][1] if self._parts else xxhash.xxh3_128().hexdigest()
            return FileRecord(self.size, f"{DIGEST_NAME}:{whole}")
        return FileRecord(self.size, parts_digest(self._parts), tuple(self._parts))

    def written(self) -> io.BufferedReader:
        """A readable file object over what was written so far (it reads with ``pread``: the write offset stays)."""
        self.flush()
        return io.BufferedReader(PositionalReader(self._fd, self.size))


class PositionalReader(io.RawIOBase):
    """Reads ``size`` bytes of a descriptor with ``pread``, leaving its file offset alone."""

    def __init__(self, fd: int, size: int):
        self._fd, self._size, self._position = fd, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, min(len(buffer), max(self._size - self._position, 0)), self._position)
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence] + offset
        return self._position

    def tell(self) -> int:
        return self._position

