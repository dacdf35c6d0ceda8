"""The curves of a block's ``train()`` calls, drawn on a matplotlib Figure (matplotlib's backend is left alone)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

from experiment_io.errors import SetupError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_results"]


def plot_results(results: Sequence[dict[str, Any]], title: str, path: "Optional[str | os.PathLike]" = None
                 ) -> "Figure":
    """Plot the loss and metrics of ``results`` (a block record's entries) over the lineage's epochs.

    :param path: also save the figure there (PNG, PDF... by its suffix).
    :raises SetupError: when matplotlib is not installed.
    """
    try:  # a Figure without pyplot: matplotlib's backend (a notebook's inline one) is left alone
        from matplotlib.figure import Figure
    except ImportError as e:
        raise SetupError("plot_metrics() needs matplotlib: pip install 'experiment_io[plots]'") from e
    series: dict[str, tuple[list, list]] = {}
    for entry in results:
        history = entry["result"]["history"]
        for name, values in history.items():
            if name in ("epoch", "lr"):
                continue
            series.setdefault(name, ([], []))
            series[name][0].extend(history["epoch"])
            series[name][1].extend(values)
    kinds = sorted({n.split("_", 1)[1] for n in series})
    figure = Figure(figsize=(6, 3 * max(len(kinds), 1)))
    axes = figure.subplots(len(kinds) or 1, 1, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        for split in ("train", "val"):
            if f"{split}_{kind}" in series:
                ax.plot(*series[f"{split}_{kind}"], label=split, marker=".")
        ax.set_ylabel(kind)
        ax.legend()
    axes[-1, 0].set_xlabel("epoch")
    figure.suptitle(title)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure
