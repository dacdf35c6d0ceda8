"""Operations on a checkpoint's end state, computed once and read back afterwards: an evaluation, an LR finder.

Each result is a record ``cache_<name>.pt`` in the checkpoint's directory, with the
key of the call that computed it. A new ``train()`` call of the checkpoint retires
its cached results (they were computed on the old end state).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from experiment_io.errors import CheckpointNotFoundError, SetupError
from experiment_io.format.names import qualified_name
from experiment_io.frontends.lineage import streams
from experiment_io.frontends.lineage.batches import (as_float, forward, mean_pass, metric_name, samples, split_batch,
                                                     to_device)
from experiment_io.frontends.lineage.recipes import plain
from experiment_io.frontends.lineage.records import cache_file, record_write

if TYPE_CHECKING:
    from experiment_io.frontends.lineage.model import Model

__all__ = ["Cache", "lr_range_test"]

log = logging.getLogger(__name__)


class Cache:
    """Operations on a checkpoint's end state, computed once and read back afterwards.

    Each result is kept in the checkpoint's directory under its name (by default the
    operation's); a later call with the same name returns it without computing. The
    random streams are left as they were, whether computed or read back.
    """

    def __init__(self, model: "Model", cp_id: str):
        self.model = model
        self.id = cp_id
        self._where = f"checkpoint {cp_id} of model {model.id}"

    def get(self, name: str) -> Any:
        """The cached result ``name`` (``None`` when there is none)."""
        file = cache_file(name)
        if not self.model.records.has(self.id, file):
            return None
        return self.model.records.read(self.id, file)["result"]

    def names(self) -> list:
        """The names of the cached results."""
        return self.model.records.cached(self.id)

    def _cached(self, name, key, compute, loaders=()):
        file = cache_file(name)
        records = self.model.records
        record = records.block(self.id)
        if record is None or not record["complete"]:
            raise CheckpointNotFoundError(f"{self._where} does not exist or never ran to its end: run its block first")
        if records.has(self.id, file):
            stored = records.read(self.id, file)
            if stored["key"] != key:
                log.warning("%s: the cached %r was computed with %s; this call asks %s. The cached result is returned; "
                            "delete it to compute it again: model.cache(%r).delete(%r)",
                            self._where, name, stored["key"], key, self.id, name)
            log.info("%s: %s read from the cache", self._where, name)
            return stored["result"]
        kept = streams.capture(*loaders)  # computing draws nothing from the streams that follow it
        try:
            with self._end_state(record) as target:
                result = compute(target)
        finally:
            streams.restore(kept, *loaders)
        with records.lock(self.id):
            records.save(self.id, {file: record_write({"key": key, "result": result}, "cache")})
        return result

    @contextlib.contextmanager
    def _end_state(self, record: dict) -> Iterator["Model"]:
        """A :class:`Model` holding the checkpoint's end state: the model itself when it stands there, else a copy."""
        if self.model.holds_end_of(self.id, record["token"]):
            yield self.model
            return
        other = self.model.detached()
        other.load_checkpoint(self.id)
        yield other

    def evaluate(self, dataloader: Iterable, metrics: Sequence[Callable] = (), *, name: str = "evaluate") -> dict:
        """The mean loss and metrics of the checkpoint's model on ``dataloader``: ``{"loss": ..., "<metric>": ...}``."""
        names = [metric_name(fn) for fn in metrics]
        key = {"op": "evaluate", "metrics": names, "samples": samples(dataloader)}

        def compute(target: "Model") -> dict:
            if target.loss_fn is None:
                raise SetupError(f"{self._where} has no loss to evaluate")
            sums, count = mean_pass(target.model, target.loss_fn, target.device, dataloader, names, metrics)
            if not count:
                raise SetupError("the DataLoader to evaluate on yielded no batch")
            return {n: sums[n] / count for n in sums}
        return self._cached(name, key, compute, (dataloader,))

    def find_lr(self, dataloader: Iterable, optimizer_cls: Optional[type[torch.optim.Optimizer]] = None,
                optimizer_args: Optional[dict] = None, loss_cls: Optional[type[torch.nn.Module]] = None, *,
                epochs: int = 1, min_rate: float = 1e-8, max_rate: float = 1.0, name: str = "find_lr") -> dict:
        """A learning-rate range test on a copy of the checkpoint's model (the checkpoint is not changed).

        The learning rate grows geometrically from ``min_rate`` to ``max_rate`` over
        ``epochs`` passes of ``dataloader`` (it stops early when the loss diverges).

        :param optimizer_cls: the optimizer to test (default: the checkpoint's, with its state).
        :return: ``{"lrs": [...], "losses": [...] (smoothed), "suggested_lr": float}``: the
            suggestion is where the smoothed loss falls fastest.
        """
        if not 0 < min_rate < max_rate:
            raise SetupError(f"need 0 < min_rate < max_rate, not {min_rate!r}, {max_rate!r}")
        key = {"op": "find_lr", "optimizer": qualified_name(optimizer_cls) if optimizer_cls else None,
               "optimizer_args": plain(dict(optimizer_args or {}), "optimizer_args"),
               "loss": qualified_name(loss_cls) if loss_cls else None, "epochs": epochs, "min_rate": min_rate,
               "max_rate": max_rate, "samples": samples(dataloader)}

        def compute(target: "Model") -> dict:
            module = copy.deepcopy(target.model)
            loss_fn = loss_cls() if loss_cls is not None else target.loss_fn
            if loss_fn is None:
                raise SetupError(f"{self._where} has no loss; give loss_cls=")
            if optimizer_cls is not None:
                optimizer = optimizer_cls(module.parameters(), **{**(optimizer_args or {}), "lr": min_rate})
            elif target.optimizer is not None:
                entry = target.recipe["optimizer"]
                cls = target.classes.find("optimizer", entry["cls"], self._where)
                optimizer = cls(module.parameters(), **{**entry["args"], **(optimizer_args or {})})
                optimizer.load_state_dict(copy.deepcopy(target.optimizer.state_dict()))  # the live state stays
            else:
                raise SetupError(f"{self._where} has no optimizer; give optimizer_cls=")
            if not hasattr(dataloader, "__len__"):
                raise SetupError("find_lr needs a DataLoader with a length (not over an IterableDataset)")
            return lr_range_test(module, loss_fn, optimizer, dataloader, epochs=epochs, min_rate=min_rate,
                                 max_rate=max_rate)
        return self._cached(name, key, compute, (dataloader,))

    def delete(self, name: Optional[str] = None) -> None:
        """Delete the cached result ``name``, or every cached result of the checkpoint."""
        records = self.model.records
        files = [cache_file(name)] if name is not None else [cache_file(n) for n in self.names()]
        files = [f for f in files if records.has(self.id, f)]
        if not files:
            return
        with records.lock(self.id):
            records.save(self.id, {}, retire=files)


def lr_range_test(module: torch.nn.Module, loss_fn: Callable[..., Any], optimizer: torch.optim.Optimizer,
                  dataloader: Any, *, epochs: int, min_rate: float, max_rate: float) -> dict:
    """Train ``module`` with a learning rate that grows geometrically from ``min_rate`` to ``max_rate`` over
    ``epochs`` passes of ``dataloader``, stopping when the smoothed loss diverges.

    :return: ``{"lrs": [...], "losses": [...] (smoothed), "suggested_lr": float}``: the suggestion is where the
        smoothed loss falls fastest.
    """
    total = epochs * len(dataloader)
    factor = (max_rate / min_rate) ** (1 / max(total - 1, 1))
    lrs: list[float] = []
    losses: list[float] = []
    average, best, lr = 0.0, math.inf, min_rate
    device = next(module.parameters()).device
    module.train()
    for _ in range(epochs):
        for batch in dataloader:
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = to_device(split_batch(batch), device)
            optimizer.zero_grad()
            loss = loss_fn(forward(module, inputs), targets)
            loss.backward()
            optimizer.step()
            average = 0.98 * average + 0.02 * as_float(loss)
            smoothed = average / (1 - 0.98 ** (len(losses) + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if not math.isfinite(smoothed) or smoothed > 4 * best:
                break
            lr *= factor
        else:
            continue
        break
    slopes = [(losses[i + 1] - losses[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(len(losses) - 1)]
    suggested = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[0]
    return {"lrs": lrs, "losses": losses, "suggested_lr": suggested}
