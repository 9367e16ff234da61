"""Kafka plumbing against the real embedded broker: round trips, at-least-once, size limits, dead letters."""

from __future__ import annotations

import time

import pytest
from kafka import TopicPartition

from services.common import pb
from services.common.kafka import (
    SCHEMA_HEADER,
    DeadLetterWriter,
    ProtoConsumer,
    ProtoProducer,
    RecordTooLarge,
    ensure_topics,
    schema_headers,
)
from services.common.settings import KafkaSettings


def _prompt(i: int) -> pb.common.PromptRecord:
    return pb.common.PromptRecord(
        prompt_id=f"p{i}",
        chat=pb.common.ChatMessages(messages=[pb.common.ChatMessage(role="user", content=f"question {i}")]),
        task="math_word_problems",
        reference_answer=str(i),
        split=pb.common.SPLIT_TRAIN,
        sampling=pb.common.SamplingParams(temperature=0.7, n=2),
    )


def _require_id(msg: pb.common.PromptRecord) -> None:
    if not msg.prompt_id:
        raise ValueError("prompt_id is empty")


def _drain(consumer: ProtoConsumer, want: int, timeout_s: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got.extend(consumer.poll(timeout_s=0.5))
    return got


@pytest.fixture
def producer(kafka_settings: KafkaSettings):
    ensure_topics(kafka_settings)
    p = ProtoProducer(kafka_settings, "test")
    yield p
    p.close()


def test_ensure_topics_is_idempotent(kafka_settings: KafkaSettings) -> None:
    assert sorted(ensure_topics(kafka_settings)) == sorted(kafka_settings.topics())
    assert ensure_topics(kafka_settings) == []


def test_round_trip_with_keys_and_headers(kafka_settings: KafkaSettings, producer: ProtoProducer) -> None:
    sent = [_prompt(i) for i in range(20)]
    for msg in sent:
        producer.send(kafka_settings.topic_prompts, msg.prompt_id, msg, {"origin": "test"})
    producer.flush(30)
    consumer = ProtoConsumer(kafka_settings, kafka_settings.topic_prompts, pb.common.PromptRecord, "g1", "t")
    try:
        got = _drain(consumer, len(sent))
    finally:
        consumer.close()
    assert len(got) == len(sent)
    by_id = {r.value.prompt_id: r for r in got}
    for msg in sent:
        rec = by_id[msg.prompt_id]
        assert rec.error is None
        assert rec.value == msg
        assert rec.key == msg.prompt_id.encode()
        assert rec.headers[SCHEMA_HEADER] == "distillery.common.v1.PromptRecord"
        assert rec.headers["schema-version"] == "1"
        assert rec.headers["origin"] == "test"


def test_uncommitted_records_are_delivered_again(kafka_settings: KafkaSettings, producer: ProtoProducer) -> None:
    for i in range(10):
        producer.send(kafka_settings.topic_prompts, f"p{i}", _prompt(i))
    producer.flush(30)
    topic, group = kafka_settings.topic_prompts, "g-at-least-once"

    first = ProtoConsumer(kafka_settings, topic, pb.common.PromptRecord, group, "a")
    got_first = _drain(first, 10)
    first.close()  # stops without committing
    assert len(got_first) == 10

    second = ProtoConsumer(kafka_settings, topic, pb.common.PromptRecord, group, "b")
    got_second = _drain(second, 10)
    assert sorted(r.value.prompt_id for r in got_second) == sorted(r.value.prompt_id for r in got_first)
    commits: dict[TopicPartition, int] = {}
    for r in got_second:
        commits[r.tp] = max(commits.get(r.tp, 0), r.offset + 1)
    second.commit(commits)
    second.close()

    producer.send(topic, "p-new", _prompt(99))
    producer.flush(30)
    third = ProtoConsumer(kafka_settings, topic, pb.common.PromptRecord, group, "c")
    got_third = _drain(third, 1)
    time.sleep(0)  # no extra wait: anything else would have come in the same fetch
    got_third.extend(third.poll(timeout_s=1.0))
    third.close()
    assert [r.value.prompt_id for r in got_third] == ["p99"]


def test_oversized_record_fails_before_the_broker(kafka_settings: KafkaSettings) -> None:
    small = kafka_settings.model_copy(update={"max_message_bytes": 2048})
    ensure_topics(small)
    producer = ProtoProducer(small, "test")
    big = _prompt(1)
    big.text = "x" * 5000
    with pytest.raises(RecordTooLarge, match="max_message_bytes=2048"):
        producer.send(small.topic_prompts, "big", big)
    producer.send(small.topic_prompts, "ok", _prompt(2)).get(timeout=30)
    producer.close()
    consumer = ProtoConsumer(small, small.topic_prompts, pb.common.PromptRecord, "g-size", "t")
    got = _drain(consumer, 1)
    got.extend(consumer.poll(timeout_s=1.0))
    consumer.close()
    assert [r.value.prompt_id for r in got] == ["p2"]


def test_malformed_records_go_to_dead_letters_and_the_stream_continues(
    kafka_settings: KafkaSettings, producer: ProtoProducer
) -> None:
    topic = kafka_settings.topic_prompts
    producer.send(topic, "p1", _prompt(1))
    prompt_headers = schema_headers(pb.common.PromptRecord())
    producer.send_raw(topic, b"garbage", b"\x0a\xff\xff\xff\x0f", prompt_headers)  # truncated length-delimited
    producer.send(topic, "wrong-schema", pb.common.CheckpointEvent(run_id="r"))
    # CheckpointEvent bytes parse as a PromptRecord: without the schema header they must not be guessed at.
    producer.send_raw(topic, b"headless", pb.common.CheckpointEvent(run_id="r", version=2).SerializeToString(), [])
    producer.send(topic, "no-id", pb.common.PromptRecord(task="x"))  # parses, fails validation
    producer.send(topic, "p2", _prompt(2))
    producer.flush(30)

    consumer = ProtoConsumer(kafka_settings, topic, pb.common.PromptRecord, "g-dlq", "t", validate=_require_id)
    dead = DeadLetterWriter(producer, kafka_settings.topic_dead_letters, "test")
    got = _drain(consumer, 6)
    good = []
    for rec in got:
        if rec.error:
            dead.send(rec, rec.error)
        else:
            good.append(rec.value.prompt_id)
    consumer.close()
    assert sorted(good) == ["p1", "p2"]
    assert dead.sent == 4

    dlq = ProtoConsumer(kafka_settings, kafka_settings.topic_dead_letters, pb.common.DeadLetter, "g-dlq-r", "t")
    letters = _drain(dlq, 4)
    dlq.close()
    by_key = {r.value.key: r.value for r in letters}
    assert by_key[b"garbage"].value == b"\x0a\xff\xff\xff\x0f"
    assert "not a valid distillery.common.v1.PromptRecord" in by_key[b"garbage"].reason
    assert "schema header 'distillery.common.v1.CheckpointEvent'" in by_key[b"wrong-schema"].reason
    assert "prompt_id is empty" in by_key[b"no-id"].reason
    assert "no 'schema' header" in by_key[b"headless"].reason
    assert {r.error_type for r in got if r.error} == {"malformed", "schema", "invalid"}
    assert all(letter.source_topic == topic and letter.service == "test" for letter in by_key.values())


def test_lag_comes_from_the_high_water_mark(kafka_settings: KafkaSettings, producer: ProtoProducer) -> None:
    topic = kafka_settings.topic_prompts
    for i in range(12):
        producer.send(topic, f"p{i}", _prompt(i))
    producer.flush(30)
    consumer = ProtoConsumer(kafka_settings, topic, pb.common.PromptRecord, "g-lag", "t")
    consumed, observed = 0, []
    deadline = time.monotonic() + 30
    while consumed < 12 and time.monotonic() < deadline:
        consumed += len(consumer.poll(timeout_s=0.5, max_records=2))
        lag = consumer.lag()
        if lag is not None:
            observed.append((consumed, lag))
    consumer.close()
    assert consumed == 12
    assert observed, "lag never became known"
    assert all(lag == 12 - done for done, lag in observed), observed
    assert observed[-1] == (12, 0)
