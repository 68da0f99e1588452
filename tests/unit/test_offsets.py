"""The commit rule: per partition, only up to the lowest offset whose envelope is not yet acked."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consumer.offsets import OffsetTracker, PartitionOffsets


def test_commit_waits_for_the_lowest_unacked_offset() -> None:
    offsets = PartitionOffsets()
    for n in (10, 11, 12, 13):
        offsets.received(n)
    assert offsets.committable() is None
    offsets.acked(12)
    offsets.acked(11)
    assert offsets.committable() is None  # 10 is still in flight
    offsets.acked(10)
    assert offsets.committable() == 13
    offsets.committed(13)
    assert offsets.committable() is None
    offsets.acked(13)
    assert offsets.committable() == 14
    assert offsets.outstanding == 0


def test_gaps_between_offsets_are_not_waited_for() -> None:
    offsets = PartitionOffsets()
    for n in (5, 9, 20):
        offsets.received(n)
    offsets.acked(5)
    offsets.acked(9)
    assert offsets.committable() == 10
    offsets.acked(20)
    assert offsets.committable() == 21


def test_repeated_acks_change_nothing() -> None:
    offsets = PartitionOffsets()
    for n in (1, 2, 3):
        offsets.received(n)
    offsets.acked(1)
    offsets.acked(1)
    offsets.acked(3)
    offsets.acked(3)
    assert offsets.outstanding == 1
    assert offsets.committable() == 2


def test_a_retired_partition_ignores_late_acks() -> None:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    part = tracker.partition(("t", 0))
    part.received(0)
    part.received(1)
    part.acked(0)
    assert tracker.committable() == {("t", 0): 1}
    retired = tracker.retire(("t", 0))
    assert retired is part
    part.acked(1)
    assert tracker.committable() == {}
    assert ("t", 0) not in tracker


def test_offsets_must_arrive_in_order() -> None:
    offsets = PartitionOffsets()
    offsets.received(4)
    try:
        offsets.received(4)
    except ValueError as exc:
        assert "not above" in str(exc)
    else:
        raise AssertionError("a repeated offset was accepted")


@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.randoms(use_true_random=False))
def test_never_commits_past_an_unacked_offset(gaps: list[int], rand: object) -> None:
    import random

    assert isinstance(rand, random.Random)
    offsets = PartitionOffsets()
    received, position = [], 0
    for gap in gaps:
        position += gap + 1
        offsets.received(position)
        received.append(position)
    order = received[:]
    rand.shuffle(order)
    acked: set[int] = set()
    for offset in order:
        offsets.acked(offset)
        acked.add(offset)
        commit = offsets.committable()
        if commit is not None:
            offsets.committed(commit)
            # Everything below the commit is acked, and the commit is as far as it can go.
            assert all(o in acked for o in received if o < commit)
            unacked = [o for o in received if o not in acked]
            assert not unacked or commit <= min(unacked)
        assert offsets.outstanding == len(received) - len(acked)
    assert offsets.committable() in (None, received[-1] + 1)


def test_a_fetched_run_must_be_ascending_and_above_what_came_before() -> None:
    offsets = PartitionOffsets()
    offsets.received_many([2, 3, 7])
    offsets.received_many([])
    for bad in ([7, 8], [9, 9], [10, 9]):
        try:
            offsets.received_many(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was accepted")
    assert offsets.outstanding == 3


@given(
    st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=20), min_size=1, max_size=8),
    st.randoms(use_true_random=False),
)
def test_fetched_runs_settle_like_single_offsets(runs: list[list[int]], rand: object) -> None:
    import random

    assert isinstance(rand, random.Random)
    one_by_one, by_run = PartitionOffsets(), PartitionOffsets()
    received, position = [], 0
    for gaps in runs:
        run = []
        for gap in gaps:
            position += gap + 1
            run.append(position)
        by_run.received_many(run)
        for offset in run:
            one_by_one.received(offset)
        received += run
    order = received[:]
    rand.shuffle(order)
    for offset in order:
        one_by_one.acked(offset)
        by_run.acked(offset)
        assert one_by_one.committable() == by_run.committable()
        assert one_by_one.outstanding == by_run.outstanding
