"""KafkaHealth on a scripted broker check (unit test of one module): NOT_SERVING only after `unavailable_s` of
failed checks, SERVING at the first good one, missing topics recreated, a hanging check does not delay the verdict."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from services.common import kafka_health
from services.common.kafka_health import KafkaHealth
from services.common.settings import KafkaSettings


async def test_health_follows_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = {"up": True, "created": ["distillery.prompts.v1"]}
    hang = threading.Event()

    def ensure_topics(kafka: Any, topics: Any) -> list[str]:
        if not broker["up"]:
            hang.wait(5)  # a dead broker: the check hangs rather than failing fast
            raise ConnectionError("no broker")
        created, broker["created"] = broker["created"], []
        return created

    monkeypatch.setattr(kafka_health, "ensure_topics", ensure_topics)
    states: list[bool] = []

    async def set_serving(serving: bool) -> None:
        states.append(serving)

    health = KafkaHealth(KafkaSettings(bootstrap="127.0.0.1:1"), set_serving, unavailable_s=0.3, interval_s=0.05)
    await health.tick()
    assert health.reachable and states == [] and health.recreated == ["distillery.prompts.v1"]
    broker["up"] = False
    started = time.monotonic()
    while health.reachable:
        await health.tick()
        assert time.monotonic() - started < 3
    assert states == [False] and time.monotonic() - started >= 0.3
    broker["up"] = True
    hang.set()  # the hanging check fails; the next one succeeds
    while not health.reachable:
        await health.tick()
        assert time.monotonic() - started < 6
    assert states == [False, True]
