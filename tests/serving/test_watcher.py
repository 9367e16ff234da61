"""The checkpoint watcher on the real broker, with a scripted swap handler (no engine): every event it cannot use is
a dead letter with a reason, and the events after it are still handled."""

from __future__ import annotations

import asyncio

import pytest

from services.common import pb
from services.common.kafka import ProtoProducer, ensure_topics, schema_headers
from services.common.settings import KafkaSettings
from services.serving.watcher import CheckpointWatcher
from tests.teacher.conftest import read_topic

pytestmark = pytest.mark.timeout(120)


def event(version: int, promoted: bool = True, uri: str | None = None) -> pb.common.CheckpointEvent:
    return pb.common.CheckpointEvent(
        run_id="r", version=version, registry_uri=f"file:///registry/{version}" if uri is None else uri,
        promoted=promoted,
    )  # fmt: skip


async def test_unusable_checkpoint_events_are_dead_lettered(kafka_settings: KafkaSettings) -> None:
    kafka = kafka_settings
    await asyncio.to_thread(ensure_topics, kafka)
    handled: list[int] = []

    async def handle(ev: pb.common.CheckpointEvent) -> str | None:
        handled.append(ev.version)
        return "checkpoint version 3 refused: sha256 mismatch" if ev.version == 3 else None

    producer = ProtoProducer(kafka, "test")
    topic = kafka.topic_checkpoints
    try:
        # One partition key for all of them: the watcher sees them in this order.
        producer.send_raw(topic, b"r", event(1).SerializeToString(), [])  # no schema header
        prompt = pb.common.PromptRecord(prompt_id="p", text="hi")
        producer.send_raw(topic, b"r", prompt.SerializeToString(), schema_headers(prompt))  # another type
        producer.send_raw(topic, b"r", b"\x0a\xff\xff\xff\x0f", schema_headers(event(1)))  # not protobuf
        producer.send(topic, "r", event(0))  # invalid: no version
        producer.send(topic, "r", event(2, uri=""))  # invalid: no registry uri
        producer.send(topic, "r", event(3))  # refused by serving
        producer.send(topic, "r", event(4, promoted=False))  # usable, nothing to do
        producer.send(topic, "r", event(5))  # served
        producer.flush(30)
    finally:
        producer.close()

    watcher = CheckpointWatcher(kafka, handle, asyncio.get_running_loop(), group_id="watcher-test")
    watcher.start()
    try:
        letters = await asyncio.to_thread(read_topic, kafka, kafka.topic_dead_letters, pb.common.DeadLetter, 6)
        for _ in range(200):
            if handled == [3, 5]:
                break
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(watcher.stop)
    assert handled == [3, 5]
    got = sorted((r.value.offset, r.value.error_type, r.value.reason) for r in letters)
    assert [(o, t) for o, t, _ in got] == [
        (0, "schema"), (1, "schema"), (2, "malformed"), (3, "invalid"), (4, "invalid"), (5, "refused")
    ]  # fmt: skip
    reasons = [why for _, _, why in got]
    assert "no 'schema' header" in reasons[0] and "PromptRecord" in reasons[1]
    assert "version=0" in reasons[3] and "registry_uri is empty" in reasons[4] and "sha256" in reasons[5]
    assert all(r.value.service == "serving" and r.value.source_topic == topic for r in letters)
    assert watcher.dead_lettered == 6
