"""Write-back pacing: ask the kernel to start writing a file's bytes while the next ones are produced.

On Linux, ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts the write-back of a range
without waiting, so that the fsync at the end of a large write waits only for its
tail. It changes nothing of what is durable when: files are still fsynced before they
are renamed into place.
"""
import ctypes
import logging
import sys

from experiment_io.platform import switch

__all__ = ["start_writeback"]

log = logging.getLogger(__name__)

def _load_sync_file_range():
    """libc's ``sync_file_range`` (Linux), or ``None`` where it is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages, do not wait



def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing back ``length`` bytes of ``fd`` from ``offset`` (no wait).

    Does nothing where ``sync_file_range`` is missing, or with the fast paths off
    (:mod:`experiment_io.platform.switch`); a file system that refuses it is not asked again.
    """
    global _sync_file_range
    if _sync_file_range is None or not switch.enabled():
        return
    if _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        log.debug("sync_file_range is not supported here (errno %d); relying on fsync alone", ctypes.get_errno())
        _sync_file_range = None
