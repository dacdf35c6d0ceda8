"""Parts: a large file's digest, part by part, verified on every core and where the file is read.

A :class:`~experiment_io.storage.hashing.HashingWriter` digests a file in consecutive
parts: each write of at least :data:`PART_AT_LEAST` bytes (the data of a large tensor)
makes parts of its own, at most :data:`PART_AT_MOST` bytes each, and the bytes between
such writes (zip headers, the pickle, small tensors) make the other parts, cut every
:data:`PART_AT_MOST` bytes. A file of more than one part has a manifest record with
``"parts": [[size, hex], ...]`` (their xxh3-128 digests, in file order) and a
``digest`` of that list (:func:`~experiment_io.format.codec.parts_digest`): two records describe the same
bytes exactly when their digests are equal. A file of one part keeps the digest of
its whole content, as every file had before parts.

What parts give a load:

- the parts are verified on every core at once (:func:`verify_parts`);
- a load that maps the file (``torch.load(mmap=True)``) verifies, before it reads
  anything, only the *frame*: every part that holds anything but a large tensor's data,
  and the zip directory's parts (:func:`split_frame`); the parts of tensor data are
  verified after torch has mapped them, through torch's own map
  (:func:`verify_in_memory`), so that their pages are faulted in once, by the
  verification, and not a second time when the tensors are first used;
- a load that hands over only some tensors (the model out of a full checkpoint)
  verifies only their parts.

Nothing is handed over before every byte of it has been verified.
"""
import ctypes
import mmap
import os
import re
import struct
import zipfile
from typing import Any, Iterable, Optional, Sequence

import torch
import xxhash

from experiment_io.platform.maps import libc, map_for_reading
from experiment_io.platform.threads import on_every_core

__all__ = ["PART_AT_LEAST", "PART_AT_MOST", "Part", "record_parts",
           "verify_parts", "storage_spans", "split_frame", "verify_in_memory"]

#: A write at least this large (a large tensor's data) makes parts of its own.
PART_AT_LEAST = 4 * 1024 * 1024
#: No part is larger than this (a large tensor's data is cut into parts of this size).
PART_AT_MOST = 32 * 1024 * 1024
#: A part: ``(offset in the file, size, xxh3-128 hex digest)``.
Part = tuple[int, int, str]

_DATA_RECORD = re.compile(r"^[^/]+/data/[0-9]+$")  # a tensor storage's record in a torch.save archive
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def record_parts(record: Any) -> Optional[list[Part]]:
    """The parts of a manifest record with their offsets; ``None`` for a record without parts.

    The manifest reader has checked that the parts add up to the record's size and match its digest
    (:func:`experiment_io.format.codec.manifest_from_bytes`).
    """
    listed = record.get("parts") if isinstance(record, dict) else None
    if listed is None:
        return None
    parts, offset = [], 0
    for size, digest in listed:
        parts.append((offset, size, digest))
        offset += size
    return parts


def _populate(address, size):
    functions = libc()
    if functions is not None and size:
        start = address - address % mmap.PAGESIZE
        functions.madvise(start, address + size - start, _MADV_POPULATE_READ)  # fails harmlessly before Linux 5.14


def _hex(data):
    return xxhash.xxh3_128(data).hexdigest()


def _hex_at(address, size):
    """The xxh3-128 of ``size`` bytes of this process's memory at ``address`` (faulted in by one call first)."""
    _populate(address, size)
    return xxhash.xxh3_128(memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")).hexdigest()


def verify_parts(fd: int, parts: Sequence[Part]) -> Optional[Part]:
    """Verify ``parts`` of the file open at ``fd`` (through a read-only map where it can be made), on every core.

    :return: the first part whose bytes do not match (or that the file is too short to hold), ``None`` when all do.
    """
    if not parts:
        return None
    size = os.fstat(fd).st_size
    if any(offset + length > size for offset, length, _ in parts):
        return next(part for part in parts if part[0] + part[1] > size)
    try:
        mapped = map_for_reading(fd, size)
    except (OSError, ValueError):  # a file system without mmap: read each part
        digests = on_every_core(lambda part: _hex(os.pread(fd, part[1], part[0])), parts)
    else:
        with mapped:  # each part faulted in by one call and let go after: the map never holds the whole file
            digests = on_every_core(lambda part: mapped.digest(part[0], part[1], _hex), parts)
    return next((part for part, digest in zip(parts, digests) if digest != part[2]), None)


def storage_spans(fd: int) -> Optional[tuple[list[tuple[int, int]], int]]:
    """Where the large tensors' data lie in the ``torch.save`` archive open at ``fd``.

    :return: ``(spans, directory_start)``: the ``(offset, size)`` of the data of every tensor record of at least
        :data:`PART_AT_LEAST` bytes, in file order, and the offset of the zip directory; ``None`` when the file is
        not an archive that can be read so (it is then verified whole before it is read).
    """
    try:
        with os.fdopen(os.dup(fd), "rb") as f, zipfile.ZipFile(f) as archive:
            start = archive.start_dir
            large = [(info.header_offset, info.file_size) for info in archive.infolist()
                     if info.file_size >= PART_AT_LEAST and _DATA_RECORD.match(info.filename)
                     and info.compress_type == zipfile.ZIP_STORED]
        spans = []
        for header_offset, size in large:  # the directory is not verified yet: any offset may be found here
            header = os.pread(fd, _LOCAL_HEADER.size, header_offset)
            if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                return None
            *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            spans.append((header_offset + _LOCAL_HEADER.size + name_length + extra_length, size))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, OverflowError, EOFError,
            NotImplementedError, struct.error):
        return None
    return sorted(spans), start


def split_frame(parts: Sequence[Part], spans: Sequence[tuple[int, int]],
                directory_start: int) -> tuple[list[Part], list[tuple[Part, int]]]:
    """Split ``parts`` into the frame (verified before the file is read) and the parts of tensor data.

    :return: ``(frame, data)``: ``data`` holds each part that lies wholly inside one span, with that span's index;
        every other part, and every part from the zip directory on (which says where the spans are), is the frame.
    """
    frame, data, index = [], [], 0
    for part in parts:
        offset, size, _ = part
        while index < len(spans) and spans[index][0] + spans[index][1] <= offset:
            index += 1
        inside = (index < len(spans) and spans[index][0] <= offset
                  and offset + size <= spans[index][0] + spans[index][1])
        if inside and offset + size <= directory_start:
            data.append((part, index))
        else:
            frame.append(part)
    return frame, data


def _storages(tensors):
    found = {}
    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.layout == torch.strided:  # sparse, nested: no storage of its own
            storage = tensor.untyped_storage()
            if storage.nbytes():
                found[storage.data_ptr()] = storage.nbytes()
    return found


def verify_in_memory(data: Sequence[tuple[Part, int]], spans: Sequence[tuple[int, int]], tensors: Iterable[Any],
                     wanted: Optional[Iterable[Any]] = None) -> tuple[Optional[Part], list[Part]]:
    """Verify the parts of tensor data through the memory of the loaded tensors (torch's map of the file).

    The large storages of ``tensors`` (every tensor of the loaded file) must be the file's spans, in order, at one
    constant distance from their offsets in the file (one map of the whole file, as ``torch.load(mmap=True)``
    makes); then each part is digested where it lies in memory. With ``wanted``, only the parts of those tensors'
    storages are verified; the caller hands over nothing else.

    :return: ``(mismatch, left)``: the first part that does not match (``None`` when all do), and the parts that
        could not be found in memory (to verify in the file).
    """
    storages = _storages(tensors)
    large = sorted((pointer, size) for pointer, size in storages.items() if size >= PART_AT_LEAST)
    distances = {pointer - offset for (pointer, _), (offset, _) in zip(large, spans)}
    in_memory = (len(large) == len(spans) and len(distances) == 1
                 and all(size == span[1] for (_, size), span in zip(large, spans)))
    if not in_memory:
        return None, [part for part, _ in data]
    distance = distances.pop()
    if wanted is not None:
        keep = {pointer - distance for pointer in _storages(wanted)}
        data = [(part, index) for part, index in data if spans[index][0] in keep]
    digests = on_every_core(lambda item: _hex_at(distance + item[0][0], item[0][1]), data)
    return next((part for (part, _), digest in zip(data, digests) if digest != part[2]), None), []
