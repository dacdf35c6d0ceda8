"""Files of a run that only grow: each save appends to them, and commits how far they go.

A record that grows with the run (one row of metrics per epoch) is never rewritten:
rewriting it at every save makes a run of *n* epochs cost *n*\\ :sup:`2`. An
:class:`AppendedFile` appends the new rows, keeps the digest of everything written so
far as it goes (no byte is read again), and gives the record of its current length
(:meth:`AppendedFile.record`), which the save commits in the manifest and in the
checkpoint that needs it. A checkpoint holds the length and digest of the prefix it
was saved with; :func:`read_prefix` reads that prefix back, verified, and ignores
whatever a later save (or a save killed before its commit) appended beyond it. A run
that resumes starts its file again at the prefix of the checkpoint it resumed from
(:meth:`AppendedFile.start`), so the rows of a lost save are dropped.

The manifest record of such a file carries ``"appended": true``: its size and digest
are those of the file's first ``size`` bytes.

A file that must begin differently (a metric appeared, so the header changed) is
written again once; what it held is kept first under an *earlier* name
(``metrics.earlier-1.csv``: :func:`earlier_names`), where the checkpoints saved before
the change still find their part of it.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any, Mapping, Optional

import xxhash

from experiment_io.errors import CheckpointWriteError, CorruptCheckpointError
from experiment_io.storage.interface import RunStorage
from experiment_io.storage.verification import DIGEST_NAME, FileRecord, read_exactly

log = logging.getLogger(__name__)

__all__ = ["AppendedFile", "read_prefix", "earlier_names", "APPENDED"]

#: The field of a manifest record that marks a file which only grows.
APPENDED = "appended"


def _digest(hasher: Any) -> str:
    return f"{DIGEST_NAME}:{hasher.hexdigest()}"


def _earlier_name(name: str, number: int) -> str:
    stem, ext = os.path.splitext(name)
    return f"{stem}.earlier-{number}{ext}"


def earlier_names(storage: RunStorage, name: str) -> list:
    """The names under which earlier contents of the growing file ``name`` are kept, the newest first."""
    stem, ext = os.path.splitext(name)
    pattern = re.compile(re.escape(stem) + r"\.earlier-([1-9][0-9]{0,8})" + re.escape(ext))
    found = [(int(m.group(1)), n) for n in storage.names() if (m := pattern.fullmatch(n))]
    return [n for _, n in sorted(found, reverse=True)]


def read_prefix(storage: RunStorage, name: str, record: Mapping[str, Any]) -> bytes:
    """The first ``record["size"]`` bytes of the run's file ``name``, verified against ``record["digest"]``; when
    the file has since been written again, those of the earlier content kept aside that has them.

    :raises CorruptCheckpointError: when no such file holds a prefix of that size and digest.
    """
    size, expected = record.get("size"), record.get("digest")
    if not isinstance(size, int) or size < 0 or not isinstance(expected, str):
        raise CorruptCheckpointError(f"{storage.path(name)}: the record of its committed part is malformed ({record})")
    try:
        return _read_prefix(storage, name, size, expected)
    except CorruptCheckpointError as e:
        for earlier in earlier_names(storage, name):
            try:
                return _read_prefix(storage, earlier, size, expected)
            except CorruptCheckpointError:
                continue
        raise e


def _read_prefix(storage, name, size, expected):
    try:
        fd, _ = storage.open(name)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{storage.path(name)} cannot be read ({e}); the checkpoint's history lives "
                                     "there") from e
    try:
        data = read_exactly(fd, size)
    finally:
        os.close(fd)
    found = _digest(xxhash.xxh3_128(data))
    if len(data) != size or found != expected:
        raise CorruptCheckpointError(f"{storage.path(name)}: its first {size} bytes (the part the checkpoint "
                                     f"committed) have digest {found} over {len(data)} bytes, not {expected}")
    return data


class AppendedFile:
    """A run's file that only grows (see the module's description).

    :param storage: the run's storage.
    :param name: the file's name in the run.
    """

    def __init__(self, storage: RunStorage, name: str):
        self.storage, self.name = storage, name
        self._fd: Optional[int] = None
        self._closing = threading.Lock()  # make_durable (behind the loop) and close, one at a time
        self._hash = xxhash.xxh3_128()
        self.size = 0

    def start(self, beginning: bytes, *, keep_earlier: bool = True) -> None:
        """Make the file begin with exactly ``beginning`` and end there: a file that already begins so is cut
        after it (what a lost save appended goes); any other is replaced by ``beginning``.

        :param keep_earlier: keep what a replaced file held under the next free earlier name first (see the
            module's description); ``False`` when no checkpoint refers to it.
        """
        self.close()
        keep, held = False, None
        try:
            fd, st = self.storage.open(self.name)
        except (OSError, ValueError):
            pass
        else:
            try:
                keep = st.st_size >= len(beginning) and read_exactly(fd, len(beginning)) == beginning
                if not keep and st.st_size and keep_earlier:
                    os.lseek(fd, 0, os.SEEK_SET)
                    held = read_exactly(fd, st.st_size)
            finally:
                os.close(fd)
        if not keep:
            if held:
                names = earlier_names(self.storage, self.name)
                number = int(os.path.splitext(names[0])[0].rsplit("-", 1)[1]) + 1 if names else 1
                aside = _earlier_name(self.name, number)
                self.storage.write_file(aside, lambda f: f.write(held))
                log.info("%s is written again from its beginning; what it held is kept in %s, where older "
                         "checkpoints find their part of the history", self.storage.path(self.name), aside)
            self.storage.write_file(self.name, lambda f: f.write(beginning))
        try:
            self._fd = self.storage.open_for_append(self.name)
            if keep:
                os.ftruncate(self._fd, len(beginning))
        except OSError as e:
            self.close()
            raise CheckpointWriteError(f"could not open {self.storage.path(self.name)} to append to it: {e}") from e
        self._hash = xxhash.xxh3_128(beginning)
        self.size = len(beginning)

    def append(self, data: bytes) -> None:
        """Append ``data`` (not yet durable: :meth:`make_durable`)."""
        if self._fd is None:
            raise RuntimeError(f"{self.name} is appended to before start()")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as e:
            raise CheckpointWriteError(f"could not append to {self.storage.path(self.name)}: {e}. The committed "
                                       "checkpoints are intact.") from e
        self._hash.update(data)
        self.size += len(data)

    def make_durable(self) -> None:
        """fsync what was appended (nothing once closed: a thread behind the loop may call it as the file closes)."""
        with self._closing:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError as e:
                    raise CheckpointWriteError(f"could not make {self.storage.path(self.name)} durable: {e}") from e

    def record(self) -> FileRecord:
        """The size and digest of the file as far as it goes now."""
        return FileRecord(self.size, _digest(self._hash))

    def close(self) -> None:
        """Close the file (it stays as it is)."""
        with self._closing:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
