"""The pipeline worker on the real engine and broker: prompts in, decodable teacher samples out, bad records
dead-lettered while the stream goes on, offsets committed only past acknowledged work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.common import pb
from services.common.kafka import ProtoProducer, ensure_topics, schema_headers
from services.common.settings import KafkaSettings
from services.teacher.main import TeacherApp
from services.teacher.prompts import publish
from services.teacher.samples import sample_id
from services.teacher.sampling import sampling_from_proto
from tests.teacher.conftest import chat_record, read_topic, read_until, running_worker, wait_committed


@pytest.fixture
async def worker_app(
    teacher_engine: Any, tiny_model_dir: Path, tmp_path: Path, kafka_settings: KafkaSettings
) -> AsyncIterator[TeacherApp]:
    async with running_worker(teacher_engine, tiny_model_dir, tmp_path, kafka_settings) as app:
        yield app


async def test_prompts_come_out_as_decodable_teacher_samples(worker_app: TeacherApp) -> None:
    kafka = worker_app.settings.kafka
    engine = worker_app.engine
    records = [
        chat_record("train-1", "Sam has 3 apples and buys 5 more.", reference_answer="8", split=pb.common.SPLIT_TRAIN),
        chat_record("eval-1", "Mia has 9 cards and loses 4.", reference_answer="5", split=pb.common.SPLIT_EVAL),
        pb.common.PromptRecord(prompt_id="text-1", text="Once upon a time", task="story"),
        chat_record(
            "n-2",
            "Leo has 2 pens.",
            sampling=pb.common.SamplingParams(n=2, max_tokens=5, logprobs=3, temperature=0.7),
        ),
    ]
    await asyncio.to_thread(publish, kafka, records)
    received = await asyncio.to_thread(read_topic, kafka, kafka.topic_teacher_samples, pb.common.TeacherSample, 5)
    samples = [r.value for r in received]
    assert len(samples) == 5 and all(s is not None for s in samples)
    assert all(r.key.decode() == r.value.prompt_id for r in received)
    by_prompt: dict[str, list[pb.common.TeacherSample]] = {}
    for s in samples:
        by_prompt.setdefault(s.prompt_id, []).append(s)
    assert sorted(by_prompt) == ["eval-1", "n-2", "text-1", "train-1"]
    assert sorted(s.sample_index for s in by_prompt["n-2"]) == [0, 1]
    source = {r.prompt_id: r for r in records}
    for s in samples:
        record = source[s.prompt_id]
        sampling = sampling_from_proto(record.sampling, worker_app.limits)
        assert s.sample_id == sample_id(s.prompt_id, "tiny-llama", engine.info.revision, sampling, s.sample_index)
        assert s.teacher_model == "tiny-llama" and s.teacher_revision == engine.info.revision
        assert s.task == record.task and s.split == record.split
        assert s.reference_answer == record.reference_answer and s.HasField("reference_answer") == record.HasField(
            "reference_answer"
        )
        if record.WhichOneof("content") == "chat":
            assert s.prompt_text.startswith("<|im_start|>system") and s.prompt_text.endswith("<|im_start|>assistant\n")
            messages = [{"role": m.role, "content": m.content} for m in record.chat.messages]
            assert list(s.prompt_token_ids) == engine.render(messages=messages).token_ids
        else:
            assert s.prompt_text == record.text
            assert list(s.prompt_token_ids) == engine.render(text=record.text).token_ids
        n = len(s.completion_token_ids)
        assert n == sampling.max_tokens or s.finish_reason == pb.common.FINISH_REASON_STOP
        assert s.finish_reason in (pb.common.FINISH_REASON_LENGTH, pb.common.FINISH_REASON_STOP)
        assert s.completion_text == engine.decode(s.completion_token_ids)
        assert s.top_k == sampling.logprobs
        assert len(s.sampled_logprobs) == n and len(s.top_ids) == len(s.top_logprobs) == n * s.top_k
        for i in range(n):
            row = list(s.top_logprobs[i * s.top_k : (i + 1) * s.top_k])
            assert row == sorted(row, reverse=True)
            assert s.sampled_logprobs[i] <= row[0] + 1e-6
        assert s.sampling.temperature == pytest.approx(sampling.temperature) and s.sampling.n == sampling.n
        assert s.timings.total_s > 0 and s.timings.time_to_first_token_s > 0 and s.timings.finished_at.seconds > 0
    assert by_prompt["n-2"][0].sample_id != by_prompt["n-2"][1].sample_id
    # every prompt was acknowledged, so the group's offsets reach the end of the topic
    await wait_committed(worker_app.settings)


async def test_malformed_records_are_dead_lettered_and_the_stream_continues(worker_app: TeacherApp) -> None:
    kafka = worker_app.settings.kafka
    ensure_topics(kafka)
    producer = ProtoProducer(kafka, "test")
    try:
        good = chat_record("good-1", "Ava has 4 eggs.")
        producer.send(kafka.topic_prompts, "good-1", good)
        producer.send_raw(kafka.topic_prompts, b"garbage", b"\xff\xfe not a protobuf", [])
        producer.send_raw(
            kafka.topic_prompts, b"wrong-schema", good.SerializeToString(), schema_headers(pb.common.TeacherSample())
        )
        # A CheckpointEvent parses as a PromptRecord (its registry_uri lands in `text`): without a schema header it
        # must be a dead letter, not a prompt the teacher answers.
        event = pb.common.CheckpointEvent(run_id="r", version=2, registry_uri="file:///registry/2")
        producer.send_raw(kafka.topic_prompts, b"headless", event.SerializeToString(), [])
        producer.send(kafka.topic_prompts, "no-id", pb.common.PromptRecord(text="who am I"))
        producer.send(
            kafka.topic_prompts,
            "bad-sampling",
            chat_record("bad-sampling", "x", sampling=pb.common.SamplingParams(logprobs=99)),
        )
        producer.send(
            kafka.topic_prompts,
            "bad-option",
            chat_record("bad-option", "x", sampling=pb.common.SamplingParams(extra={"beam": "4"})),
        )
        producer.send(
            kafka.topic_prompts, "too-long", pb.common.PromptRecord(prompt_id="too-long", text="seven " * 400)
        )
        producer.send(kafka.topic_prompts, "good-2", chat_record("good-2", "Ben has 6 shells."))
        producer.flush()
    finally:
        producer.close()
    letters = await asyncio.to_thread(read_topic, kafka, kafka.topic_dead_letters, pb.common.DeadLetter, 7)
    reasons = {(r.value.key.decode() or "?"): r.value.reason for r in letters}
    assert sorted(reasons) == [
        "bad-option", "bad-sampling", "garbage", "headless", "no-id", "too-long", "wrong-schema"
    ]  # fmt: skip
    assert "no 'schema' header" in reasons["headless"]
    assert "sampling.logprobs=99" in reasons["bad-sampling"]
    assert "sampling.extra[beam]" in reasons["bad-option"]
    assert "text=" in reasons["too-long"] and "tokens" in reasons["too-long"]
    assert "prompt_id" in reasons["no-id"]
    assert all(r.value.service == "teacher" and r.value.source_topic == kafka.topic_prompts for r in letters)
    samples = await asyncio.to_thread(read_topic, kafka, kafka.topic_teacher_samples, pb.common.TeacherSample, 2)
    assert sorted(s.value.prompt_id for s in samples) == ["good-1", "good-2"]
    await wait_committed(worker_app.settings)


async def test_score_reference_records_become_teacher_forced_samples(worker_app: TeacherApp) -> None:
    """A prompt record with score_reference yields one sample whose completion is the reference, with the teacher's
    top-k at each of its tokens — the same numbers Score gives for that sequence. Without a reference: dead letter."""
    kafka = worker_app.settings.kafka
    engine = worker_app.engine
    sampling = pb.common.SamplingParams(logprobs=4)
    good = chat_record("scored-1", "Ann has 3 pens and buys 4 more.", reference_answer="3 + 4 = 7. The answer is 7.",
                       split=pb.common.SPLIT_TRAIN, sampling=sampling, score_reference=True)  # fmt: skip
    bad = chat_record("scored-none", "Bo has 2 cups.", sampling=sampling, score_reference=True)
    await asyncio.to_thread(publish, kafka, [bad, good])
    samples = await asyncio.to_thread(read_until, kafka, kafka.topic_teacher_samples, pb.common.TeacherSample,
                                     lambda v: v.prompt_id == "scored-1")  # fmt: skip
    (s,) = samples
    assert s.prompt_id == "scored-1" and s.scored_reference and s.sample_index == 0
    reference = engine.encode_completion(good.reference_answer)
    assert list(s.completion_token_ids) == reference and reference[-1] == engine._tokenizer.eos_token_id
    assert s.completion_text == good.reference_answer and s.finish_reason == pb.common.FINISH_REASON_STOP
    n, k = len(reference), 4
    assert s.top_k == k and len(s.sampled_logprobs) == n and len(s.top_ids) == len(s.top_logprobs) == n * k
    scored = await engine.score([*s.prompt_token_ids, *reference], len(s.prompt_token_ids), k)
    assert list(s.top_ids) == scored.top_ids
    assert list(s.sampled_logprobs) == pytest.approx(scored.sampled, abs=1e-4)
    for i in range(n):
        row = list(s.top_logprobs[i * k : (i + 1) * k])
        assert row == sorted(row, reverse=True) and s.sampled_logprobs[i] <= row[0] + 1e-6
    dead = await asyncio.to_thread(read_until, kafka, kafka.topic_dead_letters, pb.common.DeadLetter,
                                  lambda v: b"scored-none" in v.value)  # fmt: skip
    assert len(dead) == 1 and dead[0].reason.startswith("reference_answer=") and dead[0].error_type == "invalid"
    # Nothing was published for the record without a reference.
    assert not [v for v in await asyncio.to_thread(read_until, kafka, kafka.topic_teacher_samples,
                pb.common.TeacherSample, lambda v: v.prompt_id == "scored-none", 3.0)]  # fmt: skip
