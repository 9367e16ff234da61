"""The replay buffer and the offset bookkeeping that makes resume exact.

Every Kafka record becomes zero or more training items (a teacher sample, and the prompt's reference answer the
first time a prompt is seen). A record is *done* when all its items have been trained `sample_reuse` times (or
evicted after at least one use); records that yield no item (filtered, duplicate, eval, dead letter) are done at
once. Per partition, the checkpoint stores the oldest offset not yet done — a restart re-reads from there — plus
the use counts of the items still pending at or after it, so replayed records resume exactly: done ones are
skipped, pending ones come back with their use counts. Nothing is skipped, nothing trained twice.

Batches prefer fresh items, oldest first. Only when fewer fresh items than a batch are available (the trainer is
faster than the teacher) are already-used items replayed, fewest uses first, up to `sample_reuse` uses. When the
buffer is full of fresh items the intake stops reading (back-pressure); used items are evicted oldest first to
make room, so a sample always gets at least one step before it leaves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SAMPLE = "sample"
REFERENCE = "reference"

# Where an item's training signal comes from (RunProgress.tokens_by_source, the report's signal_share): a teacher
# sample of a teacher-written, reference or student completion, or a reference answer trained by cross-entropy only.
GENERATED = "generated"
SCORED_REFERENCE = "scored_reference"
SCORED_STUDENT = "scored_student"
SOURCES = (GENERATED, SCORED_REFERENCE, SCORED_STUDENT, REFERENCE)


@dataclass
class Item:
    """One training sequence: prompt + targets. Teacher items carry top-k (C, K); reference items do not.

    `source` is one of SOURCES; `student_step` the step of the student that wrote a SCORED_STUDENT completion.
    """

    partition: int
    offset: int
    kind: str  # SAMPLE or REFERENCE
    input_ids: list[int]  # prompt then targets, already cut to max_seq_len
    prompt_len: int
    top_ids: np.ndarray | None = None  # (C, K) int64, C = len(input_ids) - prompt_len
    top_logprobs: np.ndarray | None = None  # (C, K) float32
    weight: float = 1.0
    uses: int = 0
    source: str = GENERATED
    student_step: int = -1

    @property
    def on_policy(self) -> bool:
        return self.source == SCORED_STUDENT

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.partition, self.offset, self.kind)

    @property
    def targets(self) -> int:
        return len(self.input_ids) - self.prompt_len


class ReplayBuffer:
    """Bounded, ordered by arrival; see the module docstring for the policy."""

    def __init__(self, capacity: int, reuse: int) -> None:
        self.capacity = capacity
        self.reuse = reuse
        self._items: OrderedDict[tuple[int, int, str], Item] = OrderedDict()
        self._fresh = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def fresh(self) -> int:
        return self._fresh

    def room(self) -> int:
        """How many more items can come in (used items can be evicted for them)."""
        return self.capacity - self._fresh

    def add(self, item: Item) -> list[Item]:
        """Adds an item; returns the used items evicted to make room (they are done)."""
        evicted = []
        while len(self._items) >= self.capacity:
            victim = next((it for it in self._items.values() if it.uses > 0), None)
            if victim is None:
                break  # a soft bound: the intake checks room() first, so this overshoots by one poll at most
            del self._items[victim.key]
            evicted.append(victim)
        self._items[item.key] = item
        if item.uses == 0:
            self._fresh += 1
        return evicted

    def take(self, n: int, replay: bool, on_policy: int = 0) -> tuple[list[Item], list[Item]]:
        """Up to `n` items for the next batch, and those among them now used up (done).

        `on_policy`: how many of the `n` should be scored student completions when there are enough (fresh ones
        first, then, with `replay`, ones with uses left); the rest come from the other items, oldest first.
        """
        chosen: list[Item] = []
        if on_policy > 0:
            chosen = [it for it in self._items.values() if it.uses == 0 and it.on_policy][:on_policy]
            if replay and len(chosen) < on_policy:
                used = [it for it in self._items.values() if it.on_policy and 0 < it.uses < self.reuse]
                chosen += sorted(used, key=lambda it: it.uses)[: on_policy - len(chosen)]
        picked = {id(it) for it in chosen}
        chosen += [it for it in self._items.values() if it.uses == 0 and id(it) not in picked][: n - len(chosen)]
        if replay and len(chosen) < n:
            picked = {id(it) for it in chosen}
            used = [it for it in self._items.values() if 0 < it.uses < self.reuse and id(it) not in picked]
            chosen += sorted(used, key=lambda it: it.uses)[: n - len(chosen)]
        done = []
        for it in chosen:
            if it.uses == 0:
                self._fresh -= 1
            it.uses += 1
            if it.uses >= self.reuse:
                del self._items[it.key]
                done.append(it)
        return chosen, done

    def discard(self, item: Item) -> bool:
        """Removes an item before it is used up (a quarantined batch's); False when it was no longer there."""
        if self._items.get(item.key) is not item:
            return False
        del self._items[item.key]
        if item.uses == 0:
            self._fresh -= 1
        return True

    def fresh_on_policy(self) -> int:
        return sum(1 for it in self._items.values() if it.uses == 0 and it.on_policy)

    def items(self) -> list[Item]:
        return list(self._items.values())


@dataclass
class PartitionState:
    pending: dict[int, int] = field(default_factory=dict)  # offset → items not done
    end: int | None = None  # one past the highest offset read


class OffsetTracker:
    """Which records are done, per partition; `safe_offsets` is what a checkpoint may claim as trained through."""

    def __init__(self, start: dict[int, int] | None = None) -> None:
        self._parts: dict[int, PartitionState] = {}
        for p, off in (start or {}).items():
            self._parts[p] = PartitionState(end=off)

    def read(self, partition: int, offset: int, items: int) -> None:
        st = self._parts.setdefault(partition, PartitionState())
        st.end = offset + 1 if st.end is None else max(st.end, offset + 1)
        if items > 0:
            st.pending[offset] = st.pending.get(offset, 0) + items

    def done(self, partition: int, offset: int) -> None:
        st = self._parts[partition]
        left = st.pending[offset] - 1
        if left:
            st.pending[offset] = left
        else:
            del st.pending[offset]

    def safe_offsets(self) -> dict[int, int]:
        """Per partition: the oldest offset not done (next to read when nothing is pending)."""
        out = {}
        for p, st in self._parts.items():
            if st.pending:
                out[p] = min(st.pending)
            elif st.end is not None:
                out[p] = st.end
        return out

    def ends(self) -> dict[int, int]:
        return {p: st.end for p, st in self._parts.items() if st.end is not None}


def resume_state(tracker: OffsetTracker, buffer: ReplayBuffer) -> dict[str, Any]:
    """JSON for a checkpoint: safe offsets, read ends, and the use counts of pending items."""
    pending: dict[str, dict[str, int]] = {}
    for it in buffer.items():
        pending.setdefault(str(it.partition), {})[f"{it.offset}:{it.kind}"] = it.uses
    return {
        "safe": {str(p): o for p, o in tracker.safe_offsets().items()},
        "end": {str(p): o for p, o in tracker.ends().items()},
        "pending": pending,
    }


@dataclass
class Replay:
    """What a restarted trainer knows about records between a checkpoint's safe offsets and its read ends."""

    end: dict[int, int]
    pending: dict[tuple[int, int], dict[str, int]]  # (partition, offset) → {kind: uses}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Replay:
        pending: dict[tuple[int, int], dict[str, int]] = {}
        for p, entries in state.get("pending", {}).items():
            for key, uses in entries.items():
                offset, kind = key.split(":", 1)
                pending.setdefault((int(p), int(offset)), {})[kind] = int(uses)
        return cls(end={int(p): int(o) for p, o in state.get("end", {}).items()}, pending=pending)

    def seen_before(self, partition: int, offset: int) -> bool:
        """True for a record the checkpointed run had already read (its fate is in `pending` or it is done)."""
        end = self.end.get(partition)
        return end is not None and offset < end

    def uses(self, partition: int, offset: int) -> dict[str, int]:
        """The kinds of items of a re-read record still pending, with their use counts (empty: done)."""
        return self.pending.get((partition, offset), {})
