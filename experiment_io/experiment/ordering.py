"""The order of an epoch: a pure function of a seed, a stream and the epoch.

Both :class:`~experiment_io.Database` and
:class:`~experiment_io.ResumableSampler` draw the order of epoch ``e`` as
``numpy.random.default_rng([seed, stream, e]).permutation(n)``; each uses a stream
constant of its own, so that the two orders differ for the same seed. No
generator state exists between epochs, so a restart needs nothing but the seed,
the epoch and the number of samples already seen.

In a data-parallel run the order is shared out by :func:`global_steps`: what is
left of the epoch (from a position counted in samples of the whole run, not of a
rank) is cut into global steps of ``batch_size`` samples per rank, and each step's
samples into one contiguous share per rank. The shares of a step are disjoint and
cover it, so each sample is seen once per epoch whatever the number of ranks, and
a run resumed with another number of ranks continues the same order.
"""
from typing import Iterator

import numpy as np

__all__ = ["epoch_permutation", "global_steps"]


def epoch_permutation(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    """The order of ``n`` samples in ``epoch``: an ``int64`` permutation of ``range(n)``."""
    return np.random.default_rng([int(seed), int(stream), int(epoch)]).permutation(n).astype(np.int64)


def global_steps(positions: np.ndarray, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[np.ndarray, int]]:
    """This rank's share of each global step over ``positions`` (what is left of an epoch's order).

    A step covers ``batch_size * world_size`` consecutive positions (fewer in the
    last step); rank ``r`` gets the ``r``-th of ``world_size`` contiguous, nearly
    equal parts of it: ``batch_size`` positions in every full step, and the
    remainder of the last step spread over the ranks (a rank may get none when it
    holds fewer positions than there are ranks).

    :return: an iterator of ``(share, step_size)``: this rank's positions and the
        number of positions the whole step covers.
    """
    size = batch_size * world_size
    for begin in range(0, len(positions), size):
        step = positions[begin:begin + size]
        share = (step[batch_size * rank:batch_size * (rank + 1)] if len(step) == size
                 else np.array_split(step, world_size)[rank])
        yield share, len(step)
