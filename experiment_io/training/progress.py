"""What a user sees while ``train_model`` runs: a bar per epoch, a line per epoch, a summary.

Epochs are numbered from 0, as in the names of the files kept per epoch
(``model_epoch_2.pt`` holds the model after epoch 2, the third).

Every line goes to the log of ``experiment_io`` at INFO. While logging is not
configured (no handler anywhere on the logger's way to the root), the progress
display writes the lines to stderr as well, above the bar, so that a user who set
up nothing sees what training does; once logging is configured, the log is the
one place they go. A quiet report shows nothing: no bar (not even a disabled tqdm,
whose lock a forked process could inherit held), and the lines go to the log only.
"""
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Mapping, Union

if TYPE_CHECKING:
    from experiment_io.experiment.controllers import Controller
    from experiment_io.experiment.metric_tracker import MetricTracker
    from experiment_io.training.preemption import Stop

__all__ = ["Report", "logging_configured"]

log = logging.getLogger("experiment_io.training.loop")


def logging_configured() -> bool:
    """Whether records of experiment_io reach a handler someone configured (not Python's last resort)."""
    return log.hasHandlers()


class _NoProgress:
    """The progress bar of a quiet run: nothing."""

    def update(self, n):
        pass

    def close(self):
        pass


def _number(value):
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _duration(seconds):
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Report:
    """The progress display of one training run (on the rank that writes).

    :param quiet: show nothing; the lines go to the log only.
    """

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def bar(self, total: int, initial: int, description: str) -> Any:
        """A progress bar over one epoch's samples (an object with ``update(n)`` and ``close()``)."""
        if self.quiet:
            return _NoProgress()
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=description, unit="sample", leave=False, file=sys.stderr)

    def line(self, text: str) -> None:
        """Log ``text`` at INFO; while logging is not configured, show it on stderr too."""
        log.info("%s", text)
        if not self.quiet and not logging_configured():
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)

    def epoch(self, epoch: int, max_epochs: int, metrics: Mapping[str, Mapping[str, float]], tracker: "MetricTracker",
              better: bool, seconds: float) -> None:
        """The line of an epoch that ended: its losses, the stopping metric, whether it is the best so far."""
        valid = metrics.get(tracker.stopping_split, {})
        values = ", ".join(f"{name} {_number(value)}" for name, value in valid.items())
        best = "best so far" if better else f"best: epoch {tracker.best_epoch}"
        self.line(f"epoch {epoch} ({epoch + 1} of {max_epochs} done): train loss {_number(metrics['train']['loss'])}; "
                  f"{tracker.stopping_split} {values} ({best}); {_duration(seconds)}")

    def summary(self, stop: "Stop", controller: "Controller", tracker: "MetricTracker", seconds: float,
                directory: Union[str, os.PathLike]) -> None:
        """The line at the end of a run: why it stopped, the best epoch, where the files are."""
        if tracker.best_epoch is not None:
            best = (f"best epoch {tracker.best_epoch} "
                    f"({tracker.stopping_split} {tracker.stopping_key} {_number(tracker.best_value)})")
        else:
            best = "no epoch finished yet"
        self.line(f"training stopped: {stop.text}; {controller.current_epoch} of {controller.max_epochs} epochs done, "
                  f"{best}; {_duration(seconds)} in this process; run directory {directory}")
