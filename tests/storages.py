"""Storages for the run tests: faults injected into the directory's, and a second implementation.

:class:`FaultyStorage` is the directory's storage in which a write, an fsync or a
publication of a chosen file fails as a full disk would. :class:`ShelvedStorage`
keeps every file of a run under another name, in a folder of its own
(``<root>/shelf/<name>.blob``): code that joined a run's directory and a file name
itself, instead of asking the storage, would find nothing; it injects the same faults.
"""
import errno
import os

from experiment_io.errors import CheckpointWriteError
from experiment_io.storage import atomic
from experiment_io.storage.interface import WriteBatch
from experiment_io.storage.posix import PosixStorage


class Fault(OSError):
    def __init__(self, step, name):
        super().__init__(errno.ENOSPC, f"No space left on device (injected at {step} of {name})")


class FaultyStorage(PosixStorage):
    """The files of a run in ``root``; ``faults`` is a set of ``(step, name)`` with step one of ``"write"``,
    ``"durable"``, ``"publish"``: that step of that file fails (once) with ENOSPC."""

    def __init__(self, root, faults=()):
        super().__init__(root)
        self.faults = set(faults)

    def batch(self):
        return _FaultyBatch(self, super().batch())

    def fail(self, step, name):
        if (step, name) in self.faults:
            self.faults.discard((step, name))
            raise Fault(step, name)


class ShelvedStorage(FaultyStorage):
    """The files of a run as ``<root>/shelf/<name>.blob`` (faults as :class:`FaultyStorage`)."""

    SUFFIX = ".blob"

    def __init__(self, root, faults=()):
        super().__init__(root, faults)
        self.shelf = os.path.join(self.location, "shelf")

    def __repr__(self):
        return f"ShelvedStorage({self.location!r})"

    def create(self):
        atomic.make_directory(self.shelf)

    def exists(self):
        return os.path.isdir(self.shelf)

    def path(self, name):
        return os.path.join(self.shelf, name + self.SUFFIX)

    def names(self):
        try:
            found = os.listdir(self.shelf)
        except FileNotFoundError:
            return iter(())
        return iter(sorted(n[:-len(self.SUFFIX)] for n in found if n.endswith(self.SUFFIX)))

    def remove_stale_temporaries(self):
        return atomic.remove_stale_temporaries(self.shelf)


class _FaultyBatch(WriteBatch):
    def __init__(self, storage, batch):
        self._storage, self._batch, self._written = storage, batch, []

    def __enter__(self):
        self._batch.__enter__()
        return self

    def __exit__(self, *exc):
        return self._batch.__exit__(*exc)

    def write(self, name, write, *, hashed=True):
        def failing(f):
            self._storage.fail("write", name)
            return write(f)
        self._written.append(name)
        return self._batch.write(name, failing, hashed=hashed)

    def make_durable(self):
        for name in self._written:
            try:
                self._storage.fail("durable", name)
            except Fault as e:
                raise CheckpointWriteError(f"could not make {name} durable: {e}") from e
        self._written = []
        self._batch.make_durable()

    def publish(self, name, keep_previous=None):
        try:
            self._storage.fail("publish", name)
        except Fault as e:
            raise CheckpointWriteError(f"could not publish {name}: {e}") from e
        self._batch.publish(name, keep_previous)

    def sync(self):
        self._batch.sync()
