"""The save policy: when the training loop writes a checkpoint, and which epoch files it keeps.

A :class:`SavePolicy` is a few small values. The loop asks it two questions:
:meth:`~SavePolicy.due` after every batch ("is a mid-epoch save due now?") and
:meth:`~SavePolicy.files` at the end of every epoch ("which files does this
save write?"). Every epoch ends with a save of ``last_checkpoint.pt`` whatever the
policy says; a preemption signal adds one at the batch where it arrives.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from experiment_io.errors import SetupError
from experiment_io.training.retention import Retention

__all__ = ["SavePolicy", "EpochFiles"]


@dataclass(frozen=True)
class EpochFiles:
    """Which files the save at the end of an epoch writes besides ``last_checkpoint.pt``.

    :ivar best: ``best_checkpoint.pt`` and ``best_model.pt``.
    :ivar keep: ``checkpoint_epoch_N.pt`` and ``model_epoch_N.pt`` for this epoch
        (with a retention: if the retention keeps it).
    :ivar retention: which epoch files are kept (``None``: all that are written).
    """

    best: bool
    keep: bool
    retention: Optional[Retention] = None


def _count(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return value


@dataclass
class SavePolicy:
    """When to save mid-epoch, and what to keep at the end of an epoch.

    :ivar every_batches: save every this many optimizer steps (0: never mid-epoch).
    :ivar every_seconds: save when this many seconds passed since the last save
        (``None``: never).
    :ivar keep_every_epochs: keep the epoch files every this many epochs (0: never).
    :ivar keep_better_epochs: keep the epoch files of every epoch that improved.
    :ivar keep_best: write ``best_checkpoint.pt`` and ``best_model.pt`` when the
        stopping metric improves.
    :ivar retention: which epoch files to keep (:class:`~experiment_io.training.retention.Retention`);
        with one, and neither ``keep_every_epochs`` nor ``keep_better_epochs``, every
        epoch's files are written if the retention keeps that epoch.
    """

    every_batches: int = 0
    every_seconds: float | None = None
    keep_every_epochs: int = 0
    keep_better_epochs: bool = False
    keep_best: bool = True
    retention: Optional[Retention] = None
    _last_save: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self):
        _count(self.every_batches, "checkpoint_every_batches")
        _count(self.keep_every_epochs, "store_every")
        if self.retention is not None and not isinstance(self.retention, Retention):
            raise SetupError(f"retention must be an experiment_io.Retention or None, not {self.retention!r}; "
                             "for example retention=Retention(last=3, best=2)")
        if self.every_seconds is not None and not (isinstance(self.every_seconds, (int, float))
                                                   and self.every_seconds > 0):
            raise ValueError(f"checkpoint_every_seconds must be positive or None, not {self.every_seconds!r}")

    def due(self, step: int, now: float | None = None) -> bool:
        """Whether a mid-epoch save is due after optimizer step ``step``."""
        if self.every_batches and step % self.every_batches == 0:
            return True
        now = time.monotonic() if now is None else now
        return self.every_seconds is not None and now - self._last_save >= self.every_seconds

    def saved(self, now: float | None = None) -> None:
        """Note that a save was just made (the clock of ``every_seconds`` starts again)."""
        self._last_save = time.monotonic() if now is None else now

    def files(self, epoch: int, better: bool) -> EpochFiles:
        """What the save at the end of the 0-based ``epoch`` writes."""
        keep = (bool(self.keep_every_epochs and (epoch + 1) % self.keep_every_epochs == 0)
                or (self.keep_better_epochs and better))
        if self.retention is not None and not (self.keep_every_epochs or self.keep_better_epochs):
            keep = True  # every epoch is a candidate; the retention decides
        return EpochFiles(best=better and self.keep_best, keep=keep, retention=self.retention)
