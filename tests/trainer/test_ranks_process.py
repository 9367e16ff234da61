"""`distillery trainer serve` with world_size 2 (two gloo ranks as its child processes) on the embedded broker: a rank
is SIGKILLed mid-run, the service restarts both ranks and the run resumes exactly from its newest checkpoint (the
same check as the one-rank resume test); only rank 0 trains the lineage, writes checkpoints and announces them. A
SIGKILLed service takes its ranks with it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import grpc
import pytest

from services.common import pb
from services.common.registry import Registry
from services.common.settings import KafkaSettings
from tests.leftovers import family, kill_all, wait_gone
from tests.teacher.conftest import read_topic
from tests.trainer.conftest import tiny_spec
from tests.trainer.samples import publish
from tests.trainer.test_resume_process import (
    _assert_resumed_exactly,
    _env,
    _free_port,
    _kill,
    _lineage,
    _serve,
    _start_run,
    _trained_all,
    _wait,
)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])
def test_sigkill_of_a_rank_restarts_the_ranks_and_the_run_resumes_exactly(
    killed: int, tiny_teacher: Path, tiny_samples: list, tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    kafka = kafka_settings
    from services.common.kafka import ensure_topics

    ensure_topics(kafka)
    publish(kafka, tiny_samples)
    train = [s for s in tiny_samples if s.split == pb.common.SPLIT_TRAIN]
    expected_items = 2 * len(train)  # each train sample, and its prompt's reference answer
    port = _free_port()
    lineage = tmp_path / "lineage.jsonl"
    home = tmp_path / "home"
    env = _env(tiny_teacher, home, kafka, port, lineage)
    env.update(DISTILLERY_TRAINER_WORLD_SIZE="2", DISTILLERY_TRAINER_RANK_RESTARTS="2")
    log = tmp_path / "trainer.log"
    registry = Registry(home / "registry")
    ranks_file = home / "trainer" / "work" / "ranks" / "ranks.json"

    def ranks() -> dict:
        try:
            return dict(json.loads(ranks_file.read_text()))
        except (OSError, ValueError):
            return {}

    trainer = _serve(env, log)
    processes = []
    try:
        _start_run(port, "ranks", eval_every_steps=2)

        def trained_past_a_checkpoint() -> bool:
            assert '"msg": "run failed"' not in log.read_text(), log.read_text()[-3000:]
            ckpts = registry.checkpoints("ranks")
            steps = [line["step"] for line in _lineage(lineage)]
            return len(ckpts) >= 2 and bool(steps) and max(steps) > ckpts[-1].manifest.step

        _wait(trained_past_a_checkpoint, trainer, log, 300, "steps past the second checkpoint")
        first = ranks()
        assert first["attempt"] == 0 and len(first["pids"]) == 2
        os.kill(first["pids"][killed], signal.SIGKILL)  # rank 0 has trained steps it did not checkpoint
        before = _lineage(lineage)
        first_pid = before[0]["pid"]
        assert first_pid == first["pids"][0]  # rank 0 writes the lineage
        assert sum(len(line["items"]) for line in before) < expected_items, "finished before the kill: more samples"

        def done() -> bool:
            assert '"msg": "run failed"' not in log.read_text(), log.read_text()[-3000:]
            return _trained_all(lineage, first_pid, expected_items)

        _wait(done, trainer, log, 300, "the restarted ranks to train every sample")
        second = ranks()
        assert second["attempt"] == 1 and not set(second["pids"]) & set(first["pids"])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb.trainer_grpc.TrainerServiceStub(channel)
            run = stub.GetRun(pb.trainer.GetRunRequest(run_id="ranks"), timeout=30).run
            assert run.progress.state == pb.trainer.RUN_STATE_RUNNING
        processes = family(trainer.pid)
        assert {p.pid for p in processes} >= set(second["pids"])
        trainer.send_signal(signal.SIGTERM)  # graceful: rank 0 checkpoints, the ranks exit, the run stays resumable
        assert trainer.wait(timeout=180) == 0, log.read_text()[-3000:]
        assert wait_gone(processes, 60) == []
    finally:
        if trainer.poll() is None:
            _kill(trainer)
        kill_all(processes)

    lines = _lineage(lineage)
    assert {line["pid"] for line in lines} == {first["pids"][0], second["pids"][0]}  # only rank 0s trained lineage
    ckpts = registry.checkpoints("ranks")
    _assert_resumed_exactly(lines, first_pid, ckpts, kafka.topic_teacher_samples, train, expected_items)
    # One checkpoint per checkpointed step and one announcement per checkpoint: no rank but rank 0 wrote any.
    steps = [c.manifest.step for c in ckpts]
    assert len(steps) == len(set(steps)), steps
    events = read_topic(kafka, kafka.topic_checkpoints, pb.common.CheckpointEvent, len(ckpts) + 1, 20)
    assert sorted(e.value.version for e in events) == sorted(c.version for c in ckpts)
    state = json.loads((home / "trainer" / "runs" / "ranks.json").read_text())
    assert state["state"] == "RUN_STATE_RUNNING"


@pytest.mark.e2e
async def test_a_two_rank_run_through_the_service_succeeds_announces_and_leaves_no_rank(
    tiny_teacher: Path, tiny_samples: list, tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    import asyncio
    import urllib.request

    import psutil
    from prometheus_client.parser import text_string_to_metric_families

    from services.trainer.main import TrainerApp
    from tests.trainer.conftest import trainer_settings

    publish(kafka_settings, tiny_samples)
    settings = trainer_settings(tiny_teacher, tmp_path / "home", kafka_settings, world_size=2)
    settings = settings.model_copy(update={"torch_threads": 0})  # 0: each rank an equal share of the cores
    app = await TrainerApp.create(settings)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            stub = pb.trainer_grpc.TrainerServiceStub(channel)
            spec = tiny_spec("pair", max_steps=4, eval_every_steps=2, batch_size=5)  # slices of 3 and 2 items
            spec.gate.min_accuracy_ratio = 0.0
            spec.gate.must_beat_promoted = False
            await stub.StartRun(pb.trainer.StartRunRequest(spec=spec))
            seen = [r.progress async for r in stub.WatchRun(pb.trainer.WatchRunRequest(run_id="pair"), timeout=300)]
        final = seen[-1]
        assert final.state == pb.trainer.RUN_STATE_SUCCEEDED, final.error
        assert final.step == 4 and final.tokens_trained > 0 and final.last_eval.step == 4
        ckpts = Registry(settings.registry).checkpoints("pair")
        assert [c.manifest.step for c in ckpts] == [2, 4]
        events = await asyncio.to_thread(read_topic, kafka_settings, kafka_settings.topic_checkpoints,
                                         pb.common.CheckpointEvent, 3, 5)  # fmt: skip
        assert sorted(e.value.step for e in events) == [2, 4]  # one announcement per checkpoint: rank 0's
        body = (
            await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{app.server.metrics_port}/metrics").read()
            )
        ).decode()
        values = {(s.name, tuple(s.labels.items())): s.value for f in text_string_to_metric_families(body)
                  for s in f.samples}  # fmt: skip
        # Rank 0's progress, mirrored on the service's /metrics.
        assert values[("distillery_trainer_step", ())] == 4
        ev = final.last_eval
        assert values[("distillery_trainer_gate_score", (("metric", ev.gate_metric),))] == pytest.approx(ev.gate_score)
    finally:
        await app.close()
    ranks = json.loads((settings.work_dir / "pair" / "ranks.json").read_text())["pids"]
    assert not [p for p in psutil.Process().children(recursive=True) if p.pid in ranks and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]  # fmt: skip


@pytest.mark.e2e
def test_a_sigkilled_service_takes_its_ranks_with_it(
    tiny_teacher: Path, tiny_samples: list, tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    from services.common.kafka import ensure_topics

    ensure_topics(kafka_settings)
    publish(kafka_settings, tiny_samples)
    port, lineage, home = _free_port(), tmp_path / "lineage.jsonl", tmp_path / "home"
    env = _env(tiny_teacher, home, kafka_settings, port, lineage)
    env.update(DISTILLERY_TRAINER_WORLD_SIZE="2")
    log = tmp_path / "trainer.log"
    trainer = _serve(env, log)
    processes = []
    try:
        _start_run(port, "orphans", eval_every_steps=50)
        _wait(lambda: bool(_lineage(lineage)), trainer, log, 300, "a first step of the two ranks")
        pids = json.loads((home / "trainer" / "work" / "orphans" / "ranks.json").read_text())["pids"]
        processes = [p for p in family(trainer.pid) if p.pid in pids]
        assert len(processes) == 2
        os.kill(trainer.pid, signal.SIGKILL)  # the service alone, not its process group
        trainer.wait(timeout=30)
        assert wait_gone(processes, 30) == []  # PR_SET_PDEATHSIG
    finally:
        if trainer.poll() is None:
            _kill(trainer)
        kill_all(processes)
