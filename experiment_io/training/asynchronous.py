"""Asynchronous saving: the training loop copies its state, a thread writes it.

A save in the background has two halves. :class:`StagingArea` copies every tensor
of the payloads into host buffers that it allocates once and reuses from save to
save (pinned memory when the tensor lives on a GPU, so that the copy runs at full
speed); the containers around the tensors are copied too, so that the training
loop may change its state as soon as the copy is done. :class:`BackgroundWriter`
then hands the copy to the caller's write function (a
:class:`~experiment_io.storage.writer.RunWriter`'s save) in a thread: writing,
fsync, digest and manifest happen exactly as in a synchronous save, only elsewhere.

The copy of the largest tensors can leave the training loop too. Parameters and
optimizer state change only in the optimizer step, so ``train_model`` passes them
as ``defer``: the background thread copies them while the loop computes the next
batch's forward and backward pass, and the loop waits (:meth:`BackgroundWriter.staged`)
only before its next optimizer step, if the copy is not done by then. Every
deferred tensor's version counter is checked after its copy: a tensor changed in
place meanwhile (a forward pass that writes a parameter) fails the save instead of
writing a checkpoint that is not a snapshot. This is the pipelining of CheckFreq
(Mohan et al., FAST 2021).

At most one save is in flight: a new save, and :meth:`BackgroundWriter.wait`, first
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
from typing import Any, Callable, Iterable, Optional

import torch

from experiment_io.errors import CheckpointWriteError, StagedStateModifiedError
from experiment_io.platform.threads import worker_thread

__all__ = ["StagingArea", "BackgroundWriter", "with_own_memory", "surfaced"]

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


def with_own_memory(obj: Any) -> Any:
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

    def __init__(self, *, pin_memory: Optional[bool] = None):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # (nbytes, pinned) -> buffers of the previous copy
        self._pool: defaultdict[tuple[int, bool], list[torch.UntypedStorage]] = defaultdict(list)
        self.allocated = 0  # buffers allocated so far (for tests and logs)
        self.deferred: list[list[Any]] = []  # what copy() left to copy_deferred()

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers of the latest copy."""
        return sum(key[0] * len(buffers) for key, buffers in self._pool.items())

    def buffers(self) -> list[torch.UntypedStorage]:
        """The buffers (``torch.UntypedStorage``) of the latest copy, in the order they were used."""
        return [b for buffers in self._pool.values() for b in buffers]

    def copy(self, obj: Any, *, defer: Iterable[torch.Tensor] = ()) -> Any:
        """A copy of ``obj`` (see ``_TreeCopy``) whose tensors live in this area's buffers.

        The buffers of the previous copy are reused for storages of the same size;
        those left over are released. Copies from a GPU are waited for before
        returning.

        :param defer: tensors whose storages (on the CPU) are not copied now: the
            result already refers to their buffers, and :meth:`copy_deferred` fills
            them. Until it has, the caller must not change those tensors.
        """
        self._available = {key: list(buffers) for key, buffers in self._pool.items()}
        self._used: defaultdict[tuple[int, bool], list[torch.UntypedStorage]] = defaultdict(list)
        self._devices: set[torch.device] = set()
        self._defer = {t.untyped_storage()._cdata for t in defer if t.device.type == "cpu"}
        self._deferred: dict[int, list[Any]] = {}  # storage -> [buffer, source, [(tensor, its version when staged)]]
        try:
            result = self(obj)
            for device in self._devices:
                torch.cuda.synchronize(device)
        finally:
            self._pool = self._used
            self.deferred = list(self._deferred.values())
            del self._available, self._used, self._devices, self._defer, self._deferred
        return result

    @property
    def deferred_nbytes(self) -> int:
        """Bytes that :meth:`copy_deferred` has to copy."""
        return sum(source.nbytes() for _, source, _ in self.deferred)

    def copy_deferred(self) -> None:
        """Copy the storages that :meth:`copy` deferred into their buffers (in any thread).

        :raises StagedStateModifiedError: when one of the deferred tensors was changed
            in place before its copy was complete; the copy is then not a snapshot.
        """
        deferred, self.deferred = self.deferred, []
        for buffer, source, versions in deferred:
            _as_bytes(buffer).copy_(_as_bytes(source))
            for tensor, version in versions:
                if tensor._version != version:
                    raise StagedStateModifiedError(
                        f"a tensor of shape {tuple(tensor.shape)} ({tensor.dtype}) was changed in place while the "
                        "checkpoint copied it in the background, before the next optimizer step; the checkpoint "
                        "was not written (the previous one is intact). Parameters and optimizer state may change "
                        "only in the optimizer step with async_save=True; use async_save='copy' for a model that "
                        "changes them elsewhere (e.g. in its forward pass)."
                    )

    def _copy_tensor(self, tensor):
        result = super()._copy_tensor(tensor)
        if result is not tensor and tensor.layout == torch.strided and tensor.device.type == "cpu":
            entry = self._deferred.get(tensor.untyped_storage()._cdata)
            if entry is not None:
                entry[2].append((tensor, tensor._version))
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
        if source._cdata in self._defer:
            self._deferred[source._cdata] = [buffer, source, []]
            return buffer
        buffer.copy_(source, non_blocking=pinned)
        if source.device.type == "cuda":
            self._devices.add(source.device)
        return buffer


def _as_bytes(storage):
    """The bytes of an ``UntypedStorage`` as a tensor (whose copies use every intra-op thread)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class BackgroundWriter:
    """Writes staged copies of state in a background thread, one save in flight at a time.

    :param staging: the :class:`StagingArea` (default: a new one).
    """

    def __init__(self, *, staging: Optional[StagingArea] = None):
        self.staging = staging if staging is not None else StagingArea()
        self._thread: Optional[threading.Thread] = None
        self._done = threading.Event()
        self._staged = threading.Event()
        self._error: Optional[BaseException] = None
        self._result: Any = None
        self._description = ""
        #: how many saves were started; :meth:`submit` returns the new count
        self.serial = 0
        #: seconds the latest :meth:`staged` waited, and seconds the latest background save took
        self.staged_wait_s = 0.0
        self.written_s = 0.0

    @property
    def in_flight(self) -> bool:
        """Whether a save has been started and not yet waited for."""
        return self._thread is not None

    def submit(self, obj: Any, write: Callable[[Any], Any], description: str, *,
               defer: Iterable[torch.Tensor] = ()) -> int:
        """Stage ``obj`` and run ``write(staged copy)`` in the background.

        Waits first for the previous save to commit.

        :param description: what is written, for logs and errors.
        :param defer: tensors of ``obj`` (on the CPU) that the background thread
            copies before it writes, instead of this call: the caller promises not to
            change them in place before :meth:`staged` has returned (``train_model``
            passes the parameters and the optimizer state, and calls :meth:`staged`
            before the next optimizer step). A change is detected by the tensors'
            version counters and fails the save.
        :return: the save's number (:attr:`serial`).
        :raises CheckpointWriteError: when the previous save failed (and then this
            one is not started).
        """
        started = time.perf_counter()
        self.wait()
        staged = self.staging.copy(obj, defer=defer)
        self._description = description
        self._error = self._result = None
        self._done.clear()
        self._staged.clear()
        self._thread = worker_thread(self._write, staged, write, name="experiment_io-save", daemon=False)
        self._thread.start()
        self.serial += 1
        log.debug("staged %s in %.3f s (%.0f MiB left to copy in the background); writing in the background",
                  description, time.perf_counter() - started, self.staging.deferred_nbytes / 2**20)
        return self.serial

    def _write(self, staged, write):
        started = time.perf_counter()
        try:
            self.staging.copy_deferred()
            self._staged.set()
            self._result = write(staged)
        except BaseException as e:  # handed to the training loop by staged() or wait()
            self._error = e  # before _staged is set: staged() sees a failed copy
            log.error("the background save of %s failed: %r", self._description, e)
        finally:
            self._staged.set()
            self.written_s = time.perf_counter() - started
            self._done.set()

    def _wait_for(self, event):
        """Wait for ``event``; a Ctrl-C meanwhile is held back and returned."""
        interrupted = None
        while not event.is_set():
            try:
                event.wait()
            except KeyboardInterrupt as e:
                interrupted = e
                log.warning("interrupted while %s is written in the background; waiting for it to commit",
                            self._description)
        return interrupted

    def staged(self) -> None:
        """Wait until the save in flight no longer needs the caller's tensors.

        Call it before changing a tensor passed as ``defer`` to :meth:`submit` (and at
        every step: it also raises the error of a save that failed meanwhile). It
        returns at once when nothing was deferred or nothing is in flight.

        :raises StagedStateModifiedError: when a deferred tensor changed before it
            was copied (the save is abandoned; the previous checkpoint is intact).
        :raises CheckpointWriteError: when the save in flight has already failed
            (as :meth:`wait` raises it).
        """
        self.staged_wait_s = 0.0
        if self._thread is None:
            return
        started = time.perf_counter()
        interrupted = self._wait_for(self._staged)
        self.staged_wait_s = time.perf_counter() - started
        if interrupted is not None:
            self.wait()
            raise interrupted
        if self._error is not None:  # the copy failed, or the write already has
            self.wait()

    def wait(self) -> Any:
        """Wait until the save in flight (if any) has committed.

        A Ctrl-C while waiting does not abandon the save: the wait goes on, and the
        :class:`KeyboardInterrupt` is raised once the save has ended.

        :return: what the save's write returned (``None`` when nothing was in flight).
        :raises CheckpointWriteError: when the background save failed with an
            :class:`OSError`; other exceptions of the save are raised as they are.
        """
        if self._thread is None:
            return None
        interrupted = self._wait_for(self._done)
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise surfaced(error, self._description)
        log.debug("background save of %s committed (%.3f s)", self._description, self.written_s)
        if interrupted is not None:
            raise interrupted
        return self._result



def surfaced(error: BaseException, what: str) -> BaseException:
    """The exception to raise in the training loop for ``error`` of a background save of ``what``.

    An :class:`OSError` becomes a :class:`~experiment_io.errors.CheckpointWriteError`
    (caused by it); other exceptions are raised as they are.
    """
    if isinstance(error, CheckpointWriteError) or not isinstance(error, OSError):
        return error
    converted = CheckpointWriteError(
        f"The background save of {what} failed: {error.strerror or error}. The previous checkpoint is intact; "
        "free disk space or fix the directory's permissions and restart from it."
    )
    converted.__cause__ = error
    return converted
