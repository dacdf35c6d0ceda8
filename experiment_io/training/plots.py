"""Training curves as PNG images (needs matplotlib: ``pip install 'experiment_io[plots]'``).

One image per metric: the metric over the epochs, every split that measured it
together (the training loss beside the validation stopping metric), the best epoch marked,
a logarithmic axis for values that are all positive (losses), and the learning
rate on a panel of its own below. ``train_model`` writes them into ``plots/`` of
the run directory when training ends (when matplotlib is installed);
``experiment-io plot DIR`` writes them on demand. matplotlib is imported only here,
with its non-interactive backend.
"""
import io
import logging
import math
import os
import re
from typing import TYPE_CHECKING, Union

from experiment_io.storage.atomic import atomic_write_bytes, make_directory

if TYPE_CHECKING:
    from experiment_io.experiment.metric_tracker import MetricTracker

__all__ = ["PLOTS_DIRECTORY", "plot_history", "plotting_available"]

log = logging.getLogger(__name__)

#: The subdirectory of a run directory that holds the images.
PLOTS_DIRECTORY = "plots"


def plotting_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _file_name(metric):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png"


def plot_history(tracker: "MetricTracker", directory: Union[str, os.PathLike], *, dpi: int = 100) -> list[str]:
    """Write one PNG per metric of ``tracker`` into ``directory`` (created if missing).

    :param tracker: a :class:`~experiment_io.MetricTracker`.
    :return: the paths written.
    :raises ImportError: without matplotlib, saying what to install.
    """
    try:
        # a Figure draws and saves without pyplot: matplotlib's backend (a notebook's inline one) is left alone
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'experiment_io[plots]' (or pip install "
                          "matplotlib)") from e
    make_directory(directory)
    epochs = list(tracker.epochs)
    metrics: dict[str, list[tuple[str, list[float]]]] = {}
    for split, values in tracker.history.items():
        for name, series in values.items():
            metrics.setdefault(name, []).append((split, series))
    # the training loss beside the stopping metric, when no validation metric shares its name
    stopping = tracker.history.get(tracker.stopping_split, {}).get(tracker.stopping_key)
    if "loss" in metrics and len(metrics["loss"]) == 1 and stopping is not None:
        metrics["loss"].append((f"{tracker.stopping_split} {tracker.stopping_key}", stopping))
    rates = tracker.learning_rates
    groups = max((len(r) for r in rates), default=0)
    written: list[str] = []
    for name, curves in metrics.items():
        figure = Figure(figsize=(7, 6 if groups else 4.5), dpi=dpi)
        axes = figure.add_subplot(2, 1, 1) if groups else figure.add_subplot(1, 1, 1)
        finite = [v for _, series in curves for v in series if not math.isnan(v)]
        for split, series in curves:
            axes.plot(epochs, series, marker="o", markersize=3, label=split)
        if finite and min(finite) > 0:
            axes.set_yscale("log")
        if tracker.best_epoch is not None:
            axes.axvline(tracker.best_epoch, color="grey", linestyle="--", linewidth=1,
                         label=f"best epoch {tracker.best_epoch}")
        axes.set_ylabel(name)
        axes.set_title(f"{name} per epoch" + (f" (stopping metric: {tracker.stopping_split} {tracker.stopping_key})"
                                              if name == tracker.stopping_key else ""))
        axes.legend()
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if groups:
            below = figure.add_subplot(2, 1, 2, sharex=axes)
            for group in range(groups):
                below.plot(epochs, [r[group] if group < len(r) else math.nan for r in rates], marker=".",
                           label=f"group {group}" if groups > 1 else "learning rate")
            below.set_ylabel("learning rate")
            below.set_yscale("log")
            below.grid(True, alpha=0.3)
            if groups > 1:
                below.legend()
            below.set_xlabel("epoch (from 0)")
        else:
            axes.set_xlabel("epoch (from 0)")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        path = os.path.join(directory, _file_name(name))
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    log.info("%d plot(s) written to %s", len(written), directory)
    return written
