"""Asynchronous saving: the training loop copies its state, a thread writes it.

A save in the background has two halves. :class:`StagingArea` copies every tensor
of the payloads into host buffers that it allocates once and reuses from save to
save (pinned memory when the tensor lives on a GPU, so that the copy runs at full
speed); the containers around the tensors are copied too, so that the training
loop may change its state as soon as the copy is done. :class:`BackgroundSaver`
then hands the copy to :meth:`RunWriter.save <experiment_io.checkpoint.RunWriter.save>`
in a thread: writing, fsync, digest and manifest happen exactly as in a
synchronous save, only elsewhere. The training loop waits only for the copy.

At most one save is in flight: a new save, and :meth:`BackgroundSaver.wait`, first
wait for the previous one to commit. An error of the background save is raised
there, in the training loop (an :class:`OSError` as
:class:`~experiment_io.errors.CheckpointWriteError`); it is never lost.

A staged copy holds the same tensors, views, strides and sharing as the original:
each storage is copied whole, once, and every tensor is rebuilt as the same view of
its copy, so ``torch.save`` writes a staged payload to the same bytes as the
original. Tensors that came from a GPU are written from their host copy: their
storages are recorded as CPU storages in the file (experiment_io's loaders place
every tensor by its type in any case).
"""
import copy
import enum
import logging
import threading
import time
from collections import defaultdict

import torch

from .errors import CheckpointWriteError

__all__ = ["StagingArea", "BackgroundSaver", "with_own_memory"]

log = logging.getLogger(__name__)

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
              torch.memory_format, enum.Enum, range, type(Ellipsis))


class _TreeCopy:
    """Copies a tree of containers; each storage of its tensors is copied whole, once.

    Dicts (with their attributes, such as a ``state_dict``'s ``_metadata``), lists
    and tuples are rebuilt; immutable values are kept; other objects are
    deep-copied. An object reached twice is copied once, and tensors that shared a
    storage share its copy, with the same offsets, sizes and strides.
    """

    def __call__(self, obj):
        self._storages = {}
        try:
            return self._copy(obj, {})
        finally:
            del self._storages

    def _copy(self, obj, memo):
        if isinstance(obj, _IMMUTABLE) or isinstance(obj, type):
            return obj
        key = id(obj)
        if key in memo:
            return memo[key]
        if isinstance(obj, torch.Tensor):
            result = self._copy_tensor(obj)
        elif isinstance(obj, dict):
            result = copy.copy(obj)  # the same type, with its attributes (and default_factory)
            result.clear()
            for k, v in obj.items():
                result[k] = self._copy(v, memo)
            for name, value in getattr(obj, "__dict__", {}).items():
                setattr(result, name, self._copy(value, memo))
        elif type(obj) is list:
            result = [self._copy(v, memo) for v in obj]
        elif isinstance(obj, tuple):
            items = [self._copy(v, memo) for v in obj]
            result = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        else:
            result = copy.deepcopy(obj)
        memo[key] = result
        return result

    def _copy_tensor(self, tensor):
        plain = type(tensor) in (torch.Tensor, torch.nn.Parameter)
        if (not plain or tensor.layout != torch.strided or tensor.is_quantized or tensor.is_conj() or tensor.is_neg()
                or tensor.device.type == "meta"):
            return copy.deepcopy(tensor.detach() if not plain else tensor)
        source = tensor.untyped_storage()
        staged = self._storages.get(source._cdata)
        if staged is None:
            staged = self._storage_copy(source)
            if staged is None:
                return tensor
            self._storages[source._cdata] = staged
        result = torch.empty((), dtype=tensor.dtype, device=staged.device).set_(
            staged, tensor.storage_offset(), tensor.size(), tensor.stride())
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(result, requires_grad=tensor.requires_grad)
        return result.requires_grad_(tensor.requires_grad)

    def _storage_copy(self, source):
        """A copy of the ``UntypedStorage`` ``source``, or ``None`` to keep the tensor as it is."""
        raise NotImplementedError


class _OwnMemory(_TreeCopy):
    def _storage_copy(self, source):
        if source.device.type != "cpu":
            return None
        copied = torch.empty(source.nbytes(), dtype=torch.uint8).untyped_storage()
        copied.copy_(source)
        return copied


def with_own_memory(obj):
    """A copy of ``obj`` whose CPU tensors hold memory of their own.

    For states read with ``torch.load(mmap=True)``: the copy no longer refers to the
    file, so that nothing keeps the file mapped (and, once it is replaced, on disk)
    after the load. Views and shared storages are kept; tensors on other devices are
    kept as they are.
    """
    return _OwnMemory()(obj)


class StagingArea(_TreeCopy):
    """Host buffers that receive a copy of a payload's tensors, reused from copy to copy.

    :param pin_memory: allocate pinned buffers for tensors that live on a GPU
        (default: when CUDA is available).
    """

    def __init__(self, *, pin_memory=None):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._pool = defaultdict(list)  # (nbytes, pinned) -> buffers of the previous copy
        self.allocated = 0  # buffers allocated so far (for tests and logs)

    @property
    def nbytes(self):
        """Bytes held by the buffers of the latest copy."""
        return sum(key[0] * len(buffers) for key, buffers in self._pool.items())

    def buffers(self):
        """The buffers (``torch.UntypedStorage``) of the latest copy, in the order they were used."""
        return [b for buffers in self._pool.values() for b in buffers]

    def copy(self, obj):
        """A copy of ``obj`` (see :class:`_TreeCopy`) whose tensors live in this area's buffers.

        The buffers of the previous copy are reused for storages of the same size;
        those left over are released. Copies from a GPU are waited for before
        returning.
        """
        self._available = {key: list(buffers) for key, buffers in self._pool.items()}
        self._used = defaultdict(list)
        self._devices = set()
        try:
            result = self(obj)
            for device in self._devices:
                torch.cuda.synchronize(device)
        finally:
            self._pool = self._used
            del self._available, self._used, self._devices
        return result

    def _storage_copy(self, source):
        pinned = self.pin_memory and source.device.type != "cpu"
        key = (source.nbytes(), pinned)
        available = self._available.get(key)
        if available:
            buffer = available.pop(0)
        else:
            buffer = torch.empty(key[0], dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            self.allocated += 1
        self._used[key].append(buffer)
        buffer.copy_(source, non_blocking=pinned)
        if source.device.type == "cuda":
            self._devices.add(source.device)
        return buffer


class BackgroundSaver:
    """Saves through a :class:`~experiment_io.checkpoint.RunWriter` in a background thread.

    :param writer: the run's writer; while a save is in flight only the background
        thread uses it.
    :param staging: the :class:`StagingArea` (default: a new one).
    """

    def __init__(self, writer, *, staging=None):
        self.writer = writer
        self.staging = staging if staging is not None else StagingArea()
        self._thread = None
        self._done = threading.Event()
        self._error = None
        self._names = ()
        #: seconds the caller was blocked by the latest :meth:`save` (waiting for the
        #: previous save included), and seconds the latest background save took
        self.blocked_s = 0.0
        self.written_s = 0.0

    @property
    def in_flight(self):
        """Whether a save has been started and not yet waited for."""
        return self._thread is not None

    def save(self, payloads):
        """Copy ``payloads`` into the staging buffers and write them in the background.

        Waits first for the previous save to commit.

        :param payloads: as for :meth:`RunWriter.save <experiment_io.checkpoint.RunWriter.save>`.
        :raises CheckpointWriteError: when the previous save failed (and then this
            one is not started).
        """
        started = time.perf_counter()
        self.wait()
        staged = self.staging.copy(payloads)
        self._names = tuple(payloads)
        self._error = None
        self._done.clear()
        self._thread = threading.Thread(target=self._write, args=(staged,), name="experiment_io-save", daemon=False)
        self._thread.start()
        self.blocked_s = time.perf_counter() - started
        log.debug("staged %s in %.3f s; writing in the background", ", ".join(self._names), self.blocked_s)

    def _write(self, staged):
        started = time.perf_counter()
        try:
            self.writer.save(staged)
        except BaseException as e:  # handed to the training loop by wait()
            self._error = e
        finally:
            self.written_s = time.perf_counter() - started
            self._done.set()

    def wait(self):
        """Wait until the save in flight (if any) has committed.

        A Ctrl-C while waiting does not abandon the save: the wait goes on, and the
        :class:`KeyboardInterrupt` is raised once the save has ended.

        :raises CheckpointWriteError: when the background save failed with an
            :class:`OSError`; other exceptions of the save are raised as they are.
        """
        if self._thread is None:
            return
        interrupted = None
        while not self._done.is_set():
            try:
                self._done.wait()
            except KeyboardInterrupt as e:
                interrupted = e
                log.warning("interrupted while %s is written in the background; waiting for it to commit",
                            ", ".join(self._names))
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            self._raise(error)
        log.debug("background save of %s committed (%.3f s)", ", ".join(self._names), self.written_s)
        if interrupted is not None:
            raise interrupted

    def _raise(self, error):
        if isinstance(error, CheckpointWriteError) or not isinstance(error, OSError):
            raise error
        raise CheckpointWriteError(
            f"The background save of {', '.join(self._names)} in {self.writer.directory} failed: "
            f"{error.strerror or error}. The previous checkpoint is intact; free disk space or fix the "
            "directory's permissions and restart from it."
        ) from error
