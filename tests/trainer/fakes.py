"""Stand-ins for the intake's Kafka consumer, for tests of the intake alone."""

from __future__ import annotations

from typing import Any

from services.common.kafka import Received


class ScriptedConsumer:
    """Hands out the given records in order, at most `max_records` a poll."""

    def __init__(self, records: list[Received[Any]]) -> None:
        self.records = records

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Received[Any]]:
        n = max_records or len(self.records)
        out, self.records = self.records[:n], self.records[n:]
        return out
