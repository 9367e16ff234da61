"""At-least-once offsets: commit only up to the lowest unfinished record of a partition."""

from __future__ import annotations

from services.teacher.offsets import PartitionOffsets


def test_nothing_started_nothing_to_commit() -> None:
    assert PartitionOffsets().to_commit() is None


def test_out_of_order_finishes_hold_the_position_at_the_lowest_unfinished() -> None:
    offsets = PartitionOffsets()
    for o in (10, 11, 12, 13):
        offsets.start(o)
    offsets.finish(12)
    offsets.finish(13)
    assert offsets.to_commit() == 10  # 10 and 11 are still running: a crash must redo them
    offsets.finish(10)
    assert offsets.to_commit() == 11
    offsets.finish(11)
    assert offsets.to_commit() == 14  # everything done: next to read
    offsets.committed = 14
    assert offsets.to_commit() is None  # nothing new since the last commit
    offsets.start(14)
    assert offsets.to_commit() is None  # 14 in flight: position 14 is already committed
    offsets.finish(14)
    assert offsets.to_commit() == 15
    assert offsets.in_flight == 0


def test_next_offset_is_where_reading_goes_on_whatever_is_in_flight() -> None:
    offsets = PartitionOffsets()
    assert offsets.next_offset is None
    offsets.start(5)
    offsets.start(6)
    offsets.finish(6)
    # A worker that keeps the partition through a rebalance reads on from 7; 5 stays in flight and holds the commit.
    assert offsets.next_offset == 7 and offsets.to_commit() == 5
