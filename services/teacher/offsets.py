"""At-least-once offset bookkeeping: commit a partition only up to its lowest record whose work is unfinished.

Records of one partition are started in offset order but finish in any order (a short prompt overtakes a long
one). The committable position is the lowest offset still in flight, or one past the highest started offset when
nothing is in flight: a restart then redoes at most the unfinished records (duplicates), never skips one (gaps).
"""

from __future__ import annotations

import threading


class PartitionOffsets:
    """In-flight offsets of one partition while a worker owns it (a partition it gets back after someone else had it
    gets a new object; one it keeps through a rebalance keeps its object).

    Thread-safe: the worker's event loop starts and finishes records, the consumer thread reads positions
    when partitions are revoked.
    """

    def __init__(self, committed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._next: int | None = None
        self.committed = committed
        self.revoked = False

    def start(self, offset: int) -> None:
        with self._lock:
            self._in_flight.add(offset)
            if self._next is None or offset >= self._next:
                self._next = offset + 1

    def finish(self, offset: int) -> None:
        with self._lock:
            self._in_flight.discard(offset)

    @property
    def next_offset(self) -> int | None:
        """One past the highest offset started: where reading goes on. None when nothing was started."""
        with self._lock:
            return self._next

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def committable(self) -> int | None:
        """The position to commit (next offset to read), or None when nothing was started."""
        with self._lock:
            if self._in_flight:
                return min(self._in_flight)
            return self._next

    def to_commit(self) -> int | None:
        """The committable position when it moved past the last commit, else None."""
        position = self.committable()
        if position is None or (self.committed is not None and position <= self.committed):
            return None
        return position
