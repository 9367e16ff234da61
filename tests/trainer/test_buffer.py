"""Replay buffer policy and offset bookkeeping: what a checkpoint may claim, and how a re-read resumes."""

from __future__ import annotations

from services.trainer.buffer import (
    REFERENCE,
    SAMPLE,
    SCORED_STUDENT,
    Item,
    OffsetTracker,
    Replay,
    ReplayBuffer,
    resume_state,
)


def _item(p: int, o: int, kind: str = SAMPLE) -> Item:
    return Item(p, o, kind, [1, 2, 3], 2)


def _feed(buf: ReplayBuffer, tr: OffsetTracker, items: list[Item]) -> None:
    for it in items:
        tr.read(it.partition, it.offset, 1)
        for ev in buf.add(it):
            tr.done(ev.partition, ev.offset)


def test_fresh_first_then_replay_up_to_reuse() -> None:
    buf, tr = ReplayBuffer(capacity=4, reuse=2), OffsetTracker()
    _feed(buf, tr, [_item(0, i) for i in range(3)])
    batch, done = buf.take(2, replay=False)
    assert [it.offset for it in batch] == [0, 1] and done == []
    batch, done = buf.take(2, replay=True)  # one fresh left, then the least used
    assert [it.offset for it in batch] == [2, 0] and [it.offset for it in done] == [0]
    assert buf.fresh == 0 and len(buf) == 2


def test_reuse_one_is_a_fifo_and_offsets_advance_only_past_done_records() -> None:
    buf, tr = ReplayBuffer(capacity=8, reuse=1), OffsetTracker()
    _feed(buf, tr, [_item(0, 0), _item(1, 0), _item(0, 1), _item(0, 2)])
    tr.read(0, 3, 0)  # a filtered record: done at once
    assert tr.safe_offsets() == {0: 0, 1: 0}
    _, done = buf.take(2, replay=False)  # (0,0) and (1,0)
    for it in done:
        tr.done(it.partition, it.offset)
    assert tr.safe_offsets() == {0: 1, 1: 1}
    _, done = buf.take(2, replay=False)
    for it in done:
        tr.done(it.partition, it.offset)
    assert tr.safe_offsets() == {0: 4, 1: 1}  # past the filtered record too


def test_a_record_with_two_items_is_done_when_both_are() -> None:
    buf, tr = ReplayBuffer(capacity=8, reuse=1), OffsetTracker()
    tr.read(0, 5, 2)
    buf.add(_item(0, 5, SAMPLE))
    buf.add(_item(0, 5, REFERENCE))
    buf.take(1, replay=False)
    tr.done(0, 5)
    assert tr.safe_offsets() == {0: 5}
    buf.take(1, replay=False)
    tr.done(0, 5)
    assert tr.safe_offsets() == {0: 6}


def test_full_buffer_evicts_used_items_only() -> None:
    buf, tr = ReplayBuffer(capacity=2, reuse=3), OffsetTracker()
    _feed(buf, tr, [_item(0, 0), _item(0, 1)])
    assert buf.room() == 0
    buf.take(1, replay=False)  # (0,0) used once
    assert buf.room() == 1
    _feed(buf, tr, [_item(0, 2)])  # evicts (0,0), which counts as done
    assert [it.offset for it in buf.items()] == [1, 2] and tr.safe_offsets() == {0: 1}


def test_resume_state_round_trip() -> None:
    buf, tr = ReplayBuffer(capacity=8, reuse=2), OffsetTracker(start={1: 7})
    _feed(buf, tr, [_item(0, 0), _item(0, 1), _item(0, 2)])
    buf.take(2, replay=False)  # 0 and 1 used once, still pending
    state = resume_state(tr, buf)
    assert state["safe"] == {"0": 0, "1": 7} and state["end"] == {"0": 3, "1": 7}
    replay = Replay.from_state(state)
    assert replay.seen_before(0, 2) and not replay.seen_before(0, 3) and not replay.seen_before(1, 7)
    assert replay.uses(0, 0) == {SAMPLE: 1} and replay.uses(0, 2) == {SAMPLE: 0}
    assert replay.uses(0, 9) == {}


def test_on_policy_quota_takes_student_completions_first_then_replays_them() -> None:
    """GKD's λ: `on_policy` of a batch come from scored student completions (fresh first, then with uses left),
    the rest from the other samples, oldest first."""
    buf, tr = ReplayBuffer(capacity=16, reuse=2), OffsetTracker()
    items = [_item(0, i) for i in range(6)]
    for i in (1, 4):
        items[i].source = SCORED_STUDENT
    _feed(buf, tr, items)
    batch, _ = buf.take(4, replay=True, on_policy=2)
    assert [it.offset for it in batch] == [1, 4, 0, 2]
    batch, _ = buf.take(4, replay=True, on_policy=2)  # no fresh student completion left: replayed ones
    assert [it.offset for it in batch] == [1, 4, 3, 5]
    assert buf.fresh_on_policy() == 0
    batch, _ = buf.take(4, replay=False, on_policy=3)  # used up and no replay: the rest is off-policy
    assert all(not it.on_policy for it in batch)
