"""ResumableOrder: deterministic, resumable mid-epoch and across epochs, disjoint per rank."""
from __future__ import annotations

from itertools import islice

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from harness.data.order import ResumableOrder


def take(order, count, batch_size=2, **ranks):
    return list(islice(order.batches(batch_size, **ranks), count))


def test_same_seed_same_order_and_epochs_differ():
    first, again = take(ResumableOrder(10, seed=3), 10), take(ResumableOrder(10, seed=3), 10)
    assert first == again
    assert sorted(sum(first[:5], [])) == list(range(10))  # one epoch = a permutation
    assert first[:5] != first[5:]  # the next epoch is shuffled anew
    assert take(ResumableOrder(4, seed=0, shuffle=False), 2) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("consumed", [1, 3, 4, 6])  # 4 batches an epoch: mid-epoch, at and past the boundary
def test_resume_yields_exactly_the_remaining_batches(consumed):
    reference = take(ResumableOrder(9, seed=7), 12)  # 9 items, batch 2: 4 batches an epoch, 1 item skipped
    order = ResumableOrder(9, seed=7)
    assert take(order, consumed) == reference[:consumed]
    state = order.state_dict()
    assert set(state) == {"epoch", "position"}
    resumed = ResumableOrder(9, seed=7)
    resumed.load_state_dict(state)
    assert take(resumed, 12 - consumed) == reference[consumed:]


def test_ranks_get_disjoint_batches_of_equal_count():
    ranks = [take(ResumableOrder(11, seed=1), 2, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for step in range(2):
        assert not set(ranks[0][step]) & set(ranks[1][step])
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))  # within an epoch of 11 // 4 = 2 steps
    assert ResumableOrder(11, seed=1).batches_per_epoch(2, world_size=2) == 2


@settings(max_examples=40, deadline=None)
@given(num_items=st.integers(4, 40), batch_size=st.integers(1, 4), world_size=st.integers(1, 3),
       consumed=st.integers(0, 20))
def test_resumed_ranks_continue_where_they_stopped(num_items, batch_size, world_size, consumed):
    assume(batch_size * world_size <= num_items)
    orders = [ResumableOrder(num_items, seed=5) for _ in range(world_size)]
    reference = [take(o, consumed + 5, batch_size, rank=r, world_size=world_size) for r, o in enumerate(orders)]
    for rank in range(world_size):
        order = ResumableOrder(num_items, seed=5)
        take(order, consumed, batch_size, rank=rank, world_size=world_size)
        resumed = ResumableOrder(num_items, seed=5)
        resumed.load_state_dict(order.state_dict())
        assert take(resumed, 5, batch_size, rank=rank, world_size=world_size) == reference[rank][consumed:]


def test_invalid_use_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        take(ResumableOrder(3, seed=0), 1, batch_size=2, world_size=2)
    with pytest.raises(ValueError, match="outside 0..3"):
        ResumableOrder(3, seed=0).load_state_dict({"epoch": 0, "position": 9})
