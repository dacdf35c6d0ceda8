"""The run lock: one process writes a run directory at a time."""
import json
import logging
import os
import socket
import stat
import time
import weakref
from typing import Optional, Union

from experiment_io.errors import CheckpointWriteError, RunLockedError
from experiment_io.platform.threads import in_forked_children

__all__ = ["LOCK_NAME", "RunLock", "writer_now"]

log = logging.getLogger(__name__)

#: The lock file that marks the one process writing a run directory.
LOCK_NAME = "experiment_io.storage.lock"


class RunLock:
    """An advisory lock that admits one writing process per run directory.

    The lock is an ``flock`` on ``experiment_io.storage.lock``, so the kernel releases it when its
    holder dies, however it dies: a lock file left by a dead process is taken over
    without any guessing. The file records the holder's pid and host for the error
    that a second writer gets.

    A process forked while the lock is held (a DataLoader worker) does not keep it:
    the child closes its copy at once, so the lock goes when its holder dies, even if
    the child lives on. :meth:`check` tells whether the lock file is still the one
    locked: a lock file removed while held (a "stale lock" clean-up) would let a
    second process lock a new file; the holder then stops at its next save.

    On NFS v4 and Lustre (with ``flock`` mounted) the lock works across nodes; on
    file systems that ignore ``flock`` it does not protect, and nothing tells.

    :param directory: the run directory.
    """

    _held: "weakref.WeakSet[RunLock]" = weakref.WeakSet()  # the locks this process holds, closed in forked children

    def __init__(self, directory: Union[str, os.PathLike]):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: Optional[int] = None
        self._identity: Optional[tuple[int, int]] = None

    def check(self) -> None:
        """Make sure this process still holds the run's lock.

        :raises RunLockedError: when the lock file was removed or replaced while held:
            another process may be writing the run directory now.
        """
        if self._fd is None:
            return
        try:
            current = os.lstat(self.path)
            same = (current.st_dev, current.st_ino) == self._identity
        except OSError:
            same = False
        if not same:
            raise RunLockedError(
                f"the run lock {self.path} was removed or replaced while this process held it (a clean-up of "
                "'stale' locks?): another process may be training in this directory now, so this one stops "
                "before writing. Make sure one job trains there, then resume from the last checkpoint.")

    def acquire(self) -> "RunLock":
        """Take the lock.

        :raises RunLockedError: naming the pid and host of the live holder.
        """
        import fcntl  # POSIX only: imported here, so that prediction works where it is missing

        try:  # never through a symbolic link: a planted link would make the lock write into its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot open the run lock {self.path}: {e.strerror or e}"
                + (" (it is a symbolic link or a directory, which experiment_io never creates: remove it)"
                   if os.path.islink(self.path) or os.path.isdir(self.path) else "")
                + ". Fix the run directory, or train in another one.") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link would make the lock write into another file
            os.close(fd)
            raise CheckpointWriteError(f"the run lock {self.path} is not a regular file of its own (a directory, a "
                                       "device or a hard link to another file): remove it, or train in another "
                                       "directory.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = self._read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{os.path.dirname(self.path)} is being written by another process "
                f"(pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}). "
                "Wait for it to end, or stop it, before training in this directory; two writers would interleave "
                "their checkpoints."
            ) from e
        stale = self._read_holder(fd)
        if stale:
            log.info("taking over the lock of %s left by pid %s on %s, which no longer holds it",
                     self.path, stale.get("pid"), stale.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)
        in_forked_children(_forget_locks_in_child)
        RunLock._held.add(self)
        return self

    @staticmethod
    def _read_holder(fd):
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, OSError):
            return {}

    def release(self) -> None:
        """Give the lock back."""
        if self._fd is not None:
            import fcntl

            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            RunLock._held.discard(self)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def writer_now(directory: Union[str, os.PathLike]) -> str:
    """Who is training in ``directory`` now, in words (``""`` when nobody seems to be).

    Reads the lock file without locking it (a lock taken to look would make a starting
    writer fail): its holder counts as alive when it runs on this host and its pid
    exists, and as possibly alive on another host.
    """
    from experiment_io.storage.atomic import pid_alive
    from experiment_io.platform.files import NotARegularFile, open_regular

    try:
        fd, _ = open_regular(os.path.join(directory, LOCK_NAME))
    except (OSError, NotARegularFile):
        return ""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return ""
    finally:
        os.close(fd)
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return ""
    if holder.get("host") == socket.gethostname():
        if not pid_alive(holder["pid"]):
            return ""
        return f"pid {holder['pid']} on this host has been training there since {holder.get('since', '?')}"
    return (f"pid {holder['pid']} on host {holder.get('host', '?')} holds its lock (since {holder.get('since', '?')}) "
            "and may be training there")


def _forget_locks_in_child():
    """A forked child closes its copies of the parent's lock files: the lock stays the parent's alone."""
    for lock in list(RunLock._held):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    RunLock._held = weakref.WeakSet()
