"""The one switch of the platform fast paths.

The fast paths are ways of doing what the portable code does, faster, on the
platforms that allow them: the archive writer (:mod:`experiment_io.platform.archive`:
the zip container of ``torch.save`` with a fast CRC-32), the memory residence of a
resume (:mod:`experiment_io.platform.residence`), maps made by direct ``mmap(2)``
calls (:mod:`experiment_io.platform.maps`) and write-back pacing
(:mod:`experiment_io.platform.writeback`). Each falls back to the portable way where
its platform support is missing.

Setting the environment variable ``EXPERIMENT_IO_FAST_PATHS=0`` (or ``off``,
``false``, ``no``) turns all of them off: files are written by ``torch.save``, read
by ``torch.load`` and digested through :class:`mmap.mmap` or ``read``, and no memory
is made ready ahead of a load. The files are the same either way (the format does
not depend on the switch). The variable is read at each use, so a test or a process
may change it at any time.
"""
import os

__all__ = ["ENVIRONMENT_VARIABLE", "enabled"]

#: The environment variable that turns the fast paths off.
ENVIRONMENT_VARIABLE = "EXPERIMENT_IO_FAST_PATHS"

_OFF = frozenset({"0", "off", "false", "no"})


def enabled() -> bool:
    """Whether the fast paths are on (the default): ``EXPERIMENT_IO_FAST_PATHS`` is unset or not one of ``0``,
    ``off``, ``false``, ``no``."""
    return os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() not in _OFF
