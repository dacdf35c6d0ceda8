"""Write-back pacing: ask the kernel to start writing a file's bytes while the next ones are produced.

On Linux, ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts the write-back of a range
without waiting, so that the fsync at the end of a large write waits only for its
tail. It changes nothing of what is durable when: files are still fsynced before they
are renamed into place.
"""
import ctypes
import functools
import logging
import sys
from typing import Callable, Optional, cast

from experiment_io.platform import switch

__all__ = ["Writeback", "sync_file_range"]

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    """libc's ``sync_file_range`` (Linux), or ``None`` where it is not available (looked up at the first call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages, do not wait


class Writeback:
    """The write-back pacing of one file being written.

    :meth:`start` asks the kernel to start writing back a range; it does nothing where
    ``sync_file_range`` is missing, or with the fast paths off
    (:mod:`experiment_io.platform.switch`), and once the file's file system has refused
    it, the file's later ranges are not asked for.

    :param function: the ``sync_file_range(fd, offset, length, flags) -> int`` to call (default:
        :func:`sync_file_range`'s; ``None``: none).
    """

    def __init__(self, function: Optional[Callable[[int, int, int, int], int]] | str = "libc"):
        if not switch.enabled():
            function = None
        elif function == "libc":
            function = sync_file_range()
        self.function = cast(Optional[Callable[[int, int, int, int], int]], function)

    def start(self, fd: int, offset: int, length: int) -> None:
        """Ask the kernel to start writing back ``length`` bytes of ``fd`` from ``offset`` (no wait)."""
        if self.function is None:
            return
        if self.function(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
            log.debug("sync_file_range is not supported here (errno %d); relying on fsync alone", ctypes.get_errno())
            self.function = None
