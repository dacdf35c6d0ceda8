"""How an epoch's order is shared out among ranks (experiment_io.experiment.ordering)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from experiment_io import Database
from experiment_io.experiment.ordering import epoch_permutation, global_steps

from helpers import make_arrays


def shares(positions, batch_size, world_size):
    """Each rank's list of shares, step by step."""
    per_rank = [list(global_steps(positions, batch_size, rank, world_size)) for rank in range(world_size)]
    assert len({len(steps) for steps in per_rank}) == 1, "every rank takes the same number of steps"
    return per_rank


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 60), batch_size=st.integers(1, 7), world_size=st.integers(1, 5),
       stopped_after=st.integers(0, 10), new_world_size=st.integers(1, 5))
def test_each_sample_once_whatever_the_ranks_and_a_restart_with_others(n, batch_size, world_size, stopped_after,
                                                                        new_world_size):
    order = epoch_permutation(3, 0xE90C, 0, n)
    first = shares(order, batch_size, world_size)
    steps = min(stopped_after, len(first[0]))
    seen = [i for rank in first for share, _ in rank[:steps] for i in share.tolist()]
    done = sum(size for _, size in first[0][:steps])  # the global position a checkpoint records
    assert done == len(seen)
    rest = shares(order[done:], batch_size, new_world_size)
    seen += [i for rank in rest for share, _ in rank for i in share.tolist()]
    assert sorted(seen) == sorted(order.tolist())
    for rank in first:  # full steps give batch_size to every rank
        for share, size in rank:
            if size == batch_size * world_size:
                assert len(share) == batch_size


def test_one_rank_is_the_single_process_order():
    database = Database(make_arrays(50), ["x"], ["y"], seed=1, valid_size=0.2, test_size=0.0)
    order = database.epoch_order(2)
    single = [t[0] for _, t in database.batches("train", 8, order=order, start=5)]
    sharded = [t[0] for _, t, n, size in database.shard_batches("train", 8, order=order, start=5)]
    assert len(single) == len(sharded) and all(np.array_equal(a, b) for a, b in zip(single, sharded))


def test_a_rank_without_a_sample_in_the_last_step_gets_a_weightless_stand_in():
    database = Database(make_arrays(12), ["x"], ["y"], seed=1, valid_size=0.0, test_size=0.0)
    order = database.epoch_order(0)
    last = list(database.shard_batches("train", 2, order=order, start=10, rank=3, world_size=4))
    (inputs, targets, n, size), = last
    assert (n, size) == (0, 2) and len(targets[0]) == 1
