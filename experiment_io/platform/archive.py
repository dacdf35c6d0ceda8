"""``torch.save`` archives written with a fast CRC-32.

A ``torch.save`` file is a zip archive of stored (uncompressed) records: the pickle,
a few small records, and one record per tensor storage, each aligned to 64 bytes.
``torch.save`` computes the CRC-32 of every record at about 4 GB/s here, a quarter
of a second per GiB: more than the write of the bytes to the page cache. This
module writes the same archive with the CRC-32 of zlib-ng (about 20 GB/s), computed
for a large record on the side thread while the record is written, so that the
files stay standard zip archives (``torch.load``, ``zipfile`` and ``unzip -t``
read and check them) at the disk's speed.

The records come from torch's own serializer (``torch.serialization._save``), so
the pickle is exactly what ``torch.save`` writes; only the zip container is written
here. An object of few tensor bytes (under :data:`IN_MEMORY_BELOW`: a small model's
checkpoint) is written by ``torch.save`` itself into memory, then in one write: there
torch's C++ container costs less than records written from Python, and the file gets
one write instead of hundreds. Where that function is missing or does not take the expected arguments (another
torch release), :func:`save` is ``torch.save``.
"""

import functools
import hashlib
import inspect
import io
import logging
import os
import struct
import zipfile
import zlib
from typing import Any, Union

import torch
import torch.serialization

from experiment_io.errors import NotACheckpointError
from experiment_io.platform import switch
from experiment_io.platform.files import open_regular
from experiment_io.platform.threads import SIDE_DIGEST_BYTES, side_thread

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; zlib computes the same value, slower
    crc32 = zlib.crc32

log = logging.getLogger(__name__)

__all__ = ["save", "archive_directory", "IN_MEMORY_BELOW"]

#: What a record's data offset is a multiple of (``torch.load(mmap=True)`` maps storages in place), unless
#: torch's configuration says otherwise (``torch.utils.serialization.config.save.storage_alignment``).
ALIGNMENT = 64
#: Sizes and offsets at or above this are written in the zip64 extra field.
ZIP64_LIMIT = 0xFFFFFFFF
_MASKED = 0xFFFFFFFF  # a 32-bit field whose value is in the zip64 extra field

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_DESCRIPTOR = struct.Struct("<IIQQ")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_UTF8 = 0x0800  # names in UTF-8
_FLAGS = 0x0808  # names in UTF-8; sizes and CRC-32 in a data descriptor after the data
_VERSION_ZIP64 = 45

#: An object whose tensors hold fewer bytes than this is written by ``torch.save`` into memory, then in one write.
IN_MEMORY_BELOW = 1024 * 1024
_PLAIN = (str, int, float, bool, type(None), bytes)


def _few_tensor_bytes(obj, limit):
    """Whether ``obj`` is made of containers, plain values and tensors holding fewer than ``limit`` bytes."""
    total, stack = 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, _PLAIN):
            continue
        if isinstance(item, torch.Tensor):
            if item.layout != torch.strided:  # sparse, nested: torch's writer the usual way
                return False
            total += item.untyped_storage().nbytes() if item.device.type != "meta" else 0
            if total >= limit:
                return False
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            return False
    return True


@functools.lru_cache(maxsize=4)
def _torch_archive_layout(torch_save):
    """The archive's top folder and the content of its ``version`` record, as ``torch_save`` (torch's own
    ``torch.save``) writes them (``None`` when it writes something else: then :func:`save` is ``torch.save``).
    Remembered per function, so that a ``torch.save`` replaced for a while (a test's mock) decides nothing
    for the real one."""
    buffer = io.BytesIO()
    torch_save({}, buffer)
    buffer.seek(0)
    try:
        with zipfile.ZipFile(buffer) as archive:
            names = archive.namelist()
            top = names[0].split("/", 1)[0]
            if names[-2:] != [f"{top}/version", f"{top}/.data/serialization_id"]:
                return None
            return top, archive.read(f"{top}/version")
    except (zipfile.BadZipFile, KeyError, IndexError) as e:  # pragma: no cover - another torch release
        log.debug("torch.save writes an archive of another layout (%r); writing with torch.save", e)
        return None


@functools.lru_cache(maxsize=4)
def _usable_serializer(save):
    """``save`` (torch's ``torch.serialization._save``) when it takes the arguments this module passes."""
    if save is None:
        return None
    try:
        parameters = list(inspect.signature(save).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return None
    if parameters != ["obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"]:
        log.debug("torch.serialization._save takes %s; writing with torch.save", parameters)
        return None
    return save


def _storage_view(storage):
    """The bytes of a CPU storage, without a copy."""
    if storage.nbytes() == 0:
        return memoryview(b"")
    return memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy()).cast("B")


class _ZipWriter:
    """What ``torch.serialization._save`` writes its records to: a zip container on ``f``."""

    def __init__(self, f, top, alignment):
        self._f = f
        self._top = top
        self._alignment = alignment
        self._offset = 0
        self._entries = []  # (name bytes, crc, size, header offset)

    def _out(self, data):
        self._f.write(data)
        self._offset += len(data)

    def write_record(self, name, data, nbytes):
        """One stored record, laid out exactly as torch's writer (miniz) lays it out: torch computes the offsets of
        storages from that layout without reading the headers (``map_location="meta"``, ``calculate_storage_offsets``).
        """
        if isinstance(data, str):
            data = data.encode()
        view = data if isinstance(data, (bytes, bytearray)) else _storage_view(data)
        view = memoryview(view).cast("B")[:nbytes]
        full_name = f"{self._top}/{name}".encode()
        header_offset = self._offset
        large, far = nbytes >= ZIP64_LIMIT, header_offset >= ZIP64_LIMIT
        zip64_values = ([nbytes, nbytes] if large else []) + ([header_offset] if far else [])
        zip64 = (struct.pack(f"<HH{len(zip64_values)}Q", 0x0001, 8 * len(zip64_values), *zip64_values)
                 if zip64_values else b"")
        fixed = _LOCAL.size + len(full_name) + len(zip64)
        padding = -(header_offset + fixed + 4) % self._alignment
        extra = zip64 + struct.pack("<HH", 0x4246, padding) + b"Z" * padding  # "FB": torch's padding field
        flags = _FLAGS if nbytes else _UTF8  # an empty record has no data descriptor
        version = _VERSION_ZIP64 if zip64_values else 0
        size32 = _MASKED if large else 0
        self._out(_LOCAL.pack(0x04034B50, version, flags, 0, 0, 0, 0, size32, size32, len(full_name), len(extra)))
        self._out(full_name)
        self._out(extra)
        if nbytes >= SIDE_DIGEST_BYTES:  # checksummed on the second core while it is written
            checksum = side_thread().submit(crc32, view)
            self._out(view)
            crc = checksum.result()
        else:
            crc = crc32(view) if nbytes else 0
            self._out(view)
        if nbytes and zip64_values:
            self._out(_DESCRIPTOR.pack(0x08074B50, crc, nbytes, nbytes))
        elif nbytes:
            self._out(struct.pack("<IIII", 0x08074B50, crc, nbytes, nbytes))
        self._entries.append((full_name, crc, nbytes, header_offset, flags))

    def write_record_metadata(self, name, nbytes):  # pragma: no cover - torch calls it only under skip_data
        raise NotImplementedError("experiment_io writes every record's data")

    def write_end_of_file(self, version):
        self.write_record("version", version, len(version))
        # as torch's: 40 digits that depend on the records' sizes and CRC-32s only
        summary = hashlib.blake2b(b"".join(struct.pack("<QI", size, crc) for _, crc, size, _, _ in self._entries))
        serialization_id = f"{int.from_bytes(summary.digest()[:16], 'little') % 10 ** 40:040d}"
        self.write_record(".data/serialization_id", serialization_id, len(serialization_id))
        start = self._offset
        for name, crc, size, offset, flags in self._entries:
            values = []
            size32 = size
            if size >= ZIP64_LIMIT:
                values += [size, size]
                size32 = _MASKED
            offset32 = offset
            if offset >= ZIP64_LIMIT:
                values.append(offset)
                offset32 = _MASKED
            extra = struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values) if values else b""
            version = _VERSION_ZIP64 if values else 0
            self._out(_CENTRAL.pack(
                0x02014B50, version, version, flags, 0, 0, 0, crc, size32, size32,
                len(name), len(extra), 0, 0, 0, 0, offset32,
            ))
            self._out(name)
            self._out(extra)
        end = self._offset
        count, size = len(self._entries), end - start
        self._out(_ZIP64_END.pack(0x06064B50, _ZIP64_END.size - 12, _VERSION_ZIP64, _VERSION_ZIP64, 0, 0, count, count,
                                  size, start))
        self._out(_ZIP64_LOCATOR.pack(0x07064B50, 0, end, 1))
        self._out(_END.pack(0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), min(size, _MASKED),
                            min(start, _MASKED), 0))


def save(obj: Any, f: Any, pickle_module: Any = None) -> None:
    """Write ``obj`` to the binary file object ``f`` as ``torch.save(obj, f)`` does.

    The archive is written sequentially (no seeks). ``pickle_module`` is passed on as
    ``torch.save``'s. With the fast paths off (:mod:`experiment_io.platform.switch`) it is ``torch.save``.
    """
    pickle_module = pickle_module or torch.serialization.pickle
    if switch.enabled() and _few_tensor_bytes(obj, IN_MEMORY_BELOW):
        buffer = io.BytesIO()
        torch.save(obj, buffer, pickle_module=pickle_module)
        f.write(buffer.getbuffer())
        flush = getattr(f, "flush", None)
        if flush is not None:
            flush()
        return
    serializer: Any = _usable_serializer(getattr(torch.serialization, "_save", None)) if switch.enabled() else None
    layout = _torch_archive_layout(torch.serialization.save) if serializer is not None else None
    if layout is None:
        torch.save(obj, f, pickle_module=pickle_module)
        return
    top, version = layout
    alignment = torch.serialization._get_storage_alignment() if hasattr(
        torch.serialization, "_get_storage_alignment") else ALIGNMENT
    writer = _ZipWriter(f, top, alignment)
    serializer(obj, writer, pickle_module, torch.serialization.DEFAULT_PROTOCOL, False)
    writer.write_end_of_file(version)
    flush = getattr(f, "flush", None)
    if flush is not None:
        flush()



def archive_directory(path: Union[str, os.PathLike]) -> tuple[list[zipfile.ZipInfo], int]:
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

