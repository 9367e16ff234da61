"""Faults in a real run (in-process trainer, real broker): a poison sample and a batch whose step raises become dead
letters, the run goes on and trains the records after them; past the quarantine limit the run fails clearly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from services.common import pb
from services.common.kafka import ProtoProducer
from services.common.settings import KafkaSettings
from services.trainer import loop
from services.trainer.main import TrainerApp
from tests.teacher.conftest import read_topic
from tests.trainer.conftest import tiny_spec, trainer_settings

pytestmark = pytest.mark.timeout(300)

MARKER = 509  # a valid token id of the tiny vocabulary (512) that only the "explosive" sample's prompt holds


def _stream(samples: list[pb.common.TeacherSample]) -> tuple[list[pb.common.TeacherSample], int, int]:
    """Train samples with an out-of-vocabulary one and one whose step will raise in the middle; their offsets."""
    train = [s for s in samples if s.split == pb.common.SPLIT_TRAIN]
    evals = [s for s in samples if s.split == pb.common.SPLIT_EVAL]
    poison = pb.common.TeacherSample()
    poison.CopyFrom(train[0])
    poison.sample_id = "poison-oov"
    poison.completion_token_ids[1] = 70_000
    explosive = pb.common.TeacherSample()
    explosive.CopyFrom(train[1])
    explosive.sample_id = "explosive"
    explosive.prompt_id = "explosive-prompt"
    explosive.prompt_token_ids.append(MARKER)
    half = 4  # early: 5 steps × 8 items reach well past them (each record gives a sample and a reference item)
    stream = [*evals, *train[:half], poison, explosive, *train[half:]]
    return stream, len(evals) + half, len(evals) + half + 1


def _publish(kafka: KafkaSettings, stream: list[pb.common.TeacherSample]) -> None:
    producer = ProtoProducer(kafka, "test-teacher")
    try:
        for s in stream:  # one key: one partition, offsets in this order
            producer.send(kafka.topic_teacher_samples, "one-partition", s)
        producer.flush(30)
    finally:
        producer.close()


def _explode_on_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop.batch_loss

    def batch_loss(model: Any, batch: Any, *args: Any, **kw: Any) -> Any:
        if bool((batch.input_ids == MARKER).any()):
            raise IndexError("index out of range in self")
        return real(model, batch, *args, **kw)

    monkeypatch.setattr(loop, "batch_loss", batch_loss)


async def _run(app: TrainerApp, spec: pb.trainer.RunSpec) -> pb.trainer.RunProgress:
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        stub = pb.trainer_grpc.TrainerServiceStub(channel)
        await stub.StartRun(pb.trainer.StartRunRequest(spec=spec))
        last = None
        async for response in stub.WatchRun(pb.trainer.WatchRunRequest(run_id=spec.run_id)):
            last = response.progress
        assert last is not None
        return last


async def test_poison_sample_and_raising_batch_are_dead_letters_and_training_goes_on(
    tiny_teacher: Path, tiny_samples: list, tmp_path: Path, kafka_settings: KafkaSettings, monkeypatch: Any
) -> None:
    kafka = kafka_settings
    stream, poison_at, explosive_at = _stream(tiny_samples)
    _publish(kafka, stream)
    _explode_on_marker(monkeypatch)
    lineage = tmp_path / "lineage.jsonl"
    app = await TrainerApp.create(trainer_settings(tiny_teacher, tmp_path / "home", kafka, lineage_log=lineage))
    await app.start(metrics_server=False)
    try:
        spec = tiny_spec("faults", max_steps=5, eval_every_steps=5)
        spec.gate.min_accuracy_ratio = 0.0
        spec.gate.must_beat_promoted = False
        final = await _run(app, spec)
    finally:
        await app.close()
    assert final.state == pb.trainer.RUN_STATE_SUCCEEDED, final.error
    assert final.step == 5
    letters = await asyncio.to_thread(read_topic, kafka, kafka.topic_dead_letters, pb.common.DeadLetter, 2, 30)
    by_type: dict[str, list[pb.common.DeadLetter]] = {}
    for r in letters:
        by_type.setdefault(r.value.error_type, []).append(r.value)
    (oov,) = by_type["invalid"]
    assert oov.offset == poison_at and "token id 70000" in oov.reason and oov.value  # raw record kept
    quarantined = by_type["train_error"]
    assert explosive_at in {d.offset for d in quarantined}
    assert all("IndexError: index out of range" in d.reason for d in quarantined)
    trained = {item[1] for line in lineage.read_text().splitlines() for item in json.loads(line)["items"]}
    assert poison_at not in trained and explosive_at not in trained
    # Records after both faults were trained on (batches take the oldest items first).
    assert any(o > explosive_at for o in trained), sorted(trained)
    dead_offsets = {d.offset for d in quarantined}
    assert not dead_offsets & trained  # a quarantined record never reaches an optimizer step


async def test_past_the_quarantine_limit_the_run_fails_with_a_clear_error(
    tiny_teacher: Path, tiny_samples: list, tmp_path: Path, kafka_settings: KafkaSettings, monkeypatch: Any
) -> None:
    _publish(kafka_settings, _stream(tiny_samples)[0])

    def always_nan(*args: Any, **kw: Any) -> Any:
        raise FloatingPointError("non-finite loss nan")

    monkeypatch.setattr(loop, "batch_loss", always_nan)
    settings = trainer_settings(tiny_teacher, tmp_path / "home", kafka_settings, max_quarantined_batches=1)
    app = await TrainerApp.create(settings)
    await app.start(metrics_server=False)
    try:
        final = await _run(app, tiny_spec("doomed", max_steps=5, eval_every_steps=5))
    finally:
        await app.close()
    assert final.state == pb.trainer.RUN_STATE_FAILED
    assert "max_quarantined_batches=1" in final.error and "FloatingPointError" in final.error
    assert torch is not None
