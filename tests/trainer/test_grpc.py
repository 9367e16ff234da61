"""TrainerService in-process on port 0 with the real broker: status codes, a run end to end, loss going down."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import pb
from services.common.kafka import ProtoConsumer
from services.common.settings import KafkaSettings
from services.trainer.main import TrainerApp
from tests.trainer.conftest import status_of, tiny_spec, trainer_settings
from tests.trainer.samples import publish, publish_raw


@pytest.fixture
async def app(tiny_teacher: Path, tmp_path: Path, kafka_settings: KafkaSettings) -> AsyncIterator[TrainerApp]:
    settings = trainer_settings(tiny_teacher, tmp_path / "home", kafka_settings, lineage_log=tmp_path / "lineage.jsonl")
    app = await TrainerApp.create(settings)
    await app.start()
    yield app
    await app.close()


async def _wait_state(stub: Any, run_id: str, states: tuple[int, ...], timeout_s: float = 240) -> pb.trainer.RunInfo:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        run = (await stub.GetRun(pb.trainer.GetRunRequest(run_id=run_id))).run
        if run.progress.state in states:
            return run
        assert asyncio.get_running_loop().time() < deadline, f"run {run_id} stuck in {run.progress}"
        await asyncio.sleep(0.2)


def _splits(kafka: KafkaSettings, n: int) -> dict[tuple[int, int], int]:
    """(partition, offset) → split of every decodable record on the samples topic."""
    consumer = ProtoConsumer(
        kafka, kafka.topic_teacher_samples, pb.common.TeacherSample, group_id="check-splits", client_name="check"
    )
    out: dict[tuple[int, int], int] = {}
    try:
        for _ in range(100):
            for r in consumer.poll(0.5):
                if r.value is not None:
                    out[(r.partition, r.offset)] = r.value.split
            if len(out) >= n:
                break
    finally:
        consumer.close()
    return out


async def test_status_codes(stub: Any, app: TrainerApp) -> None:
    code, details = await status_of(stub.GetRun(pb.trainer.GetRunRequest(run_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, _ = await status_of(stub.StopRun(pb.trainer.StopRunRequest(run_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await status_of(stub.WatchRun(pb.trainer.WatchRunRequest(run_id="nope")).read())
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await status_of(stub.PromoteCheckpoint(pb.trainer.PromoteCheckpointRequest(version=999)))
    assert code == grpc.StatusCode.NOT_FOUND

    def nan_lr(spec: Any) -> None:
        spec.schedule.learning_rate = float("nan")

    def accuracy_gate_without_checker(spec: Any) -> None:
        spec.checker = ""
        spec.gate.metric = "accuracy"

    invalid: list[tuple[Any, str]] = [
        (lambda spec: setattr(spec.schedule, "batch_size", 0), "spec.schedule.batch_size"),
        (lambda spec: setattr(spec.loss, "jsd_beta", 2.0), "spec.loss.jsd_beta"),
        (lambda spec: setattr(spec.student.pruned, "hidden_size", 4096), "spec.student.pruned.hidden_size"),
        (lambda spec: setattr(spec, "checker", "fuzzy"), "spec.checker='fuzzy'"),
        # A remote caller cannot make the trainer import code: python checkers come only from allowed modules.
        (lambda spec: setattr(spec, "checker", "python:os:system"), "not an allowed checker module"),
        (nan_lr, "spec.schedule.learning_rate=nan"),
        (accuracy_gate_without_checker, "spec.gate.metric='accuracy': needs a checker"),
        (lambda spec: setattr(spec.on_policy, "fraction", 1.5), "spec.on_policy.fraction"),
        (lambda spec: setattr(spec.on_policy.loss, "cross_entropy", 1.0), "spec.on_policy.loss.cross_entropy"),
        (lambda spec: setattr(spec.student, "output_vocab_coverage", 1.5), "spec.student.output_vocab_coverage=1.5"),
    ]
    for change, where in invalid:
        bad = tiny_spec()
        change(bad)
        code, details = await status_of(stub.StartRun(pb.trainer.StartRunRequest(spec=bad)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and where in details, details

    # No samples on the topic: the first run waits for data, so the trainer is busy.
    first = (await stub.StartRun(pb.trainer.StartRunRequest(spec=tiny_spec("busy-1", max_steps=0)))).run
    assert first.progress.state in (pb.trainer.RUN_STATE_QUEUED, pb.trainer.RUN_STATE_RUNNING)
    code, details = await status_of(stub.StartRun(pb.trainer.StartRunRequest(spec=tiny_spec("busy-2"))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "busy-1" in details
    code, _ = await status_of(stub.StartRun(pb.trainer.StartRunRequest(spec=tiny_spec("busy-1"))))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    queued_spec = tiny_spec("busy-3")
    queued_spec.queue = True
    queued = (await stub.StartRun(pb.trainer.StartRunRequest(spec=queued_spec))).run
    assert queued.progress.state == pb.trainer.RUN_STATE_QUEUED
    stopped = (await stub.StopRun(pb.trainer.StopRunRequest(run_id="busy-3"))).run
    assert stopped.progress.state == pb.trainer.RUN_STATE_STOPPED
    await _wait_state(stub, "busy-1", (pb.trainer.RUN_STATE_RUNNING,))
    await stub.StopRun(pb.trainer.StopRunRequest(run_id="busy-1"))
    run = await _wait_state(stub, "busy-1", (pb.trainer.RUN_STATE_STOPPED,))
    assert run.progress.step == 0 and not run.progress.error


async def test_stop_can_evaluate_and_gate_the_final_checkpoint(
    stub: Any, tiny_samples: list, kafka_settings: KafkaSettings
) -> None:
    """StopRun(evaluate=True) (how the demo ends a run at its time budget): the stop checkpoint carries held-out
    metrics and goes through the gate; a plain StopRun's checkpoint has none and is not promoted."""
    publish(kafka_settings, tiny_samples)
    for run_id, evaluate in (("stop-eval", True), ("stop-plain", False)):
        spec = tiny_spec(run_id, max_steps=100_000, eval_every_steps=100_000, sample_reuse=1000)
        spec.gate.min_accuracy_ratio = 0.0  # the tiny teacher is never right: the gate passes on accuracy 0
        spec.gate.must_beat_promoted = False
        await stub.StartRun(pb.trainer.StartRunRequest(spec=spec))
        deadline = asyncio.get_running_loop().time() + 240
        while (await stub.GetRun(pb.trainer.GetRunRequest(run_id=run_id))).run.progress.step < 3:
            assert asyncio.get_running_loop().time() < deadline, "the run never trained"
            await asyncio.sleep(0.2)
        await stub.StopRun(pb.trainer.StopRunRequest(run_id=run_id, evaluate=evaluate))
        run = await _wait_state(stub, run_id, (pb.trainer.RUN_STATE_STOPPED,))
        (last,) = (await stub.ListCheckpoints(pb.trainer.ListCheckpointsRequest(run_id=run_id))).checkpoints
        assert last.step == run.progress.step >= 3
        if evaluate:
            assert "accuracy" in last.metrics and "kl" in last.metrics and last.promoted
            assert run.progress.last_eval.step == last.step and run.progress.promoted_version == last.version
        else:
            assert "accuracy" not in last.metrics and not last.promoted


async def test_run_trains_evaluates_checkpoints_and_announces(
    stub: Any, app: TrainerApp, tiny_samples: list, kafka_settings: KafkaSettings
) -> None:
    """A fixed stream, reused: the loss goes down, eval metrics appear, every checkpoint is announced."""
    publish(kafka_settings, tiny_samples)
    publish_raw(kafka_settings, [b"\xff\x00not a protobuf"])
    spec = tiny_spec("fixed", max_steps=30, eval_every_steps=10, sample_reuse=20)
    spec.gate.min_accuracy_ratio = 0.0  # the tiny teacher is never right: let the gate pass on accuracy 0
    spec.gate.must_beat_promoted = False
    await stub.StartRun(pb.trainer.StartRunRequest(spec=spec))
    seen: list[pb.trainer.RunProgress] = []
    async for response in stub.WatchRun(pb.trainer.WatchRunRequest(run_id="fixed")):
        seen.append(response.progress)
    final = seen[-1]
    assert final.state == pb.trainer.RUN_STATE_SUCCEEDED, final.error
    assert final.step == 30 and final.tokens_trained > 0
    losses = [p.loss for p in seen if p.step > 0]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first * 0.9, (first, last)
    assert set(final.loss_components) == {"forward_kl", "reference_ce"}
    ev = final.last_eval
    assert ev.step == 30 and ev.HasField("kl") and ev.HasField("perplexity") and ev.HasField("accuracy")
    assert ev.HasField("teacher_accuracy") and ev.eval_prompts == 8
    assert final.samples_dropped >= 1  # the garbage record
    # Where the signal came from, counted per trained token: the teacher's answers and the references' text.
    assert set(final.tokens_by_source) == {"generated", "reference"}
    assert sum(final.tokens_by_source.values()) == final.tokens_trained
    assert all(final.loss_by_source[k] > 0 for k in final.tokens_by_source)

    listed = (await stub.ListCheckpoints(pb.trainer.ListCheckpointsRequest(run_id="fixed"))).checkpoints
    assert [c.step for c in listed] == [10, 20, 30]
    assert all(c.promoted for c in listed)  # the gate (accuracy ≥ 0) passes
    assert final.promoted_version == listed[-1].version

    def drain(topic: str, kind: Any, n: int) -> list[Any]:
        consumer = ProtoConsumer(kafka_settings, topic, kind, group_id=f"check-{topic}", client_name="check")
        got: list[Any] = []
        try:
            for _ in range(100):
                got += [r.value for r in consumer.poll(0.5) if r.value is not None]
                if len(got) >= n:
                    break
        finally:
            consumer.close()
        return got

    events = await asyncio.to_thread(drain, kafka_settings.topic_checkpoints, pb.common.CheckpointEvent, 3)
    assert [(e.step, e.promoted, e.run_id) for e in events] == [(10, True, "fixed"), (20, True, "fixed"),
                                                               (30, True, "fixed")]  # fmt: skip
    assert events[0].registry_uri == listed[0].registry_uri and events[0].parameter_count > 0
    letters = await asyncio.to_thread(drain, kafka_settings.topic_dead_letters, pb.common.DeadLetter, 1)
    assert letters[0].source_topic == kafka_settings.topic_teacher_samples
    assert letters[0].value == b"\xff\x00not a protobuf" and letters[0].service == "trainer"

    url = f"http://127.0.0.1:{app.server.metrics_port}/metrics"
    body = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }
    assert values[("distillery_trainer_step", ())] == 30
    assert values[("distillery_trainer_tokens_trained_total", (("source", "generated"),))] > 0
    assert values[("distillery_trainer_tokens_trained_total", (("source", "scored_student"),))] == 0
    assert values[("distillery_trainer_gate_score", (("metric", "accuracy"),))] == ev.accuracy
    assert values[("distillery_trainer_samples_total", (("result", "dead_letter"),))] >= 1
    assert values[("distillery_trainer_checkpoints_written_total", ())] >= 3
    assert ("distillery_trainer_eval_kl", ()) in values

    # Held-out samples are never trained on; every train sample is.
    split_of = await asyncio.to_thread(_splits, kafka_settings, len(tiny_samples))
    assert len(split_of) == len(tiny_samples)
    assert app.settings.lineage_log is not None
    trained = {(p, o) for line in app.settings.lineage_log.read_text().splitlines()
               for p, o, _, _ in json.loads(line)["items"]}  # fmt: skip
    assert trained == {k for k, split in split_of.items() if split == pb.common.SPLIT_TRAIN}

    # Promote by version is announced too.
    promoted = (await stub.PromoteCheckpoint(pb.trainer.PromoteCheckpointRequest(version=listed[0].version))).checkpoint
    assert promoted.promoted and promoted.version == listed[0].version


async def test_a_run_without_a_checker_is_judged_and_promoted_by_agreement(
    stub: Any, tiny_samples: list, kafka_settings: KafkaSettings
) -> None:
    """No checker, no references used: the held-out score is agreement with the teacher's answers, the gate reads
    it, and the run promotes like a checked one."""
    publish(kafka_settings, tiny_samples)
    spec = tiny_spec("no-checker", max_steps=10, eval_every_steps=5, sample_reuse=20)
    spec.checker = ""
    spec.gate.must_beat_promoted = False
    spec.gate.min_score = 0.0
    await stub.StartRun(pb.trainer.StartRunRequest(spec=spec))
    run = await _wait_state(stub, "no-checker", (pb.trainer.RUN_STATE_SUCCEEDED, pb.trainer.RUN_STATE_FAILED))
    assert run.progress.state == pb.trainer.RUN_STATE_SUCCEEDED, run.progress.error
    ev = run.progress.last_eval
    assert ev.gate_metric == "teacher_agreement" and ev.HasField("teacher_agreement")
    assert ev.gate_score == ev.teacher_agreement and not ev.HasField("accuracy")
    assert not ev.HasField("teacher_accuracy")  # nothing judges the teacher either
    listed = (await stub.ListCheckpoints(pb.trainer.ListCheckpointsRequest(run_id="no-checker"))).checkpoints
    assert [c.promoted for c in listed] == [True, True]
    assert "teacher_agreement" in listed[-1].metrics


async def test_an_evaluation_due_before_the_held_out_answers_is_done_once_they_are_in(
    stub: Any, tiny_samples: list, kafka_settings: KafkaSettings
) -> None:
    """The pipeline sends training prompts before the held-out ones: an evaluation that falls due first leaves an
    unevaluated checkpoint and runs at the first step after every held-out answer is in, not eval_every later."""
    train = [s for s in tiny_samples if s.split == pb.common.SPLIT_TRAIN]
    held = [s for s in tiny_samples if s.split == pb.common.SPLIT_EVAL]
    publish(kafka_settings, train)  # 48 samples: 6 steps of 8, then the run waits for data
    spec = tiny_spec("late-held-out", max_steps=0, eval_every_steps=5, sample_reuse=1)
    spec.loss.CopyFrom(pb.trainer.LossSpec(forward_kl=1.0))  # one item per sample: no reference items
    spec.eval.min_eval_samples = len(held)
    spec.gate.min_accuracy_ratio = 0.0
    spec.gate.must_beat_promoted = False
    await stub.StartRun(pb.trainer.StartRunRequest(spec=spec))
    deadline = asyncio.get_running_loop().time() + 240
    while (await stub.GetRun(pb.trainer.GetRunRequest(run_id="late-held-out"))).run.progress.step < 6:
        assert asyncio.get_running_loop().time() < deadline, "the run never trained"
        await asyncio.sleep(0.2)
    (first,) = (await stub.ListCheckpoints(pb.trainer.ListCheckpointsRequest(run_id="late-held-out"))).checkpoints
    assert first.step == 5 and "accuracy" not in first.metrics and not first.promoted
    more = []
    for s in train[:8]:  # one more batch, behind the held-out answers
        copy = pb.common.TeacherSample()
        copy.CopyFrom(s)
        copy.sample_id += "-again"
        more.append(copy)
    publish(kafka_settings, held + more)
    request = pb.trainer.GetRunRequest(run_id="late-held-out")
    while not (run := (await stub.GetRun(request)).run).progress.last_eval.step:
        assert asyncio.get_running_loop().time() < deadline, run.progress
        await asyncio.sleep(0.2)
    assert run.progress.last_eval.step == 7 and run.progress.last_eval.HasField("accuracy")
    await stub.StopRun(pb.trainer.StopRunRequest(run_id="late-held-out"))
