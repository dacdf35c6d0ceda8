"""ResumableSampler: deterministic orders, sharding, and exact mid-epoch resumes through a DataLoader."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from experiment_io import ResumableSampler
from experiment_io.errors import IncompatibleCheckpointError

N = 50  # divisible by 2, not by 3 or by the batch size: padding and a short last batch
BATCH = 4
DATASET = TensorDataset(torch.arange(N))


def loader(sampler, num_workers):
    kwargs = {"multiprocessing_context": "fork", "prefetch_factor": 4} if num_workers else {}
    return DataLoader(DATASET, batch_size=BATCH, sampler=sampler, num_workers=num_workers, **kwargs)


def consume(sampler, num_workers, stop_after=None):
    """Train on the batches of a loader over ``sampler``, as a loop would; stop after ``stop_after`` batches."""
    seen = []
    for count, (batch,) in enumerate(loader(sampler, num_workers), start=1):
        seen += batch.tolist()
        sampler.advance(len(batch))
        if count == stop_after:
            break
    return seen


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_interrupted_epoch_resumes_exactly_through_a_dataloader(world_size, num_workers):
    epoch, stop_after = 3, 2
    for rank in range(world_size):
        def make():
            return ResumableSampler(DATASET, seed=7, rank=rank, world_size=world_size)

        uninterrupted = make()
        uninterrupted.set_epoch(epoch)
        expected = consume(uninterrupted, num_workers)
        assert expected == uninterrupted.shard().tolist() and len(expected) == -(-N // world_size)

        first = make()
        first.set_epoch(epoch)
        head = consume(first, num_workers, stop_after)
        # the loader prefetched further, but only what the loop consumed counts
        assert first.samples_consumed == stop_after * BATCH == len(head)
        saved = json.loads(json.dumps(first.state_dict()))  # plain data

        resumed = make()
        resumed.load_state_dict(saved)
        resumed.set_epoch(epoch)  # as the epoch loop does on resuming: keeps the position
        assert len(resumed) == len(expected) - len(head)
        tail = consume(resumed, num_workers)
        assert head + tail == expected
        assert resumed.samples_consumed == resumed.num_samples and len(resumed) == 0


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_twice_and_across_the_epoch_boundary(world_size):
    def make(rank):
        return ResumableSampler(N, seed=1, rank=rank, world_size=world_size)

    for rank in range(world_size):
        expected = [make(rank).shard(e).tolist() for e in (0, 1)]
        sampler, pieces = make(rank), []
        for stop_after in (1, 3, None):
            pieces += consume(sampler, 0, stop_after)
            state = sampler.state_dict()
            sampler = make(rank)
            sampler.load_state_dict(state)
        assert pieces == expected[0]
        sampler.set_epoch(0)
        assert list(sampler) == []  # the finished epoch stays finished
        sampler.set_epoch(1)
        assert consume(sampler, 0) == expected[1]


@pytest.mark.parametrize("n", [0, 1, 10, 11, 12, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_the_dataset_with_padding(n, world_size):
    samplers = [ResumableSampler(n, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    order = samplers[0].epoch_order(2).tolist()
    shards = [s.shard(2).tolist() for s in samplers]
    per_rank = -(-n // world_size)
    padding = per_rank * world_size - n
    assert all(len(shard) == per_rank == s.num_samples for shard, s in zip(shards, samplers))
    assert set().union(*shards) == set(range(n))  # cover
    # disjoint by position: interleaving the shards gives the padded order back
    interleaved = [shard[i] for i in range(per_rank) for shard in shards]
    padded = (order * (padding // max(n, 1) + 2))[: n + padding]  # the order, then its beginning again
    assert interleaved == padded
    if n >= world_size:
        assert all(len(set(shard)) == len(shard) for shard in shards)  # no rank sees a sample twice
    if padding == 0:
        assert sum(len(shard) for shard in shards) == len(set().union(*shards))  # pairwise disjoint


@pytest.mark.parametrize("n", [10, 11, 13])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_drop_last_drops_the_tail_of_the_order(n, world_size):
    samplers = [ResumableSampler(n, seed=5, rank=r, world_size=world_size, drop_last=True) for r in range(world_size)]
    shards = [set(s.shard().tolist()) for s in samplers]
    kept = n // world_size * world_size
    assert all(len(shard) == n // world_size for shard in shards)
    assert sum(map(len, shards)) == len(set().union(*shards)) == kept
    assert set().union(*shards) == set(samplers[0].epoch_order(0)[:kept].tolist())


def test_order_depends_on_seed_and_epoch_only():
    a, b = ResumableSampler(N, seed=3), ResumableSampler(range(N), seed=3)
    assert np.array_equal(a.epoch_order(4), b.epoch_order(4))  # same seed and epoch: same order
    assert sorted(a.epoch_order(4).tolist()) == list(range(N))
    orders = {tuple(a.epoch_order(e).tolist()) for e in range(5)}
    assert len(orders) == 5  # every epoch its own order
    assert not np.array_equal(a.epoch_order(0), ResumableSampler(N, seed=4).epoch_order(0))
    # the sharded samplers of any world size draw from the same order
    for world_size in (2, 5):
        shards = [ResumableSampler(N, seed=3, rank=r, world_size=world_size).shard(4).tolist() for r in range(world_size)]
        assert [shards[i % world_size][i // world_size] for i in range(N)] == a.epoch_order(4).tolist()
    # and the order is pinned: the same numbers on every machine and release
    assert ResumableSampler(10, seed=0).epoch_order(0).tolist() == GOLDEN_ORDER


GOLDEN_ORDER = [9, 0, 1, 6, 7, 3, 5, 2, 4, 8]  # numpy PCG64 seeded by SeedSequence([0, stream, 0])


def test_unshuffled_order_is_the_natural_order():
    sampler = ResumableSampler(7, shuffle=False, rank=1, world_size=2)
    assert list(sampler) == [1, 3, 5, 0]  # padded with the start of 0..6


def test_set_epoch_and_advance():
    sampler = ResumableSampler(N, seed=2)
    sampler.advance(10)
    sampler.set_epoch(0)
    assert sampler.samples_consumed == 10 and list(sampler) == sampler.shard().tolist()[10:]
    sampler.set_epoch(1)
    assert sampler.samples_consumed == 0 and len(sampler) == N
    with pytest.raises(ValueError, match="past the end"):
        sampler.advance(N + 1)
    with pytest.raises(ValueError):
        sampler.advance(-1)
    iterator = iter(sampler)
    sampler.advance(5)  # an iteration already begun is not moved
    assert list(iterator) == sampler.shard().tolist()


def test_a_state_saved_by_rank_zero_resumes_another_rank():
    saved = ResumableSampler(N, world_size=2, rank=0)
    saved.set_epoch(1)
    saved.advance(8)
    other = ResumableSampler(N, world_size=2, rank=1)
    other.load_state_dict(saved.state_dict())
    assert (other.rank, other.epoch, other.samples_consumed) == (1, 1, 8)
    assert list(other) == other.shard().tolist()[8:]


def test_the_state_seed_wins(caplog):
    saved = ResumableSampler(N, seed=11)
    sampler = ResumableSampler(N, seed=0)
    sampler.load_state_dict(saved.state_dict())
    assert sampler.seed == 11 and np.array_equal(sampler.shard(), saved.shard())
    assert "seed 11" in caplog.text


@pytest.mark.parametrize("change, value, match", [
    ("dataset_length", N + 1, "dataset_length"),
    ("shuffle", False, "shuffle"),
    ("drop_last", True, "drop_last"),
])
def test_a_state_of_another_sampler_is_refused(change, value, match):
    state = ResumableSampler(N, world_size=2).state_dict()
    kwargs = {"world_size": 2, "shuffle": True, "drop_last": False}
    length = N
    if change == "dataset_length":
        length = value
    else:
        kwargs[change] = value
    sampler = ResumableSampler(length, **kwargs)
    before = sampler.state_dict()
    with pytest.raises(IncompatibleCheckpointError, match=match):
        sampler.load_state_dict(state)
    assert sampler.state_dict() == before  # nothing half-loaded


@pytest.mark.parametrize("damage", [
    lambda s: s.pop("samples_consumed"),
    lambda s: s.update(samples_consumed=10**6),
    lambda s: s.update(epoch=-1),
    lambda s: s.update(seed="x"),
])
def test_a_damaged_state_is_refused(damage):
    state = ResumableSampler(N).state_dict()
    damage(state)
    with pytest.raises(IncompatibleCheckpointError):
        ResumableSampler(N).load_state_dict(state)
    with pytest.raises(ValueError):  # also catchable as the built-in
        ResumableSampler(N).load_state_dict(state)


@pytest.mark.parametrize("kwargs", [{"rank": 2, "world_size": 2}, {"world_size": 0}, {"seed": -1}, {"seed": 1.5}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ResumableSampler(N, **kwargs)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 40), world_size=st.integers(1, 4), drop_last=st.booleans(), data=st.data())
def test_any_interruption_point_resumes_exactly(n, world_size, drop_last, data):
    rank = data.draw(st.integers(0, world_size - 1))
    make = lambda: ResumableSampler(n, seed=9, rank=rank, world_size=world_size, drop_last=drop_last)  # noqa: E731
    full = make()
    stop = data.draw(st.integers(0, full.num_samples))
    first = make()
    head = list(first)[:stop]
    first.advance(stop)
    second = make()
    second.load_state_dict(first.state_dict())
    assert head + list(second) == list(full)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), before=st.integers(1, 5), after=st.integers(1, 5), batches=st.integers(0, 8),
       batch=st.integers(1, 4), seed=st.integers(0, 50))
def test_another_world_size_at_a_restart_sees_each_remaining_sample_once(n, before, after, batches, batch, seed):
    """Ranks consume in step; the state of rank 0, loaded by another number of ranks, continues the epoch."""
    old = [ResumableSampler(n, seed=seed, rank=r, world_size=before, drop_last=True) for r in range(before)]
    seen = []
    for _ in range(batches):
        take = min(batch, len(old[0]))
        for sampler in old:
            seen += list(sampler)[:take]
            sampler.advance(take)
    state = old[0].state_dict()
    assert state["global_samples_consumed"] == len(seen)
    new = [ResumableSampler(n, seed=seed, rank=r, world_size=after, drop_last=True) for r in range(after)]
    for sampler in new:
        sampler.load_state_dict(state)
        seen += list(sampler)
    order = ResumableSampler(n, seed=seed).epoch_order(0)
    left_out = n - len(seen)  # drop_last: fewer than a rank count at each sharding
    assert 0 <= left_out < before + after
    assert sorted(seen) == sorted(order[:len(seen)].tolist() if left_out == 0 else seen)
    assert len(set(seen)) == len(seen), "a sample seen twice"
    for sampler in new:  # the next epoch is sharded as usual
        sampler.set_epoch(1)
    assert sorted(i for s in new for i in s) == sorted(ResumableSampler(n, seed=seed).epoch_order(1)[:n - n % after].tolist())


def test_rank_and_world_size_default_to_the_launchers(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    sampler = ResumableSampler(10)
    assert (sampler.rank, sampler.world_size) == (2, 3)
    assert list(sampler) == ResumableSampler(10, rank=2, world_size=3).shard().tolist()
    monkeypatch.delenv("WORLD_SIZE")
    assert (ResumableSampler(10).rank, ResumableSampler(10).world_size) == (0, 1)
