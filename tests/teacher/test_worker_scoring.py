"""The pipeline worker with a fake engine and the real broker: student completions scored on-policy, every sample
marked with its source and prompt variant, bad score_completion records dead-lettered, ids stable on redelivery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.common import pb
from services.common.settings import KafkaSettings
from services.teacher.main import TeacherApp
from services.teacher.prompts import publish
from services.teacher.samples import sample_id, student_sample_id
from services.teacher.sampling import sampling_from_proto
from tests.teacher.conftest import chat_record, end_offsets, read_topic, running_worker, wait_committed
from tests.teacher.fakes import FakeEngine, fake_logprobs

GENERATED = pb.common.SAMPLE_SOURCE_GENERATED
SCORED_REFERENCE = pb.common.SAMPLE_SOURCE_SCORED_REFERENCE
SCORED_STUDENT = pb.common.SAMPLE_SOURCE_SCORED_STUDENT


@pytest.fixture
async def fake_worker(tmp_path: Path, kafka_settings: KafkaSettings) -> AsyncIterator[tuple[TeacherApp, FakeEngine]]:
    engine = FakeEngine()
    async with running_worker(engine, tmp_path, tmp_path, kafka_settings) as app:
        yield app, engine


def student_record(
    prompt_id: str, prompt: list[int], completion: list[int], *, run_id: str = "run-1", step: int = 7, **fields: Any
) -> pb.common.PromptRecord:
    """A record asking the teacher to score a student completion; no chat or text content, as the trainer sends."""
    score = pb.common.StudentCompletion(
        prompt_token_ids=prompt, completion_token_ids=completion, run_id=run_id, student_step=step
    )
    return pb.common.PromptRecord(prompt_id=prompt_id, score_completion=score, **fields)


async def _samples(app: TeacherApp, want: int) -> list[pb.common.TeacherSample]:
    kafka = app.settings.kafka
    received = await asyncio.to_thread(read_topic, kafka, kafka.topic_teacher_samples, pb.common.TeacherSample, want)
    return [r.value for r in received]


def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_score_completion_records_become_one_scored_student_sample(
    fake_worker: tuple[TeacherApp, FakeEngine],
) -> None:
    app, engine = fake_worker
    record = student_record("on-1", [5, 6, 7], [10, 11, 12, 0], task="math_word_problems", reference_answer="8",
                            split=pb.common.SPLIT_TRAIN, prompt_variant="no_system",
                            sampling=pb.common.SamplingParams(logprobs=3))  # fmt: skip
    default_k = student_record("on-default-k", [5], [20, 21])
    student_before = _counter("distillery_teacher_scored_student_tokens_total")
    reference_before = _counter("distillery_teacher_scored_tokens_total")
    await asyncio.to_thread(publish, app.settings.kafka, [record, default_k])
    by_id = {s.prompt_id: s for s in await _samples(app, 2)}
    await wait_committed(app.settings)  # committed only once the sample was acknowledged
    # One prefill each on the student's exact tokens; nothing generated. No k given: the default, capped by the
    # engine's max_logprobs (20 → 4).
    assert sorted(engine.scored) == [([5, 6, 7, 10, 11, 12, 0], 3, 3), ([5, 20, 21], 1, 4)] and not engine.requests
    s = by_id["on-1"]
    assert s.source == SCORED_STUDENT and not s.scored_reference and s.sample_index == 0
    assert list(s.prompt_token_ids) == [5, 6, 7] and list(s.completion_token_ids) == [10, 11, 12, 0]
    assert s.completion_text == engine.decode([10, 11, 12, 0]) and s.finish_reason == pb.common.FINISH_REASON_STOP
    expected = fake_logprobs([10, 11, 12, 0], 3)
    assert s.top_k == 3 and list(s.top_ids) == expected.top_ids
    assert list(s.sampled_logprobs) == pytest.approx([-1.0, -1.1, -1.2, 0.0])  # the teacher's logprob of each token
    assert list(s.top_logprobs) == pytest.approx(expected.top_logprobs)
    assert (s.student_run_id, s.student_step) == ("run-1", 7)
    assert (s.task, s.split, s.prompt_variant, s.reference_answer) == ("math_word_problems", pb.common.SPLIT_TRAIN,
                                                                       "no_system", "8")  # fmt: skip
    assert (s.teacher_model, s.teacher_revision) == ("fake", "rev1")
    assert s.sample_id == student_sample_id("on-1", "fake", "rev1", record.score_completion, "no_system")
    assert s.timings.time_to_first_token_s == s.timings.total_s >= 0 and s.timings.finished_at.seconds > 0
    assert by_id["on-default-k"].top_k == 4 and list(by_id["on-default-k"].completion_token_ids) == [20, 21]
    assert _counter("distillery_teacher_scored_student_tokens_total") - student_before == 6
    assert _counter("distillery_teacher_scored_tokens_total") == reference_before


async def test_generated_and_scored_reference_samples_carry_their_source_and_variant(
    fake_worker: tuple[TeacherApp, FakeEngine],
) -> None:
    app, engine = fake_worker
    records = [
        chat_record("gen-1", "Ann has 3 pens."),
        chat_record("gen-1", "Ann, 3 pens.", prompt_variant="no_system"),
        chat_record("ref-1", "Bo has 2 cups.", reference_answer="2", score_reference=True, prompt_variant="terse"),
    ]
    await asyncio.to_thread(publish, app.settings.kafka, records)
    samples = await _samples(app, 3)
    by_variant = {s.prompt_variant: s for s in samples}
    assert sorted(by_variant) == ["", "no_system", "terse"]
    plain, variant, reference = by_variant[""], by_variant["no_system"], by_variant["terse"]
    assert plain.source == variant.source == GENERATED and not plain.scored_reference
    assert reference.source == SCORED_REFERENCE and reference.scored_reference  # the old bool stays set
    assert list(reference.completion_token_ids) == engine.encode_completion("2")
    sampling = sampling_from_proto(pb.common.SamplingParams(), app.limits)
    # A variant changes the id; records without one keep the id they had before variants existed.
    assert plain.sample_id == sample_id("gen-1", "fake", "rev1", sampling, 0)
    assert variant.sample_id == sample_id("gen-1", "fake", "rev1", sampling, 0, "no_system") != plain.sample_id


async def test_bad_score_completion_records_are_dead_lettered_and_the_stream_continues(
    fake_worker: tuple[TeacherApp, FakeEngine],
) -> None:
    app, engine = fake_worker
    kafka = app.settings.kafka
    bad = [
        student_record("both", [5], [6], score_reference=True, reference_answer="6"),
        student_record("no-completion", [5, 6], []),
        student_record("no-prompt", [], [6]),
        student_record("negative", [5, -1], [6]),
        student_record("out-of-vocab", [5], [6, 7, 8, 100]),
        student_record("too-long", [5] * 40, [6] * 24),  # 64 = max_model_len: no room for the prefill's one token
        student_record("no-logprobs", [5], [6], sampling=pb.common.SamplingParams(logprobs=0)),
    ]
    good = student_record("good", [5] * 40, [6] * 23)
    await asyncio.to_thread(publish, kafka, [*bad, good])
    letters = await asyncio.to_thread(read_topic, kafka, kafka.topic_dead_letters, pb.common.DeadLetter, len(bad))
    reasons = {r.value.key.decode(): r.value.reason for r in letters}
    assert sorted(reasons) == sorted(r.prompt_id for r in bad)
    assert reasons["both"].startswith("score_reference=True: ") and "score_completion" in reasons["both"]
    assert reasons["no-completion"].startswith("score_completion.completion_token_ids=[]: ")
    assert reasons["no-prompt"].startswith("score_completion.prompt_token_ids=[]: ")
    not_a_token = ": not a token id of this model (vocab size 100)"
    assert reasons["negative"] == "score_completion.prompt_token_ids[1]=-1" + not_a_token
    assert reasons["out-of-vocab"] == "score_completion.completion_token_ids[3]=100" + not_a_token
    too_long = reasons["too-long"]
    assert too_long.startswith("score_completion='64 tokens': ") and "max_model_len=64" in too_long
    assert reasons["no-logprobs"].startswith("sampling.logprobs=0: ")
    assert all(r.value.error_type == "invalid" for r in letters)
    # The stream went on: the good record was scored and published, and it is the only sample.
    (sample,) = await _samples(app, 1)
    assert sample.prompt_id == "good" and sample.source == SCORED_STUDENT
    assert [first for _, first, _ in engine.scored] == [40]
    await wait_committed(app.settings)
    assert sum((await asyncio.to_thread(end_offsets, kafka, kafka.topic_teacher_samples)).values()) == 1


async def test_scored_student_sample_ids_are_stable_on_redelivery_and_never_shared(
    fake_worker: tuple[TeacherApp, FakeEngine],
) -> None:
    app, _ = fake_worker
    first = student_record("p", [5, 6], [7, 8, 0])
    others = [
        student_record("p", [5, 6], [7, 9, 0]),  # another completion, same run and step
        student_record("p", [5, 6], [7, 8, 0], step=8),
        student_record("p", [5, 6], [7, 8, 0], run_id="run-2"),
        student_record("p", [5, 6], [7, 8, 0], prompt_variant="no_system"),
    ]
    # The same record twice is what a redelivery looks like to the worker.
    await asyncio.to_thread(publish, app.settings.kafka, [first, first, *others])
    ids = [s.sample_id for s in await _samples(app, 6)]
    assert len(ids) == 6
    expected = student_sample_id("p", "fake", "rev1", first.score_completion)
    assert ids.count(expected) == 2 and len(set(ids)) == 5
