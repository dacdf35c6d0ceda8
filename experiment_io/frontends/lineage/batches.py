"""Metrics and batches: what a block's training and the cache do with a DataLoader's batches.

A batch is ``(inputs, targets)``; ``inputs`` may be a tuple (``model(*inputs)``). A
metric is a function ``fn(outputs, targets)`` that returns the *sum* of its value
over the batch's samples; the epoch's value is the total divided by the number of
samples.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from experiment_io.errors import SetupError
from experiment_io.frontends.lineage.records import is_id

__all__ = ["metric", "metric_name", "to_device", "split_batch", "batch_size", "forward", "as_float", "samples",
           "mean_pass", "snapshot"]


def metric(name: str, higher_is_better: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Name a metric function and say which way is better.

    A metric is called as ``fn(outputs, targets)`` on each batch and returns the
    *sum* of its value over the batch's samples (a count of correct predictions, say);
    the epoch's value is the total divided by the number of samples::

        @metric("accuracy")
        def metric_accuracy(outputs, targets):
            return (outputs.argmax(dim=-1) == targets).sum().item()

    An undecorated function is named after itself without a ``metric_`` prefix and
    taken as higher-is-better.
    """
    if not isinstance(name, str) or not is_id(name):
        raise SetupError(f"a metric's name must be letters, digits, '.', '_' or '-', not {name!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, "name", name)
        setattr(fn, "higher_is_better", bool(higher_is_better))
        return fn
    return decorate


def metric_name(fn: Callable[..., Any]) -> str:
    """The name of a metric function: the one :func:`metric` gave it, else its own without ``metric_``.

    :raises SetupError: for a function without a usable name (a lambda).
    """
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name or name == "<lambda>":
        raise SetupError(f"metric {fn!r} has no usable name: decorate it with @metric('name')")
    return name[len("metric_"):] if name.startswith("metric_") and len(name) > 7 else name


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (in lists, tuples, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def snapshot(obj: Any) -> Any:
    """A copy of a state (tensors cloned), so that later training does not change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


def batch_size(batch: Any) -> int:
    """The number of samples of ``batch`` (the first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    raise SetupError("a batch must be (inputs, targets) with tensors whose first dimension is the batch")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch.

    :raises SetupError: for a batch of another shape.
    """
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise SetupError(f"a DataLoader for experiment_io.frontends.lineage yields (inputs, targets); it yielded a "
                         f"{type(batch).__name__}"
                         + (f" of {len(batch)} items" if isinstance(batch, (list, tuple)) else ""))
    return batch[0], batch[1]


def forward(module: Callable[..., Any], inputs: Any) -> Any:
    """``module(*inputs)`` for a tuple of inputs, else ``module(inputs)``."""
    return module(*inputs) if isinstance(inputs, (list, tuple)) else module(inputs)


def as_float(x: Any) -> float:
    """A number or a one-element tensor as a float."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def samples(loader: Any) -> Optional[int]:
    """The number of samples of a DataLoader's dataset (``None`` when it has no length): part of a cache key."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def mean_pass(module: torch.nn.Module, loss_fn: Callable[..., Any], device: torch.device, loader: Iterable,
              names: Sequence[str], metrics: Sequence[Callable[..., Any]]) -> tuple[dict[str, float], int]:
    """``(sums, count)`` of the loss and ``metrics`` (named ``names``) of ``module`` over one pass of ``loader``,
    in evaluation mode and without gradients."""
    sums = {"loss": 0.0, **{n: 0.0 for n in names}}
    count = 0
    module.eval()
    with torch.no_grad():
        for batch in loader:
            inputs, targets = to_device(split_batch(batch), device)
            outputs = forward(module, inputs)
            n = batch_size(targets)
            sums["loss"] += as_float(loss_fn(outputs, targets)) * n
            for name, fn in zip(names, metrics):
                sums[name] += as_float(fn(outputs, targets))
            count += n
    return sums, count
