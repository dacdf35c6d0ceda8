"""The manifest of a run directory: the one file whose rename commits a save.

The manifest (:data:`MANIFEST_NAME`) records, per file, its size and digest and what
it holds (its bytes are :mod:`experiment_io.format.codec`'s). It is always written
last: a save counts once its manifest is renamed into place.
"""
import os

from experiment_io.errors import CorruptCheckpointError
from experiment_io.format import codec as fmt
from experiment_io.platform.files import NotARegularFile, open_regular
from experiment_io.storage.atomic import atomic_write_bytes

__all__ = ["MANIFEST_NAME", "read_manifest", "write_manifest", "manifest_path", "manifest_identity"]

#: The manifest's file name inside a run directory.
MANIFEST_NAME = "experiment_manifest.json"


#: The largest manifest a reader reads (a run of hundreds of thousands of files).
MANIFEST_MAX_BYTES = 64 * 1024 * 1024


def read_manifest(directory):
    """Read the manifest of a run directory.

    :return: ``(header, files)``, or ``None`` when the directory has no manifest.
    """
    path = manifest_path(directory)
    try:
        fd, st = open_regular(path)
    except NotARegularFile as e:
        raise CorruptCheckpointError(f"{e}: a manifest is a regular file; the run directory was tampered with.") from e
    except FileNotFoundError:
        return None
    try:
        if st.st_size > MANIFEST_MAX_BYTES:
            raise CorruptCheckpointError(f"{path} holds {st.st_size} bytes, more than a manifest ever does "
                                         f"({MANIFEST_MAX_BYTES}); it is not read.")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MANIFEST_MAX_BYTES + 1)
    finally:
        os.close(fd)
    return fmt.manifest_from_bytes(data, path)


def write_manifest(directory, files, **fields):
    """Write the manifest of a run directory atomically (always the last write of a save)."""
    return atomic_write_bytes(manifest_path(directory), fmt.manifest_to_bytes(files, **fields))


def manifest_path(directory):
    """The path of the manifest of ``directory``."""
    return os.path.join(directory, MANIFEST_NAME)


def manifest_identity(directory):
    """What identifies the manifest file of ``directory`` now (``None`` when it has none).

    Two calls return the same value only if no one replaced the manifest between
    them (every write of it is a rename of a new file).
    """
    try:
        st = os.stat(manifest_path(directory))
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

