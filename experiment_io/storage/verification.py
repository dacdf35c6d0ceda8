"""Verification: how a file is proven to be the one a manifest record describes.

A record holds a file's size and its xxh3-128 digest (:data:`DIGEST_NAME`).
:class:`Verifier` digests the files of a run directory on demand, each at most
once, and remembers which file (device and inode) it digested, so that a loader
can prove that the file it then reads is the one it verified.
"""
import contextlib
import contextvars
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import xxhash

from experiment_io.errors import CorruptCheckpointError, NotACheckpointError
from experiment_io.platform.archive import archive_directory
from experiment_io.platform.files import NotARegularFile, open_regular
from experiment_io.platform.maps import DIGEST_PART, map_for_reading
from experiment_io.storage.interface import RunStorage, as_storage
from experiment_io.storage.parts import record_parts, split_frame, storage_spans, verify_in_memory, verify_parts

__all__ = ["DIGEST_NAME", "MAP_AT_LEAST", "READ_BLOCK", "FileRecord", "file_digest", "file_matches", "Verifier",
           "check_archive", "PartMismatch", "remembering_mismatches"]

#: The digest algorithm; its name is stored with every digest.
DIGEST_NAME = "xxh3_128"

#: Files at least this large are digested through a memory map; smaller ones are
#: read in blocks of :data:`READ_BLOCK` bytes.
MAP_AT_LEAST = 1024 * 1024
#: The block size of a digest that reads.
READ_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class FileRecord:
    """What is known of a written file: its size in bytes and its digest.

    :ivar size: number of bytes.
    :ivar digest: ``"<algorithm>:<hex>"``: of the whole file, or (``xxh3_128-parts``) of the list of its parts.
    :ivar parts: ``None``, or the ``(size, xxh3-128 hex)`` of each of the file's consecutive parts
        (:mod:`experiment_io.storage.parts`).
    """

    size: int
    digest: str
    parts: Optional[tuple[tuple[int, str], ...]] = None

    def as_dict(self) -> dict[str, Any]:
        """``{"size": ..., "digest": ...}``, and ``"parts": [[size, hex], ...]`` when it has them."""
        if self.parts is None:
            return {"size": self.size, "digest": self.digest}
        return {"size": self.size, "digest": self.digest, "parts": [list(part) for part in self.parts]}


def _digest_fd(fd, map_at_least=MAP_AT_LEAST, part=DIGEST_PART):
    """Digest the file open at ``fd`` (at offset 0) from its first byte to its end.

    Files of ``map_at_least`` bytes or more are hashed through a read-only
    memory map, ``part`` bytes at a time (see :func:`~experiment_io.platform.maps.map_for_reading`): the hash
    reads the page cache directly, without copying it (about twice as fast as reading); smaller files,
    and files that cannot be mapped, are read in blocks. A file must not be truncated by another process while it is
    digested (a mapped page beyond the end of a file cannot be read); this library
    never truncates a file, it replaces files by renaming new ones over them.
    """
    size = os.fstat(fd).st_size
    if size >= map_at_least:
        try:
            mapped = map_for_reading(fd, size)
        except (OSError, ValueError):  # a file system without mmap: read it
            pass
        else:
            hasher = xxhash.xxh3_128()
            with mapped:
                for piece in mapped.parts(part):
                    hasher.update(piece)
            return FileRecord(size, f"{DIGEST_NAME}:{hasher.hexdigest()}")
    hasher = xxhash.xxh3_128()
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    size = 0
    while True:
        n = os.readv(fd, [buffer])
        if not n:
            break
        hasher.update(view[:n])
        size += n
    return FileRecord(size, f"{DIGEST_NAME}:{hasher.hexdigest()}")


def file_digest(path: Union[str, os.PathLike], *, map_at_least: int = MAP_AT_LEAST,
                part: int = DIGEST_PART) -> FileRecord:
    """Digest a regular file on disk (a symbolic link or a special file is refused).

    :param map_at_least: a file at least this large is digested through a memory map, ``part`` bytes at a time
        (the result is the same either way).
    :return: its :class:`FileRecord`.
    """
    fd, _ = open_regular(path)
    try:
        return _digest_fd(fd, map_at_least, part)
    finally:
        os.close(fd)


def read_exactly(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of the file open at ``fd`` (fewer when it is shorter), read by offset."""
    chunks, done = [], 0
    while done < size:
        chunk = os.pread(fd, min(size - done, READ_BLOCK), done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def file_matches(path: Union[str, os.PathLike], record: Optional[Mapping[str, Any]]) -> bool:
    """Whether the file at ``path`` has the size and digest of the manifest ``record``.

    The size is compared first, so a file of another size is not read. A missing
    file or a ``None`` record does not match.
    """
    return record is not None and Verifier(os.path.dirname(os.path.abspath(path)), {}).matches(path, record)


def _identity(stat_result):
    return stat_result.st_dev, stat_result.st_ino


class PartMismatch(CorruptCheckpointError):
    """A part of a file's tensor data, verified after the file was mapped, does not match its record.

    :ivar path: the file's path.
    """

    def __init__(self, message: str, path: str, identity: tuple[int, int]):
        super().__init__(message)
        self.path, self.identity = path, identity


#: The files (device, inode) found damaged by a late verification during the current load, with why: a load that
#: starts over (:func:`remembering_mismatches`) no longer takes them for intact.
_MISMATCHES: contextvars.ContextVar[Optional[dict[tuple[int, int], str]]] = contextvars.ContextVar(
    "experiment_io_mismatches", default=None)


@contextlib.contextmanager
def remembering_mismatches() -> Iterator[dict[tuple[int, int], str]]:
    """Within it, every :class:`Verifier` takes a file that a :class:`PartMismatch` was raised for as damaged."""
    known = _MISMATCHES.get()
    if known is not None:
        yield known
        return
    token = _MISMATCHES.set({})
    try:
        yield _MISMATCHES.get()  # type: ignore[misc]
    finally:
        _MISMATCHES.reset(token)


def is_retired(record: Any) -> bool:
    """Whether a manifest record is of a file being removed (see :mod:`experiment_io.training.retention`)."""
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

    :param directory: the run's :class:`~experiment_io.storage.interface.RunStorage`, or its directory.
    :param files: the manifest's records; those marked ``"retired"`` (files being
        removed by a retention) are kept apart in ``retired`` and never used.
    :param defer: a file recorded in parts (:mod:`experiment_io.storage.parts`) is verified by :meth:`matches`
        only in its frame; the parts of its large tensors are left to :meth:`finish`, which the reader calls once
        the file is mapped. Without it, :meth:`matches` verifies every byte.
    """

    def __init__(self, directory: Union[RunStorage, str, os.PathLike], files: Mapping[str, Any], *,
                 defer: bool = False):
        self.storage = as_storage(directory)
        self.directory = self.storage.location
        self.files = {name: record for name, record in files.items() if not is_retired(record)}
        self.retired = {name: record for name, record in files.items() if is_retired(record)}
        self.defer = defer
        self._digests: dict[str, tuple[FileRecord, tuple[int, int]]] = {}
        self._pending: dict[str, tuple[list, list]] = {}  # path: (parts of tensor data not verified yet, spans)
        self._problems: dict[str, str] = {}  # path: which part did not match

    def path(self, name: str) -> str:
        """The path of ``name`` in the run."""
        return self.storage.path(name)

    def digest(self, path: Union[str, os.PathLike]) -> FileRecord:
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

    def matches(self, path: Union[str, os.PathLike], record: Mapping[str, Any]) -> bool:
        """Whether the file at ``path`` has the size and digest of ``record`` (the size is compared first).

        The record of a file that only grows (``"appended": true``, see :mod:`experiment_io.storage.appended`)
        describes the file's first ``size`` bytes.
        """
        if record.get("appended") is True:
            return self._prefix_matches(path, record)
        if record.get("parts") is not None:
            return self._parts_match(os.path.abspath(path), record)
        try:
            if os.path.abspath(path) not in self._digests and os.lstat(path).st_size != record["size"]:
                return False
            actual = self.digest(path)
        except (FileNotFoundError, NotARegularFile):
            return False
        return actual.size == record["size"] and actual.digest == record["digest"]

    def _parts_match(self, path, record):
        if path in self._digests and self._digests[path][0].digest == record["digest"]:
            return True
        try:
            fd, st = open_regular(path)
        except (FileNotFoundError, NotARegularFile):
            return False
        try:
            known = _MISMATCHES.get() or {}
            if st.st_size != record["size"] or _identity(st) in known:
                self._problems[path] = known.get(_identity(st), f"found {st.st_size} bytes")
                return False
            parts = record_parts(record) or []
            layout = storage_spans(fd) if self.defer else None
            frame, data = split_frame(parts, *layout) if layout is not None else (parts, [])
            bad = verify_parts(fd, frame)
            if bad is not None:
                self._problems[path] = _part_problem(bad)
                return False
        finally:
            os.close(fd)
        parts_held = tuple((size, digest) for _, size, digest in parts)
        self._digests[path] = (FileRecord(record["size"], record["digest"], parts_held), _identity(st))
        if data:
            self._pending[path] = (data, layout[0] if layout is not None else [])
        return True

    def finish(self, path: Union[str, os.PathLike], tensors: Iterable[Any] = (),
               wanted: Optional[Iterable[Any]] = None, *, read_from: Optional[str] = None) -> None:
        """Verify what :meth:`matches` left of the file at ``path``: the parts of its large tensors' data.

        :param tensors: every tensor of the file as just loaded; the parts are digested in their memory when it is
            the file's map (``torch.load(mmap=True)``), else in the file.
        :param wanted: only these tensors will be handed over: only their parts are verified.
        :param read_from: the path of a descriptor open on the verified file (what
            :func:`~experiment_io.platform.files.descriptor_path` gives): the parts left are read there, whatever was
            renamed over ``path`` since.
        :raises PartMismatch: when a part does not match (a load that starts over in :func:`remembering_mismatches`
            then takes the file for damaged).
        """
        path = os.path.abspath(path)
        pending = self._pending.pop(path, None)
        if pending is None:
            return
        data, spans = pending
        bad, left = verify_in_memory(data, spans, tensors, wanted)
        if bad is None and left:
            fd = self._reopen(path, read_from)
            try:
                bad = verify_parts(fd, left)
            finally:
                os.close(fd)
        if bad is not None:
            identity = self._digests.pop(path)[1]
            problem = self._problems[path] = _part_problem(bad)
            known = _MISMATCHES.get()
            if known is not None:
                known[identity] = problem
            raise PartMismatch(f"{path}: {problem}. The file was modified after it was written.", path, identity)

    def _reopen(self, path, read_from):
        """A descriptor of the very file verified at ``path`` (through ``read_from`` when given)."""
        try:
            if read_from is not None:
                fd = os.open(read_from, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                if _identity(os.fstat(fd)) == self._digests[path][1]:
                    return fd
                os.close(fd)
            else:
                fd = self.open_verified(path)
                if fd is not None:
                    return fd
        except (FileNotFoundError, NotARegularFile):
            pass
        raise CorruptCheckpointError(f"{path} was replaced or removed while it was read (a process is writing the "
                                     "run); load again.")

    def _prefix_matches(self, path, record):
        try:
            fd, st = open_regular(path)
        except (FileNotFoundError, NotARegularFile):
            return False
        try:
            size = record["size"]
            data = read_exactly(fd, size) if st.st_size >= size else b""
        finally:
            os.close(fd)
        return len(data) == size and f"{DIGEST_NAME}:{xxhash.xxh3_128(data).hexdigest()}" == record["digest"]

    def open_verified(self, path: Union[str, os.PathLike]) -> Optional[int]:
        """A descriptor of the very file that was digested at ``path`` (``None`` when ``path`` names another
        file now); read it through :func:`~experiment_io.platform.files.descriptor_path` to read the verified
        bytes, whatever is renamed over ``path`` afterwards."""
        path = os.path.abspath(path)
        fd, st = open_regular(path)
        if path not in self._digests or _identity(st) != self._digests[path][1]:
            os.close(fd)
            return None
        return fd

    def unchanged(self, path: Union[str, os.PathLike]) -> bool:
        """Whether ``path`` still names the file that was digested."""
        path = os.path.abspath(path)
        try:
            return path in self._digests and _identity(os.lstat(path)) == self._digests[path][1]
        except FileNotFoundError:
            return False

    def describe(self, path: Union[str, os.PathLike], record: Optional[Mapping[str, Any]], *,
                 size: Optional[int] = None) -> str:
        """Why the file at ``path`` is not the generation that ``record`` describes."""
        problem = self._problems.get(os.path.abspath(path))
        if problem is not None and record is not None and record.get("parts") is not None and size is None:
            return f"{path}: expected {record['size']} bytes in {len(record['parts'])} parts, {problem}"
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


def _part_problem(part):
    offset, size, _ = part
    return f"the part of bytes {offset} to {offset + size} does not match its digest"


def check_archive(path: Union[str, os.PathLike]) -> None:
    """Refuse a ``torch.save`` archive that could cost more to open than its size.

    experiment_io writes every record of an archive uncompressed. A record that is
    compressed, or that claims more bytes than the whole file holds (a deflate bomb),
    is refused before anything is decompressed. Only the archive's directory, at
    its end, is read (:func:`~experiment_io.platform.archive.archive_directory`).

    :raises NotACheckpointError: naming the file and the record.
    """
    records, size = archive_directory(path)
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.file_size > size:
            raise NotACheckpointError(
                f"{os.fspath(path)}: the record {record.filename!r} is compressed or claims {record.file_size} bytes "
                f"in a file of {size}: experiment_io never writes such records; the file is refused without being "
                "decompressed.")
