"""On-policy distillation end to end on tiny models, through the real broker: the trainer samples from its student,
publishes the completions to the prompts topic, a real teacher (vLLM) scores them and publishes SCORED_STUDENT
samples, and the trainer trains on them with reverse KL (counted apart, per source)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common import pb
from services.common.settings import KafkaSettings
from services.trainer.main import TrainerApp
from tests.teacher.conftest import TINY_VLLM, read_until, teacher_settings
from tests.trainer.conftest import tiny_spec, trainer_settings
from tests.trainer.samples import publish

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(
    tiny_teacher: Path, tmp_path: Path, kafka_settings: KafkaSettings
) -> AsyncIterator[tuple[Any, TrainerApp]]:
    from services.teacher.main import TeacherApp

    # A consumer group of its own: the session's broker also holds the groups of earlier tests' teachers.
    worker = {"group_id": f"teacher-{uuid.uuid4().hex[:6]}", "commit_interval_s": 0.1}
    teacher = await TeacherApp.create(
        teacher_settings(tiny_teacher, tmp_path / "teacher", kafka=kafka_settings, vllm=TINY_VLLM, worker=worker)
    )
    await teacher.start(metrics_server=False)
    trainer = await TrainerApp.create(trainer_settings(tiny_teacher, tmp_path / "trainer", kafka_settings))
    await trainer.start(metrics_server=False)
    try:
        async with grpc.aio.insecure_channel(trainer.server.address) as channel:
            yield pb.trainer_grpc.TrainerServiceStub(channel), trainer
    finally:
        await trainer.close()
        await teacher.close()


# A student with a restricted output vocabulary samples only its head's ids, and trains on their scores the same way.
@pytest.mark.parametrize("coverage", [0.0, pytest.param(0.9, id="restricted-vocabulary", marks=pytest.mark.slow)])
async def test_student_samples_are_scored_by_the_teacher_and_trained_on(
    stack: tuple[Any, TrainerApp], tiny_samples: list, kafka_settings: KafkaSettings, coverage: float
) -> None:
    stub, trainer = stack
    run_id = "onpolicy-restricted" if coverage else "onpolicy"  # the session's broker keeps the other's records
    publish(kafka_settings, tiny_samples)  # the off-policy stream (and the training prompts the student samples)
    spec = tiny_spec(run_id, max_steps=0, eval_every_steps=100_000, sample_reuse=1000)
    spec.student.output_vocab_coverage = coverage
    spec.on_policy.fraction = 0.5
    spec.on_policy.refresh_every_steps = 2
    spec.on_policy.prompts_per_refresh = 8
    spec.on_policy.max_new_tokens = 6
    spec.on_policy.max_staleness_steps = 100_000
    spec.on_policy.loss.reverse_kl = 1.0
    await stub.StartRun(pb.trainer.StartRunRequest(spec=spec))
    # Runs until the teacher's scores of the student's completions have been trained on (a few rounds later).
    deadline = asyncio.get_running_loop().time() + 300
    while True:
        progress = (await stub.GetRun(pb.trainer.GetRunRequest(run_id=run_id))).run.progress
        assert progress.state == pb.trainer.RUN_STATE_RUNNING, progress
        if progress.tokens_by_source["scored_student"] > 0 and "on_policy_reverse_kl" in progress.loss_components:
            break
        assert asyncio.get_running_loop().time() < deadline, progress
        await asyncio.sleep(0.5)
    await stub.StopRun(pb.trainer.StopRunRequest(run_id=run_id))
    final = progress
    assert final.on_policy_requested >= 8 and final.on_policy_received >= 1
    assert final.tokens_by_source["generated"] > 0 and final.loss_by_source["scored_student"] >= 0

    # What crossed the broker: score requests with the student's tokens, and the teacher's scored samples.
    requests = await asyncio.to_thread(
        read_until, kafka_settings, kafka_settings.topic_prompts, pb.common.PromptRecord,
        lambda r: r.HasField("score_completion") and r.score_completion.run_id == run_id,
    )  # fmt: skip
    request = requests[0].score_completion
    assert request.completion_token_ids and request.prompt_token_ids
    if coverage:
        from services.common.models import load_causal_lm

        head = load_causal_lm(trainer.settings.work_dir / run_id / "student-init").lm_head.token_ids.tolist()
        assert set(request.completion_token_ids) <= set(head)
    scored = await asyncio.to_thread(
        read_until, kafka_settings, kafka_settings.topic_teacher_samples, pb.common.TeacherSample,
        lambda s: s.source == pb.common.SAMPLE_SOURCE_SCORED_STUDENT and s.student_run_id == run_id,
    )  # fmt: skip
    sample = scored[0]
    assert sample.split == pb.common.SPLIT_TRAIN
    assert len(sample.top_ids) == sample.top_k * len(sample.completion_token_ids) > 0
    assert all(lp <= 0 for lp in sample.top_logprobs)
