"""The order of an epoch: a pure function of a seed, a stream and the epoch.

Both :class:`~experiment_io.Database` and
:class:`~experiment_io.ResumableSampler` draw the order of epoch ``e`` as
``numpy.random.default_rng([seed, stream, e]).permutation(n)``; each uses a stream
constant of its own, so that the two orders differ for the same seed. No
generator state exists between epochs, so a restart needs nothing but the seed,
the epoch and the number of samples already seen.
"""
import numpy as np

__all__ = ["epoch_permutation"]


def epoch_permutation(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    """The order of ``n`` samples in ``epoch``: an ``int64`` permutation of ``range(n)``."""
    return np.random.default_rng([int(seed), int(stream), int(epoch)]).permutation(n).astype(np.int64)
