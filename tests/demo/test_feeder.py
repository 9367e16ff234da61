"""The prompt feeder against the real embedded broker: the held-out prompts go first, the rest waits for them."""

from __future__ import annotations

import threading
import time

from services.common import pb
from services.common.settings import KafkaSettings
from services.demo.feeder import Feeder
from tests.teacher.conftest import read_topic


def _records(n: int) -> list[pb.common.PromptRecord]:
    return [pb.common.PromptRecord(prompt_id=f"p{i}", task="t", text=f"prompt {i}") for i in range(n)]


def _wait(condition, timeout_s: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_rest_is_published_only_once_the_first_records_are_answered(kafka_settings: KafkaSettings) -> None:
    # Everything was published at once: the teacher's engine interleaved 6,000 scoring requests with the held-out
    # generations, and after 600 s the held-out set was still incomplete (the run was never evaluated).
    answered = threading.Event()
    asked: list[bool] = []

    def released() -> bool:
        asked.append(answered.is_set())
        return asked[-1]

    feeder = Feeder(kafka_settings, _records(10), lambda: 0.0, max_backlog=100, poll_s=0.05, hold_at=4,
                    released=released)  # fmt: skip
    feeder.start()
    try:
        # It asked several times whether the first 4 were answered, and published nothing more meanwhile.
        assert _wait(lambda: len(asked) >= 5)
        assert feeder.published == 4 and not feeder.done
        answered.set()
        assert _wait(lambda: feeder.done)
    finally:
        feeder.stop()
    assert feeder.error is None
    got = read_topic(kafka_settings, kafka_settings.topic_prompts, pb.common.PromptRecord, want=10)
    assert sorted(r.value.prompt_id for r in got) == sorted(f"p{i}" for i in range(10))  # each exactly once
