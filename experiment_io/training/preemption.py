"""Preemption: scheduler signals become "save, then stop", and the exit status a job script tests.

A batch scheduler ends a job with a signal (SIGTERM at the wall-clock limit,
SIGUSR1 when asked to warn ahead, SIGINT for Ctrl-C). :class:`Preemption` turns
those signals into a request that the training loop reads at the next batch
boundary; the loop then writes a checkpoint and stops with a :class:`Stop` that
says why. :meth:`Preemption.finish` decides what happens after the loop: exit with
:data:`PREEMPTED_EXIT_CODE` (so that the job script requeues the job), requeue the
job under SLURM, or return.
"""
from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import threading
import weakref
from dataclasses import dataclass
from typing import Iterable

from experiment_io.platform.threads import in_forked_children

__all__ = ["PREEMPTED_EXIT_CODE", "DEFAULT_SIGNALS", "StopKind", "Stop", "Preemption"]

log = logging.getLogger(__name__)

#: Exit status of a process that stopped on a preemption signal after saving its
#: checkpoint (``EX_TEMPFAIL``: "try again"); a job script requeues on it.
PREEMPTED_EXIT_CODE = 75

#: The signals that :func:`~experiment_io.train_model` turns into "save and stop" by default.
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopKind(enum.Enum):
    """Why a training loop ended."""

    #: every epoch up to ``max_epochs`` was trained
    MAX_EPOCHS = "max_epochs"
    #: the controller decided to stop (patience ran out)
    CONTROLLER = "controller"
    #: a signal asked for it; a checkpoint was written
    SIGNAL = "signal"


@dataclass(frozen=True)
class Stop:
    """Why training stopped, as a value.

    :ivar kind: a :class:`StopKind`.
    :ivar text: the reason in words (kept as the metric tracker's ``stop_reason``).
    :ivar signal: the signal's name, for :attr:`StopKind.SIGNAL`.
    """

    kind: StopKind
    text: str
    signal: str | None = None

    @classmethod
    def by_signal(cls, name: str) -> "Stop":
        """The stop caused by the signal named ``name`` (``"SIGTERM"``)."""
        return cls(StopKind.SIGNAL, f"interrupted by {name}", name)

    @property
    def preempted(self) -> bool:
        """Whether a scheduler signal (not Ctrl-C) ended training."""
        return self.kind is StopKind.SIGNAL and self.signal != "SIGINT"


class Preemption:
    """Signals of a run turned into a request to stop at the next batch boundary.

    Use it as a context manager around training: the handlers are installed on
    entry (in the main thread only) and the previous ones restored on exit. The
    handler only records the signal (:attr:`requested`). A second SIGINT raises
    :class:`KeyboardInterrupt` at once (the checkpoint files stay intact: every write
    is atomic); further scheduler signals are logged and ignored while the
    checkpoint is written.

    :param signals: the signals to handle (``()``: none).
    :param exit_on_preemption: :meth:`finish` exits with :data:`PREEMPTED_EXIT_CODE`
        after a signal other than SIGINT.
    :param requeue: :meth:`finish` asks SLURM to requeue the job after such a signal.
    """

    def __init__(self, signals: Iterable = DEFAULT_SIGNALS, *, exit_on_preemption: bool = True, requeue: bool = False):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.exit_on_preemption = exit_on_preemption
        self.requeue = requeue
        #: the name of the first signal received (``None`` while none was)
        self.requested: str | None = None
        self._previous: dict = {}
        self._ignore_sigterm = False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning("%s received while stopping after %s; the checkpoint is being written", name, self.requested)
            return
        self.request(name)

    def request(self, name: str) -> None:
        """Ask the loop to stop as if the signal ``name`` had arrived."""
        if self.requested is None:
            self.requested = name
            log.warning("%s received: training stops after the current batch, once the checkpoint is written", name)

    def adopt(self, name: str) -> None:
        """Stop for the signal ``name`` that the ranks agreed on (it replaces one this rank received)."""
        if self.requested != name:
            if self.requested is None:
                log.warning("%s received by another rank: training stops after the current batch", name)
            self.requested = name

    def exiting(self, stop: Stop, *, launched: bool) -> None:
        """Note, before the handlers are restored, how training stopped.

        One of several ranks under a launcher that will exit with
        :data:`PREEMPTED_EXIT_CODE` ignores SIGTERM from now on: the launcher sends it
        to the ranks still alive once one of them has exited, and it must not turn
        their status 75 into a death by signal.
        """
        self._ignore_sigterm = launched and stop.preempted and self.exit_on_preemption
    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
            in_forked_children(_default_signals_in_child)
            _active.add(self)
        elif self.signals:
            log.info("train_model runs outside the main thread: no signal handlers installed")
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_IGN if s == signal.SIGTERM and self._ignore_sigterm else handler)
        self._previous.clear()
        _active.discard(self)

    def finish(self, stop: Stop, *, requeuer: bool = True) -> None:
        """Act on how training stopped: requeue and exit after a scheduler signal, as configured.

        :param requeuer: this process may requeue the job (in a data-parallel run,
            only global rank 0 does).
        :raises SystemExit: with :data:`PREEMPTED_EXIT_CODE` after a preemption, when
            ``exit_on_preemption``.
        """
        if not stop.preempted:
            return
        if self.requeue and requeuer:
            requeue_under_slurm()
        if self.exit_on_preemption:
            log.warning("%s: checkpoint saved, exiting with status %d", stop.text, PREEMPTED_EXIT_CODE)
            raise SystemExit(PREEMPTED_EXIT_CODE)


_active: weakref.WeakSet[Preemption] = weakref.WeakSet()  # the Preemption contexts in force in this process


def _default_signals_in_child():
    """A forked child (a DataLoader worker) does not inherit "save and stop": its signals act as before."""
    for preemption in list(_active):
        for s, handler in preemption._previous.items():
            signal.signal(s, handler)
        preemption._previous.clear()
    _active.clear()


def requeue_under_slurm() -> None:
    """Ask SLURM to requeue this job (``scontrol requeue $SLURM_JOB_ID``); log what was done."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("requeue=True but not running under SLURM (no SLURM_JOB_ID): nothing requeued")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job, e)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s (restart count so far: %s)", job, os.environ.get("SLURM_RESTART_COUNT", "0"))
    else:
        log.error("scontrol requeue %s failed (exit %d): %s", job, result.returncode, result.stderr.strip())
