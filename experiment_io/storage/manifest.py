"""The manifest of a run directory: the one file whose rename commits a save.

The manifest (:data:`MANIFEST_NAME`) records, per file, its size and digest and what
it holds (its bytes are :mod:`experiment_io.format.codec`'s). It is always written
last: a save counts once its manifest is renamed into place.
"""
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from experiment_io.errors import CorruptCheckpointError
from experiment_io.format import codec as fmt
from experiment_io.platform.files import NotARegularFile
from experiment_io.storage.interface import RunStorage, as_storage

if TYPE_CHECKING:
    from experiment_io.storage.verification import FileRecord

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAME", "PREVIOUS_MANIFEST_NAME", "read_manifest", "write_manifest", "manifest_path",
           "manifest_identity"]

#: The manifest's file name inside a run directory.
MANIFEST_NAME = "experiment_manifest.json"
#: The manifest a save made durable behind the loop replaced (read when a power loss took the newer one).
PREVIOUS_MANIFEST_NAME = "experiment_manifest.prev.json"
#: The largest manifest a reader reads (a run of hundreds of thousands of files).
MANIFEST_MAX_BYTES = 64 * 1024 * 1024


def read_manifest(where: Union[RunStorage, str, os.PathLike]) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """Read the manifest of a run.

    :param where: a :class:`~experiment_io.storage.interface.RunStorage`, or a run directory.
    :return: ``(header, files)``, or ``None`` when the run has no manifest.
    """
    storage = as_storage(where)
    data = _manifest_bytes(storage, MANIFEST_NAME)
    if data is None or not _is_whole(data):
        # no manifest, or a torn one (a power loss before a save made it durable): the one it replaced
        previous = _manifest_bytes(storage, PREVIOUS_MANIFEST_NAME)
        if previous is not None:
            log.warning("%s is %s; reading %s, the manifest of the save before (a power loss or a crash of the "
                        "machine lost the newest save)", storage.path(MANIFEST_NAME),
                        "missing" if data is None else "torn", PREVIOUS_MANIFEST_NAME)
            return fmt.manifest_from_bytes(previous, storage.path(PREVIOUS_MANIFEST_NAME))
    if data is None:
        return None
    return fmt.manifest_from_bytes(data, storage.path(MANIFEST_NAME))


def _is_whole(data):
    """Whether ``data`` is a whole JSON document (not empty, not cut, not zeros as a lost write leaves)."""
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


def _manifest_bytes(storage, name):
    path = storage.path(name)
    try:
        fd, st = storage.open(name)
    except NotARegularFile as e:
        raise CorruptCheckpointError(f"{e}: a manifest is a regular file; the run directory was tampered with.") from e
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if st.st_size > MANIFEST_MAX_BYTES:
            raise CorruptCheckpointError(f"{path} holds {st.st_size} bytes, more than a manifest ever does "
                                         f"({MANIFEST_MAX_BYTES}); it is not read.")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MANIFEST_MAX_BYTES + 1)
    finally:
        os.close(fd)
    return data


def write_manifest(where: Union[RunStorage, str, os.PathLike], files: Mapping[str, Mapping[str, Any]],
                   **fields: Any) -> "FileRecord":
    """Write the manifest of a run atomically and durably (always the last write of a save).

    :param where: a :class:`~experiment_io.storage.interface.RunStorage`, or a run directory.
    :return: the manifest's :class:`~experiment_io.storage.verification.FileRecord`.
    """
    data = fmt.manifest_to_bytes(files, **fields)
    return as_storage(where).write_file(MANIFEST_NAME, lambda f: f.write(data))


def manifest_path(where: Union[RunStorage, str, os.PathLike]) -> str:
    """The path of the manifest of a run (a storage or a directory)."""
    return as_storage(where).path(MANIFEST_NAME)


def manifest_identity(where: Union[RunStorage, str, os.PathLike]) -> Optional[tuple]:
    """What identifies the manifest file of a run now (``None`` when it has none).

    Two calls return the same value only if no one replaced the manifest between
    them (every write of it is a rename of a new file).
    """
    found = as_storage(where).stat(MANIFEST_NAME)
    return None if found is None else found.identity
