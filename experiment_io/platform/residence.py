"""Reading a verified checkpoint into memory of the process's own, while the file is verified.

A resume needs the checkpoint's tensors in memory of its own: the model and the
optimizer write into them. New memory costs a page fault for every page the first
time it is written (the kernel zeroes it, and on a virtual machine the host may have
to back it first): on the machines measured in ``benchmarks/``, as long as reading
the file from the disk, or longer. A plain ``torch.load`` pays it while it reads;
a load that verifies the file first would pay it after the verification.

:class:`Destination` makes that memory resident *while* the state file is verified
(the digest reads the file on the other core). The verified file is then mapped
(``torch.load(mmap=True)``) and each storage copied into memory made ready for it
(:meth:`Destination.adopt`); the map's pages are let go behind the copy, so that the
load holds about the checkpoint's size, never the map and the copies of the whole
file at once. Nothing is unpickled before the file is verified.
"""
import collections
import ctypes
import logging
import mmap
import os
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from experiment_io.errors import NotACheckpointError
from experiment_io.platform.archive import archive_directory
from experiment_io.platform.maps import libc

__all__ = ["Destination", "CannotAdopt", "storage_sizes", "available_memory", "tensors_in"]

log = logging.getLogger(__name__)

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
#: ``MADV_POPULATE_WRITE`` (Linux 5.14): fault a range of memory in, writable, in one call.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class CannotAdopt(Exception):
    """A loaded payload holds a tensor whose storage cannot be moved out of the file's map."""


def storage_sizes(path: Union[str, os.PathLike]) -> list[int]:
    """The sizes of the tensor records of the ``torch.save`` archive at ``path`` (its zip directory only is read).

    The file is not verified yet: the sizes only decide how much memory to make ready. An archive that cannot be
    read, or whose records claim more bytes than the file holds, gives ``[]``.
    """
    try:
        records, size = archive_directory(path)  # not through a link, not waiting on a FIFO
    except NotACheckpointError:
        return []
    sizes = [record.file_size for record in records
             if "/data/" in record.filename and not record.filename.endswith("/")]
    return sizes if sum(sizes) <= size else []


def _page_range(address, nbytes):
    """The whole pages inside ``[address, address + nbytes)``: ``(start, length)``."""
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    end = (address + nbytes) // page * page
    return start, max(end - start, 0)


def _advise(address, nbytes, advice):
    """``madvise`` on the whole pages of a range (without the GIL); whether it was done."""
    c = libc()
    start, length = _page_range(address, nbytes)
    if not c or not length:
        return False
    return c.madvise(ctypes.c_void_p(start), length, advice) == 0


def available_memory() -> Optional[int]:
    """The memory the kernel says can be had without swapping (``MemAvailable``), in bytes; ``None`` when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _resident(nbytes):
    """A new storage of ``nbytes`` whose pages are all faulted in."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if not _advise(buffer.data_ptr(), nbytes, _MADV_POPULATE_WRITE):
        buffer.zero_()
    return buffer.untyped_storage()


class Destination:
    """Memory of the process's own for the storages of one state file, made resident ahead of the load.

    :param sizes: the byte sizes of the storages (:func:`storage_sizes`); a storage of another size gets new memory
        when it is adopted.
    """

    def __init__(self, sizes: Iterable[int]):
        self._sizes = list(sizes)
        self._ready: dict[int, list[torch.UntypedStorage]] = {}

    @classmethod
    def for_file(cls, *paths: Union[str, os.PathLike]) -> "Destination":
        """A destination for the storages of the first of ``paths`` whose archive directory can be read (the file
        the load will most likely take; a destination of nothing when none can)."""
        for path in paths:
            sizes = storage_sizes(path)
            if sizes:
                return cls(sizes)
        return cls([])

    @property
    def ready(self) -> dict[int, int]:
        """``{byte size: how many storages of that size are ready}``."""
        return {nbytes: len(storages) for nbytes, storages in self._ready.items() if storages}

    def fill(self, memory_at_hand: Optional[int] = None) -> None:
        """Allocate the memory and fault it in (``MADV_POPULATE_WRITE``, else by writing zeros). Runs on the
        caller's thread; the GIL is let go while the kernel works. Memory that cannot be had now is not made
        ready (the load allocates it as it copies, and says why if it cannot either).

        :param memory_at_hand: the bytes the process may take (default: :func:`available_memory`); nothing is
            made ready for storages of more than half of it.
        """
        sizes, self._sizes = self._sizes, []
        available = memory_at_hand if memory_at_hand is not None else available_memory()
        if available is not None and sum(sizes) > available // 2:
            # the file is not verified yet: a damaged or forged archive directory must not make the process
            # claim the machine's memory; a real checkpoint this large is loaded without it
            log.debug("memory for the checkpoint (%d bytes) not made ready ahead: %d bytes available", sum(sizes),
                      available)
            return
        try:
            for nbytes in sorted(sizes, reverse=True):
                if not nbytes:
                    continue
                self._ready.setdefault(nbytes, []).append(_resident(nbytes))
        except (RuntimeError, MemoryError) as e:  # out of memory: the load goes on without it
            self.release()
            log.debug("memory for the checkpoint was not made ready ahead: %s", e)
            return
        if self._ready:
            log.debug("made %d storages resident (%d bytes)", sum(map(len, self._ready.values())),
                      sum(n * len(s) for n, s in self._ready.items()))

    def release(self) -> None:
        """Let go of the memory made ready (before a load that does not use it)."""
        self._ready.clear()

    def _take(self, nbytes):
        ready = self._ready.get(nbytes)
        if ready:
            return ready.pop()
        return torch.empty(nbytes, dtype=torch.uint8).untyped_storage()

    def adopt(self, payload: Any) -> Any:
        """Move every CPU tensor of ``payload`` (a ``torch.load(mmap=True)`` result: dicts, lists and tuples of
        tensors) from the file's map into memory of its own, in place; tensors sharing a storage keep sharing one.
        The map's pages of each storage are let go once it is copied. Memory made ready and not used is freed.

        :return: ``payload``.
        :raises CannotAdopt: before anything is moved, when a tensor is not a plain strided one (sparse, nested,
            quantized): its storage cannot be re-pointed, so the caller reads the file instead of mapping it.
        """
        groups: dict[tuple[int, int], tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
        for tensor in tensors_in(payload):
            if tensor.layout != torch.strided or tensor.is_nested or tensor.is_quantized:
                raise CannotAdopt(f"a {tensor.layout} tensor (nested: {tensor.is_nested}, quantized: "
                                  f"{tensor.is_quantized}) cannot be moved out of the file's map")
            source = tensor.untyped_storage()
            if source.device.type != "cpu" or not source.nbytes():
                continue
            key = (source.data_ptr(), source.nbytes())
            groups.setdefault(key, (source, []))[1].append(tensor)
        needed = collections.Counter(nbytes for _, nbytes in groups)
        for nbytes, ready in self._ready.items():  # made for another file: let it go before anything is copied
            del ready[needed.get(nbytes, 0):]
        with torch.no_grad():
            for (address, nbytes), (source, tensors) in sorted(groups.items()):  # in file order
                storage = self._take(nbytes)
                storage.copy_(source)
                for tensor in tensors:
                    tensor.set_(storage, tensor.storage_offset(), tensor.size(), tensor.stride())
                _advise(address, nbytes, _MADV_DONTNEED)
        self._ready.clear()
        return payload


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj`` (dicts, lists, tuples), each once."""
    seen = set()
    stack = [obj]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not isinstance(obj, (torch.Tensor, dict, list, tuple)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        else:
            stack.extend(obj.values() if isinstance(obj, dict) else obj)
