"""Opening a file for reading only when it is a regular file: no link followed, no FIFO waited on."""
import errno
import os
import stat
from typing import Optional, Union

__all__ = ["open_regular", "NotARegularFile", "descriptor_path"]

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class NotARegularFile(OSError):
    """A path names a symbolic link, a FIFO, a device or a directory: not a file this library reads."""


def open_regular(path: Union[str, os.PathLike]) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading if it is a regular file, without following a symbolic link
    and without blocking on a FIFO.

    :return: ``(fd, stat)``.
    :raises FileNotFoundError: when it is missing; :class:`NotARegularFile` when it
        is anything but a regular file.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:  # a link (ELOOP), a directory, a device: not a regular file; other errors are what they are
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR, errno.EMLINK):
            raise NotARegularFile(f"{path} is not a regular file ({e.strerror or e})") from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotARegularFile(f"{path} is not a regular file")
    return fd, st


def descriptor_path(fd: int) -> Optional[str]:
    """A path that opens the file of descriptor ``fd`` (Linux's ``/proc/self/fd``), or ``None`` elsewhere."""
    path = f"/proc/self/fd/{fd}"
    return path if os.path.exists(path) else None

