"""The library's worker threads: they never take the signals the main thread handles.

:func:`worker_thread` makes a thread that blocks the signals a job receives from
outside, so that they reach the main thread, where Python runs their handlers.
:func:`side_thread` is the one worker that digests (and checksums) large writes
while the writing thread writes them.
"""
import functools
import os
import queue
import signal
import threading
from typing import Any, Callable

__all__ = ["worker_thread", "side_thread", "on_every_core", "usable_cores", "SIDE_DIGEST_BYTES", "in_forked_children"]

#: Writes at least this large are digested on :func:`side_thread` while they are written.
SIDE_DIGEST_BYTES = 1024 * 1024


#: The signals a job receives from outside (a scheduler, a terminal): delivered to the main thread only, where
#: Python runs their handlers. Were one delivered to a worker thread, a main thread blocked in a system call
#: (``signal.pause()``, a ``wait``) would not wake up to handle it.
_OUTSIDE_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP",
                                                            "SIGQUIT", "SIGALRM") if hasattr(signal, name))


def worker_thread(target: Callable[..., Any], *args: Any, name: str, daemon: bool) -> threading.Thread:
    """A thread of this library: it never receives the signals that the main thread handles."""

    def run():
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, _OUTSIDE_SIGNALS)
        target(*args)

    return threading.Thread(target=run, name=name, daemon=daemon)


class _Task:
    """A call made on the side thread; :meth:`result` waits for it and returns (or raises) what it did."""

    def __init__(self, function, args):
        self._function, self._args = function, args
        self._done = threading.Event()
        self._value = self._error = None

    def run(self):
        try:
            self._value = self._function(*self._args)
        except BaseException as e:  # handed to the caller of result()
            self._error = e
        finally:
            self._done.set()

    def done(self):
        return self._done.is_set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _SideThread:
    """Daemon threads (one unless asked) that run calls in the order they were submitted.

    Not a ``ThreadPoolExecutor``: that refuses new work once the interpreter starts
    to shut down, while a background save may still be writing.
    """

    def __init__(self, threads=1, name="experiment_io-digest"):
        self._queue = queue.SimpleQueue()
        for i in range(threads):
            worker_thread(self._serve, name=f"{name}-{i}" if threads > 1 else name, daemon=True).start()

    def _serve(self):
        while True:
            self._queue.get().run()

    def submit(self, function, *args):
        task = _Task(function, args)
        self._queue.put(task)
        return task


_side = None
_side_lock = threading.Lock()


def side_thread() -> _SideThread:
    """The one worker thread that digests (and checksums) large writes while the writing thread writes them.

    xxh3 and CRC-32 release the GIL on large buffers, so on a second core they cost
    a save no time: the write to the page cache is the slower of the two.
    """
    global _side
    with _side_lock:
        if _side is None:
            in_forked_children(_forget_side_thread)
            _side = _SideThread()
        return _side


def _forget_side_thread():
    global _side, _side_lock, _cores, _cores_lock
    _side, _side_lock = None, threading.Lock()  # a forked child has no such thread
    _cores, _cores_lock = None, threading.Lock()


def usable_cores() -> int:
    """The number of cores this process may run on (its CPU affinity, where the system tells it)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


_cores = None
_cores_lock = threading.Lock()


def on_every_core(function: Callable[[Any], Any], items: Any) -> list[Any]:
    """``[function(item) for item in items]``, run by one thread per usable core (:func:`usable_cores`).

    For work that lets go of the GIL (digests of large buffers): the calling thread
    takes part, so a machine of one core runs it in the caller alone. The first error
    raised is raised here, once every call has ended.
    """
    items = list(items)
    helpers = min(usable_cores(), len(items)) - 1
    if helpers <= 0:
        return [function(item) for item in items]
    global _cores
    with _cores_lock:
        if _cores is None:
            in_forked_children(_forget_side_thread)
            _cores = _SideThread(usable_cores() - 1, name="experiment_io-parts")
        pool = _cores
    results: list[Any] = [None] * len(items)
    claimed = iter(range(len(items)))
    claim = threading.Lock()
    stop = threading.Event()

    def work():
        while not stop.is_set():
            with claim:
                index = next(claimed, None)
            if index is None:
                return
            results[index] = function(items[index])

    tasks = [pool.submit(work) for _ in range(helpers)]
    error = None
    try:
        work()
    except BaseException as e:  # the helpers are waited for before it goes on
        error = e
        stop.set()
    for task in tasks:
        while True:
            try:
                task.result()
            except BaseException as e:  # the helper's error, or an interrupt while waiting for it
                error = error or e
                stop.set()  # the helpers take no new item
                if not task.done():  # interrupted: the helper may still read memory the caller is about to free
                    continue
            break
    if error is not None:
        raise error
    return results



@functools.lru_cache(maxsize=None)
def in_forked_children(callback: Callable[[], None]) -> None:
    """Have ``callback`` run in the child of every later ``fork`` (once per callback, however often asked).

    The library's modules ask for it when they first make what a child must not inherit (a thread, a held lock,
    signal handlers), never at import.
    """
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=callback)

