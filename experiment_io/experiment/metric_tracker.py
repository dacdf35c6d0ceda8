"""The metric tracker: what every epoch measured, and which epoch was best.

Its state is plain data (numbers, strings, lists, dicts and tensors), never a
pickled object, so it loads with ``torch.load(weights_only=True)``.

The per-epoch history can be kept out of the state (:meth:`~experiment_io.MetricTracker.state_dict`
with ``history=``): the state then says which rows of the history's CSV text
(:meth:`~experiment_io.MetricTracker.csv_rows`, one row per epoch, each float written exactly) it
goes with, and the tracker is rebuilt from the state and that text
(:meth:`~experiment_io.MetricTracker.from_state_dict`). A checkpoint written at every epoch then
costs the same at epoch 10,000 as at epoch 10.
"""
import bisect
import csv
import io
import logging
import math
import os
from typing import Any, Iterable, Mapping, Optional, Union, cast

import numpy as np
import torch

from experiment_io.storage.atomic import atomic_write

__all__ = ["MetricTracker"]

log = logging.getLogger(__name__)


def _number(value):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def _value(cell):
    """The float :func:`_number` wrote (NaN for an empty cell)."""
    return float(cell) if cell else math.nan


class MetricTracker:
    """Per-epoch metric history, best values, best epoch, best model state and epoch times.

    :param stopping_key: the metric that decides which model is best.
    :param stopping_split: the split the stopping metric is read from.
    :param larger_is_better: whether a larger stopping metric is better.
    """

    def __init__(self, stopping_key: str, *, stopping_split: str = "valid", larger_is_better: bool = False):
        self.stopping_key = stopping_key
        self.stopping_split = stopping_split
        self.larger_is_better = larger_is_better
        self.epochs: list[int] = []
        self.history: dict[str, dict[str, list[float]]] = {}
        self.epoch_times: list[float] = []
        #: the learning rate of every parameter group during each epoch
        self.learning_rates: list[list[float]] = []
        self.best_epoch: Optional[int] = None
        self.best_metric_values: Optional[dict[str, dict[str, float]]] = None
        self.best_model_state: Optional[dict[str, torch.Tensor]] = None
        self.stop_reason: Optional[str] = None
        #: results of :func:`~experiment_io.test_model`, ``{when: {split: {name: value}}}``
        self.evaluations: dict[str, dict] = {}
        #: whether each epoch's stopping metric beat every earlier epoch's
        self.improved: list[bool] = []
        self._lr_groups = 0

    @property
    def best_value(self) -> Optional[float]:
        """The best value of the stopping metric so far (``None`` before the first epoch)."""
        if self.best_metric_values is None:
            return None
        return self.best_metric_values[self.stopping_split][self.stopping_key]

    def stopping_values(self, epochs: Optional[Iterable[int]] = None) -> dict:
        """The stopping metric of every recorded epoch, or of ``epochs`` only: ``{epoch: value}``.

        :param epochs: the epochs wanted (an epoch not recorded is left out). The cost is then that of those
            epochs, not of the whole history: a retention asks for the few epochs it keeps at every epoch.
        """
        series = self.history.get(self.stopping_split, {}).get(self.stopping_key, [])
        if epochs is None:
            return dict(zip(self.epochs, series))
        wanted, found = set(epochs), {}
        for epoch in wanted:
            row = bisect.bisect_left(self.epochs, epoch)  # epochs are recorded in increasing order
            if row < len(self.epochs) and self.epochs[row] == epoch and row < len(series):
                found[epoch] = series[row]
            elif epoch in self.epochs:  # not in order (a tracker built by hand): the slow way
                return {e: v for e, v in zip(self.epochs, series) if e in wanted}
        return found

    def stopping_value(self, metric_info: dict) -> float:
        """Read the stopping metric from ``{split: {name: value}}``.

        :raises KeyError: naming the split and metrics available.
        """
        try:
            return float(metric_info[self.stopping_split][self.stopping_key])
        except KeyError as e:
            available = {split: sorted(values) for split, values in metric_info.items()}
            raise KeyError(
                f"stopping metric {self.stopping_key!r} of split {self.stopping_split!r} was not measured; "
                f"measured: {available}"
            ) from e

    def is_better(self, value: float) -> bool:
        """Whether ``value`` of the stopping metric beats the best so far (NaN never does)."""
        if math.isnan(value):
            return False
        best = self.best_value
        if best is None:
            return True
        return value > best if self.larger_is_better else value < best

    def register_metrics(self, metric_info: dict, when: int, *, epoch_time: Optional[float] = None,
                         learning_rates: Optional[Iterable[float]] = None) -> bool:
        """Record the metrics of epoch ``when``.

        :param metric_info: ``{split: {name: value}}``.
        :param when: the epoch number.
        :param epoch_time: seconds the epoch took.
        :param learning_rates: the learning rate of each parameter group during the epoch.
        :return: whether this epoch is the best so far.
        """
        value = self.stopping_value(metric_info)
        n_before = len(self.epochs)
        for split, values in metric_info.items():
            for name, v in values.items():
                series = self.history.setdefault(split, {}).setdefault(name, [math.nan] * n_before)
                series.append(float(v))
        for split in self.history.values():
            for series in split.values():
                if len(series) == n_before:
                    series.append(math.nan)
        self.epochs.append(int(when))
        self.epoch_times.append(float(epoch_time) if epoch_time is not None else math.nan)
        self.learning_rates.append([float(lr) for lr in learning_rates] if learning_rates is not None else [])
        self._lr_groups = max(self._lr_groups, len(self.learning_rates[-1]))
        better = self.is_better(value)
        self.improved.append(better)
        if better:
            self.best_epoch = int(when)
            self.best_metric_values = {s: {k: float(v) for k, v in vals.items()} for s, vals in metric_info.items()}
        return better

    def record_best_model(self, model: torch.nn.Module) -> None:
        """Keep a CPU copy of ``model``'s state as the best model state."""
        self.best_model_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def state_dict(self, history: Optional[Mapping[str, Any]] = None) -> dict:
        """Plain-data state of the tracker.

        :param history: where the per-epoch history is kept instead of in the state:
            ``{"file": name, "size": bytes, "digest": digest}`` of the CSV text of :meth:`to_csv` as far as this
            state goes; the state records it with the rows and columns that text holds.
        """
        state: dict[str, Any] = {
            "stopping_key": self.stopping_key,
            "stopping_split": self.stopping_split,
            "larger_is_better": self.larger_is_better,
        }
        if history is None:
            state.update({
                "epochs": list(self.epochs),
                "history": {s: {k: list(v) for k, v in vals.items()} for s, vals in self.history.items()},
                "epoch_times": list(self.epoch_times),
                "learning_rates": [list(lrs) for lrs in self.learning_rates],
            })
        else:
            state["history_file"] = {**history, "rows": len(self.epochs), "columns": [list(c) for c in self.columns()],
                                     "lr_groups": self._lr_groups}
        state.update({
            "best_epoch": self.best_epoch,
            "best_metric_values": self.best_metric_values,
            "best_model_state": self.best_model_state,
            "stop_reason": self.stop_reason,
            "evaluations": self.evaluations,
        })
        return state

    @staticmethod
    def history_file(state: Mapping[str, Any]) -> Optional[dict]:
        """Where a state's history is kept (``{"file", "size", "digest", ...}``), or ``None`` when it holds it."""
        found = state.get("history_file")
        return dict(found) if isinstance(found, Mapping) else None

    def load_state_dict(self, state: dict, history_text: Optional[str] = None) -> None:
        """Restore what :meth:`state_dict` returned.

        :param history_text: for a state whose history is kept in a file (:meth:`history_file`), that file's
            text as far as the state goes.
        :raises ValueError: when the state keeps its history in a file and the text is missing or does not hold
            the rows and columns the state records.
        """
        self.stopping_key = state["stopping_key"]
        self.stopping_split = state["stopping_split"]
        self.larger_is_better = state["larger_is_better"]
        kept = self.history_file(state)
        if kept is not None:
            if history_text is None:
                raise ValueError(f"the tracker's history is kept in {kept.get('file')}, whose text was not given")
            self._read_rows(history_text, kept)
        else:
            self.epochs = list(state["epochs"])
            self.history = {s: {k: list(v) for k, v in vals.items()} for s, vals in state["history"].items()}
            self.epoch_times = list(state["epoch_times"])
            # written before learning rates were recorded: none known for those epochs
            self.learning_rates = [list(lrs) for lrs in state.get("learning_rates", [[] for _ in self.epochs])]
            self.improved = self._improvements()
        self._lr_groups = max((len(lrs) for lrs in self.learning_rates), default=0)
        self.best_epoch = state["best_epoch"]
        self.best_metric_values = state["best_metric_values"]
        self.best_model_state = state["best_model_state"]
        self.stop_reason = state["stop_reason"]
        self.evaluations = state.get("evaluations", {})

    @classmethod
    def from_state_dict(cls, state: dict, history_text: Optional[str] = None) -> "MetricTracker":
        """Build a tracker from :meth:`state_dict`'s output (and, see :meth:`load_state_dict`, its history's text)."""
        tracker = cls(state["stopping_key"])
        tracker.load_state_dict(state, history_text)
        return tracker

    def _improvements(self):
        """Whether each recorded epoch beat every earlier one (for a state written before they were recorded)."""
        improved, best = [], None
        for value in self.history.get(self.stopping_split, {}).get(self.stopping_key, [math.nan] * len(self.epochs)):
            better = not math.isnan(value) and (best is None or (value > best if self.larger_is_better else
                                                                 value < best))
            improved.append(better)
            best = value if better else best
        return improved

    def _read_rows(self, text, kept):
        """The per-epoch history from the CSV ``text`` of :meth:`to_csv`, as the state ``kept`` describes it."""
        columns = [tuple(c) for c in kept["columns"]]
        groups = int(kept["lr_groups"])
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or rows[0] != self._header(columns, groups) or len(rows) - 1 != kept["rows"]:
            raise ValueError(f"the history text does not hold the {kept['rows']} rows of columns {columns} that the "
                             "checkpoint was saved with")
        self.epochs, self.epoch_times, self.learning_rates, self.improved = [], [], [], []
        self.history = {}
        for split, name in columns:
            self.history.setdefault(split, {})[name] = []
        for row in rows[1:]:
            self.epochs.append(int(row[0]))
            self.epoch_times.append(_value(row[1]))
            rates = row[2:2 + groups]
            self.learning_rates.append([_value(r) for r in rates] if any(rates) else [])
            for (split, name), cell in zip(columns, row[2 + groups:-1]):
                self.history[split][name].append(_value(cell))
            self.improved.append(row[-1] == "1")

    def to_hdf5(self, path: Union[str, os.PathLike]) -> None:
        """Export the history to an HDF5 file, written atomically.

        Layout: ``/epochs``, ``/epoch_times`` and ``/<split>/<metric>`` datasets (one
        value per epoch); the best epoch and stopping metric as root attributes.
        """

        import h5py  # only for this export: loading a checkpoint never needs HDF5

        def write(f):
            with h5py.File(f, "w") as h5:
                h5.create_dataset("epochs", data=np.asarray(self.epochs, dtype=np.int64))
                h5.create_dataset("epoch_times", data=np.asarray(self.epoch_times, dtype=np.float64))
                for split, values in self.history.items():
                    group = h5.create_group(split)
                    for name, series in values.items():
                        group.create_dataset(name, data=np.asarray(series, dtype=np.float64))
                h5.attrs["stopping_key"] = self.stopping_key
                h5.attrs["stopping_split"] = self.stopping_split
                h5.attrs["best_epoch"] = -1 if self.best_epoch is None else self.best_epoch

        atomic_write(path, write, hashed=False)
        log.info("metric history of %d epochs written to %s", len(self.epochs), path)

    def columns(self) -> list:
        """The ``(split, metric)`` pairs of the history, in the order they were first measured."""
        return [(split, name) for split, values in self.history.items() for name in values]

    @staticmethod
    def _header(columns, groups):
        lr_names = ["lr"] if groups == 1 else [f"lr_{i}" for i in range(groups)]
        return ["epoch", "time_s", *lr_names, *(f"{s}_{n}" for s, n in columns), "improved"]

    def csv_header(self) -> str:
        """The header line of :meth:`to_csv` (it changes only when a metric or a parameter group appears)."""
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(self._header(self.columns(), self._lr_groups))
        return out.getvalue()

    def csv_rows(self, start: int = 0) -> str:
        """The rows of :meth:`to_csv` of the epochs recorded from the ``start``-th on."""
        groups, columns = self._lr_groups, self.columns()
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")  # quotes a metric name that holds a comma
        for row in range(start, len(self.epochs)):
            lrs = self.learning_rates[row] if row < len(self.learning_rates) else []
            writer.writerow([str(self.epochs[row]), _number(self.epoch_times[row]),
                             *(_number(lrs[i]) if i < len(lrs) else "" for i in range(groups)),
                             *(_number(self.history[s][n][row]) for s, n in columns),
                             "1" if row < len(self.improved) and self.improved[row] else "0"])
        return out.getvalue()

    def to_csv(self) -> str:
        """The history as CSV text: one row per epoch.

        Columns: ``epoch``, ``time_s``, ``lr`` (``lr_0``, ``lr_1``... with several
        parameter groups), one ``<split>_<metric>`` column per metric, and ``improved``
        (1 on an epoch whose stopping metric beat every earlier epoch's: the best epoch
        is the last such row). Floats are written exactly (``repr``), a missing value as
        an empty cell.
        """
        return self.csv_header() + self.csv_rows()

    def summary(self) -> str:
        """A short text: best epoch and its metrics."""
        if self.best_epoch is None:
            return "no epoch recorded"
        best_values = cast(dict, self.best_metric_values)  # set with best_epoch
        parts = [f"{s}/{k}={v:.6g}" for s, vals in best_values.items() for k, v in vals.items()]
        return f"best epoch {self.best_epoch}: " + ", ".join(parts)


