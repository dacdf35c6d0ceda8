"""A data-order sampler for your own training loop that resumes mid-epoch, exactly.

:class:`ResumableSampler` is a :class:`torch.utils.data.Sampler` for a
:class:`~torch.utils.data.DataLoader`. The order of epoch ``e`` is a pure function of
``(seed, e)``, as in :meth:`experiment_io.Database.epoch_order`, so no
generator state needs saving: the sampler's state is a handful of integers (the
epoch and how many samples of it this rank has consumed), and a resumed sampler
yields exactly the indices that the interrupted one had not yet delivered.

**Why the loop reports what it consumed.** A :class:`~torch.utils.data.DataLoader`
draws indices from its sampler ahead of the batches it hands out: with
``num_workers > 0`` it keeps ``prefetch_factor`` batches per worker in flight. What
the sampler has yielded is therefore more than what the training loop has
consumed, and only the loop knows the latter. So the sampler counts nothing by
itself: call :meth:`~experiment_io.ResumableSampler.advance` with the batch's
size once a batch has been trained on (after the optimizer step), and take
:meth:`~experiment_io.ResumableSampler.state_dict` for a checkpoint after that call::

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)           # keeps the position when resuming this epoch
        for x, y in loader:
            train_step(x, y)
            sampler.advance(len(x))
            ...                            # checkpoint: sampler.state_dict()

Each iteration over the sampler (each ``iter(loader)``) starts from the position at
that moment, and does not move when the loop stops early.
"""
import logging
import math
import numbers
from typing import Optional, Sized, Union, cast

import numpy as np
import torch.utils.data

from experiment_io.errors import IncompatibleCheckpointError
from experiment_io.experiment.launch import launched_world
from experiment_io.experiment.ordering import epoch_permutation

__all__ = ["ResumableSampler"]

log = logging.getLogger(__name__)

# the stream of the shuffling orders, so that they differ from other uses of the same seed
_ORDER_STREAM = 0x5A3B1E

_STATE_KEYS = ("epoch", "seed", "samples_consumed", "world_size", "rank", "dataset_length", "shuffle", "drop_last")


def _non_negative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic, shardable, resumable order over a data set's indices.

    **Order.** With ``shuffle=True`` the order of epoch ``e`` is the permutation drawn
    by ``numpy.random.default_rng([seed, stream, e])``, where ``stream`` is a constant
    of this module: it depends on the seed and the epoch only, not on the rank, the
    world size or anything that happened before. With ``shuffle=False`` it is
    ``0, 1, ..., n - 1``.

    **Sharding**, as :class:`torch.utils.data.distributed.DistributedSampler` does it:
    rank ``r`` of ``world_size`` takes the positions ``r, r + world_size, ...`` of the
    epoch's order, so the shards are disjoint and every rank gets the same number of
    samples, :attr:`num_samples`. When ``world_size`` does not divide the data set's
    length ``n``:

    - ``drop_last=False`` (default): the order is padded by repeating its beginning
      until every rank has ``ceil(n / world_size)`` samples; the shards cover the data
      set and the first ``world_size * num_samples - n`` samples of the order are seen
      twice in the epoch.
    - ``drop_last=True``: the last ``n mod world_size`` samples of the order are left
      out of this epoch; every rank has ``floor(n / world_size)`` samples.

    **Position.** :meth:`advance` counts the samples this rank has consumed in the
    current epoch; iteration yields the rest of the rank's shard. Reaching the end of
    an epoch does not start the next one: call :meth:`set_epoch`.

    **Another number of ranks at a restart.** Every rank consumes its shard in step
    with the others, so after ``k`` samples per rank the ranks together have consumed
    the first ``k * world_size`` positions of the epoch's order (its global position,
    saved in :meth:`state_dict`). A state loaded by a sampler of another world size
    continues the epoch from that global position: what is left of the order is
    sharded anew over the new ranks (padded or cut as above), so each remaining
    sample is seen once (plus the padding). The next epochs are sharded as usual.

    :param data_source_or_length: the data set (anything with ``len``) or its length.
        The length is read once, here.
    :param seed: a non-negative integer; the same seed and epoch give the same order.
    :param shuffle: shuffle every epoch (otherwise the natural order).
    :param rank: this process's rank, ``0 <= rank < world_size`` (default: the rank
        in the initialized process group, or the launcher's ``RANK``; 0 alone).
    :param world_size: the number of processes that share the data set (default:
        the process group's size, or the launcher's ``WORLD_SIZE``; 1 alone).
    :param drop_last: drop the tail instead of padding (see above).
    :param num_replicas: ``DistributedSampler``'s name for ``world_size``, so that
        ``DistributedSampler(dataset, num_replicas=..., rank=..., shuffle=..., seed=...,
        drop_last=...)`` becomes ``ResumableSampler`` by changing the class name.
    """

    def __init__(self, data_source_or_length: Union[int, Sized], *, seed: int = 0, shuffle: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None, drop_last: bool = False,
                 num_replicas: Optional[int] = None):
        if isinstance(data_source_or_length, numbers.Integral) and not isinstance(data_source_or_length, bool):
            length: Union[numbers.Integral, int] = data_source_or_length
        else:
            length = len(cast(Sized, data_source_or_length))
        self._length = _non_negative_int(length, "the data set's length")
        self._seed = _non_negative_int(seed, "seed")
        if num_replicas is not None:
            if world_size is not None and world_size != num_replicas:
                raise ValueError(f"num_replicas={num_replicas} and world_size={world_size} disagree; give one of them")
            world_size = num_replicas
        launched_rank, _, launched_size = launched_world()
        world_size = launched_size if world_size is None else world_size
        rank = (launched_rank if launched_size == world_size else 0) if rank is None else rank
        self._world_size = _non_negative_int(world_size, "world_size")
        if self._world_size == 0:
            raise ValueError("world_size must be at least 1")
        self._rank = _non_negative_int(rank, "rank")
        if self._rank >= self._world_size:
            raise ValueError(f"rank {rank} must be smaller than world_size {world_size}")
        self._shuffle = bool(shuffle)
        self._drop_last = bool(drop_last)
        self._epoch = 0
        self._start = 0  # global position where the sharding of the current epoch began
        self._consumed = 0
        #: ``len(sampler)`` counts the whole epoch instead of what is left of it: for a
        #: loop that counts the batches it already trained itself (Lightning's, see
        #: :class:`experiment_io.frontends.lightning.ExactResume`, which sets it).
        self.len_whole_epoch = False

    def _per_rank(self, remaining):
        return remaining // self._world_size if self._drop_last else math.ceil(remaining / self._world_size)

    #: The current epoch.
    epoch = property(lambda self: self._epoch)
    #: The seed of the orders.
    seed = property(lambda self: self._seed)
    #: This sampler's rank.
    rank = property(lambda self: self._rank)
    #: The number of ranks sharing the data set.
    world_size = property(lambda self: self._world_size)
    #: The length of the data set.
    dataset_length = property(lambda self: self._length)

    @property
    def num_samples(self) -> int:
        """The number of samples of the current epoch for this rank (padding included)."""
        return self._per_rank(self._length - self._start)

    @property
    def samples_consumed(self) -> int:
        """Samples of the current epoch this rank has consumed (the sum of :meth:`advance` calls)."""
        return self._consumed

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order of the whole data set in ``epoch``, before sharding.

        :return: an ``int64`` array, a permutation of ``range(n)``.
        """
        epoch = _non_negative_int(epoch, "epoch")
        if not self._shuffle:
            return np.arange(self._length, dtype=np.int64)
        return epoch_permutation(self._seed, _ORDER_STREAM, epoch, self._length)

    def shard(self, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's indices of a whole epoch (of the current one by default).

        :return: an ``int64`` array of :attr:`num_samples` indices.
        """
        current = epoch is None or epoch == self._epoch
        order = self.epoch_order(self._epoch if epoch is None else epoch)[self._start if current else 0:]
        total = self._per_rank(len(order)) * self._world_size
        order = order[:total] if self._drop_last else np.resize(order, total)
        return order[self._rank::self._world_size]

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the current epoch.

        A different epoch starts from its beginning; the current epoch keeps its
        position, so the usual ``sampler.set_epoch(epoch)`` at the top of the epoch
        loop continues a resumed epoch where it stopped.

        :param epoch: a non-negative integer.
        """
        epoch = _non_negative_int(epoch, "epoch")
        if epoch != self._epoch:
            self._epoch = epoch
            self._start = self._consumed = 0

    def advance(self, n: int) -> None:
        """Record that this rank has consumed ``n`` more samples of the current epoch.

        Call it with the size of each batch once the batch is trained on; the
        sampler cannot see what a :class:`~torch.utils.data.DataLoader` has
        prefetched but not yet delivered.

        :param n: a non-negative number of samples.
        :raises ValueError: when it would go past the end of the epoch.
        """
        n = _non_negative_int(n, "n")
        if self._consumed + n > self.num_samples:
            raise ValueError(
                f"advance({n}) goes past the end of epoch {self._epoch}: {self._consumed} of this rank's "
                f"{self.num_samples} samples were consumed already. Advance by the size of each consumed batch only."
            )
        self._consumed += n

    def __iter__(self):
        start = self._consumed
        return iter(self.shard()[start:].tolist())

    def __len__(self):
        return self.num_samples if self.len_whole_epoch else self.num_samples - self._consumed

    @property
    def global_samples_consumed(self) -> int:
        """Positions of the current epoch's order consumed by all ranks together (assuming they go in step)."""
        return min(self._start + self._consumed * self._world_size, self._length)

    def state_dict(self) -> dict:
        """The position as plain data (integers and booleans).

        :return: ``{"epoch", "seed", "samples_consumed", "start", "global_samples_consumed",
            "world_size", "rank", "dataset_length", "shuffle", "drop_last"}``
            (``samples_consumed`` counts this rank's samples since ``start``, the global
            position where the epoch's current sharding began).
        """
        return {
            "epoch": self._epoch,
            "seed": self._seed,
            "samples_consumed": self._consumed,
            "start": self._start,
            "global_samples_consumed": self.global_samples_consumed,
            "world_size": self._world_size,
            "rank": self._rank,
            "dataset_length": self._length,
            "shuffle": self._shuffle,
            "drop_last": self._drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position that :meth:`state_dict` returned.

        The epoch, the position and the seed are taken from ``state``. The data
        set's length, ``shuffle`` and ``drop_last`` must equal this sampler's: with
        any of them changed there is no continuation of the same order. With the same
        world size the continuation is exact; with another one, the epoch continues
        from its global position, what is left of it sharded over the new ranks (see
        the class's description). The rank is not imposed: every rank consumes the
        same number of samples, so a state saved by rank 0 resumes every rank.

        :param state: the dict that :meth:`state_dict` returned.
        :raises IncompatibleCheckpointError: when ``state`` lacks an entry or
            describes another data set or sharding mode.
        """
        if not isinstance(state, dict):
            raise IncompatibleCheckpointError(f"a sampler state is a dict, not a {type(state).__name__}")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise IncompatibleCheckpointError(
                f"the sampler state lacks the entries {missing}; pass what ResumableSampler.state_dict() returned")
        for key, mine, remedy in (
            ("dataset_length", self._length, "Resume on the same data set"),
            ("shuffle", self._shuffle, "Build the sampler with the same shuffle"),
            ("drop_last", self._drop_last, "Build the sampler with the same drop_last"),
        ):
            if state[key] != mine:
                raise IncompatibleCheckpointError(
                    f"the sampler state was saved with {key}={state[key]!r}, but this sampler has {key}={mine!r}: "
                    f"its order cannot be continued exactly. {remedy}, or start a new epoch "
                    "with a new sampler instead of loading the state."
                )
        try:
            epoch = _non_negative_int(state["epoch"], "epoch")
            seed = _non_negative_int(state["seed"], "seed")
            consumed = _non_negative_int(state["samples_consumed"], "samples_consumed")
            start = _non_negative_int(state.get("start", 0), "start")
            saved_size = _non_negative_int(state["world_size"], "world_size")
        except ValueError as e:
            raise IncompatibleCheckpointError(f"the sampler state is damaged: {e}") from e
        if start > self._length or saved_size == 0:
            raise IncompatibleCheckpointError(f"the sampler state is damaged: start {start}, world size {saved_size}")
        if saved_size != self._world_size:
            position = min(start + consumed * saved_size, self._length)
            log.info("the sampler state was saved by %d rank(s); %d continue epoch %d from its global position %d",
                     saved_size, self._world_size, epoch, position)
            start, consumed = position, 0
        per_rank = self._per_rank(self._length - start)
        if consumed > per_rank:
            raise IncompatibleCheckpointError(
                f"the sampler state has {consumed} samples consumed, more than the {per_rank} of an epoch")
        if seed != self._seed:
            log.warning("the sampler state has seed %d; continuing with it instead of %d", seed, self._seed)
        self._epoch, self._seed, self._start, self._consumed = epoch, seed, start, consumed
