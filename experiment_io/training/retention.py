"""Retention: which epoch files a run keeps, within a disk quota.

An epoch's files are ``checkpoint_epoch_N.pt`` and ``model_epoch_N.pt``. A
:class:`Retention` keeps the epochs that any of its rules keeps:

- ``last=N``: the N newest epochs;
- ``best=K``: the K best epochs by the stopping metric (ties: the earlier epoch);
- ``every=P``: every P-th epoch (epochs P-1, 2P-1, ... counted from 0), for ever.

With a retention, ``train_model`` writes an epoch's files when the retention keeps
that epoch at its end (besides those ``store_every`` and ``store_all_better`` ask
for), and removes the files of every epoch it no longer keeps. A removal is
committed like a save: the files' manifest records are first marked as retired in
the manifest that commits the new save, then the files are unlinked, then the
records go. A crash at any instant leaves every file of the run recorded, and no
record a loader would use without its file (loaders ignore retired records).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from experiment_io.errors import SetupError

__all__ = ["Retention", "epoch_of"]

_EPOCH_FILE = re.compile(r"^(?:checkpoint|model)_epoch_(\d+)(?:\.prev)?\.pt$")


def epoch_of(name: str) -> Optional[int]:
    """The epoch of an epoch file's name (either generation), or ``None`` for another file."""
    match = _EPOCH_FILE.match(name)
    return int(match.group(1)) if match else None


def _positive(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SetupError(f"Retention({name}=...) must be a positive integer or None, not {value!r}")
    return value


@dataclass(frozen=True)
class Retention:
    """Which epoch files to keep; the rules combine (an epoch any rule keeps is kept).

    :ivar last: keep the files of the ``last`` newest epochs.
    :ivar best: keep the files of the ``best`` best epochs by the stopping metric.
    :ivar every: keep the files of every ``every``-th epoch for ever.

    ``Retention()`` (no rule) keeps nothing: every epoch file is removed.
    """

    last: Optional[int] = None
    best: Optional[int] = None
    every: Optional[int] = None

    def __post_init__(self):
        for name in ("last", "best", "every"):
            _positive(getattr(self, name), name)

    def reasons(self, epochs: Iterable[int], values: Mapping[int, float], larger_is_better: bool = False) -> dict:
        """Why each kept epoch is kept.

        :param epochs: the epochs (0-based) that have files.
        :param values: the stopping metric of each epoch (an epoch without one is never among the best).
        :return: ``{epoch: ["last 3", "best 2", "every 10"]}`` for the kept epochs only.
        """
        epochs = sorted(set(epochs))
        kept: dict[int, list[str]] = {}
        if self.last:
            for epoch in epochs[-self.last:]:
                kept.setdefault(epoch, []).append(f"last {self.last}")
        if self.best:
            scored = [e for e in epochs if isinstance(values.get(e), (int, float)) and math.isfinite(values[e])]
            ranked = sorted(scored, key=lambda e: (-values[e] if larger_is_better else values[e], e))
            for epoch in ranked[:self.best]:
                kept.setdefault(epoch, []).append(f"best {self.best}")
        if self.every:
            for epoch in epochs:
                if (epoch + 1) % self.every == 0:
                    kept.setdefault(epoch, []).append(f"every {self.every}")
        return {epoch: kept[epoch] for epoch in sorted(kept)}

    def keeps(self, epoch: int, epochs: Iterable[int], values: Mapping[int, float],
              larger_is_better: bool = False) -> bool:
        """Whether ``epoch`` is kept among ``epochs`` (it included)."""
        return epoch in self.reasons(set(epochs) | {epoch}, values, larger_is_better)
