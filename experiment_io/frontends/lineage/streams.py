"""The random streams of a ``train()`` call: the process's and those of the DataLoaders' own generators.

The process's streams (torch on the CPU and every CUDA device, numpy, Python's
:mod:`random`) are captured and restored by :mod:`experiment_io.experiment.rng`; a
DataLoader (or its sampler) given a :class:`torch.Generator` draws its order from
that generator, whose state is kept beside them.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from experiment_io.experiment.rng import get_rng_state, set_rng_state

__all__ = ["capture", "restore"]

log = logging.getLogger(__name__)


def _generators(*loaders: Any) -> list[torch.Generator]:
    """The :class:`torch.Generator` objects the loaders draw their order from (their own, their samplers')."""
    found: list[torch.Generator] = []
    for loader in loaders:
        if loader is None:
            continue
        sampler = getattr(loader, "sampler", None)
        inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        for generator in (getattr(loader, "generator", None), getattr(sampler, "generator", None),
                          getattr(inner, "generator", None)):
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found


def capture(*loaders: Any) -> dict[str, Any]:
    """The random streams now: ``{"streams": the process's, "loaders": the loaders' generators' states}``."""
    return {"streams": get_rng_state(), "loaders": [g.get_state() for g in _generators(*loaders)]}


def restore(state: Mapping[str, Any], *loaders: Any) -> None:
    """Set the random streams to ``state`` (from :func:`capture` with the same loaders)."""
    set_rng_state(state["streams"])
    generators = _generators(*loaders)
    if len(generators) == len(state["loaders"]):
        for generator, saved in zip(generators, state["loaders"]):
            generator.set_state(saved)
    elif loaders:
        log.warning("the DataLoaders have %d generators of their own, the checkpoint saved %d: their order is not "
                    "restored", len(generators), len(state["loaders"]))

