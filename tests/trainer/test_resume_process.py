"""`distillery trainer serve` as a real process, SIGKILLed during a run and restarted: it resumes the run from the
newest checkpoint and the Kafka offsets in its manifest — no sample skipped, none trained twice (apart from the
steps after that checkpoint, which the killed process had not saved)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from services.common import pb
from services.common.registry import Registry
from services.common.settings import KafkaSettings
from tests.trainer.conftest import tiny_spec
from tests.trainer.samples import publish


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(teacher: Path, home: Path, kafka: KafkaSettings, port: int, lineage: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DISTILLERY_HOME=str(home),
        DISTILLERY_TRAINER_TEACHER_MODEL=str(teacher),
        DISTILLERY_TRAINER_GRPC_PORT=str(port),
        DISTILLERY_TRAINER_METRICS_PORT="0",
        DISTILLERY_TRAINER_TORCH_THREADS="1",
        DISTILLERY_TRAINER_BATCH_WAIT_S="0.3",
        DISTILLERY_TRAINER_LINEAGE_LOG=str(lineage),
        DISTILLERY_KAFKA_BOOTSTRAP=str(kafka.bootstrap),
        DISTILLERY_KAFKA_PARTITIONS=str(kafka.partitions),
        DISTILLERY_KAFKA_TOPIC_PROMPTS=kafka.topic_prompts,
        DISTILLERY_KAFKA_TOPIC_TEACHER_SAMPLES=kafka.topic_teacher_samples,
        DISTILLERY_KAFKA_TOPIC_CHECKPOINTS=kafka.topic_checkpoints,
        DISTILLERY_KAFKA_TOPIC_DEAD_LETTERS=kafka.topic_dead_letters,
    )
    return env


def _serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "trainer", "serve"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _lineage(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut by SIGKILL
            lines.append(json.loads(raw))
    return lines


def _wait(predicate, proc: subprocess.Popen[bytes], log: Path, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"trainer exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _start_run(port: int, run_id: str, eval_every_steps: int, output_vocab_coverage: float = 0.0) -> None:
    """Waits for the trainer service on `port`, then starts an endless tiny run (batches of 4)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=120)
        spec = tiny_spec(run_id, max_steps=0, eval_every_steps=eval_every_steps, batch_size=4)
        spec.student.output_vocab_coverage = output_vocab_coverage
        pb.trainer_grpc.TrainerServiceStub(channel).StartRun(pb.trainer.StartRunRequest(spec=spec), timeout=60)


def _trained_all(lineage: Path, first_pid: int, expected_items: int) -> bool:
    """Whether the processes after `first_pid` trained, with what it trained up to their resumed-from step, every
    item."""
    lines = _lineage(lineage)
    after = [line for line in lines if line["pid"] != first_pid]
    if not after:
        return False
    resumed_from = after[0]["step"] - 1
    kept = [line for line in lines if line["pid"] == first_pid and line["step"] <= resumed_from]
    return sum(len(line["items"]) for line in kept + after) >= expected_items


def _assert_resumed_exactly(
    lines: list[dict], first_pid: int, checkpoints: list, topic: str, train: list, expected_items: int
) -> None:
    """The run resumed from a checkpoint with Kafka offsets, redid the work `first_pid` lost, and trained every item
    exactly once: none twice, none skipped."""
    after = [line for line in lines if line["pid"] != first_pid]
    resumed_from = after[0]["step"] - 1
    resumed = next(c for c in checkpoints if c.manifest.step == resumed_from)
    assert resumed.manifest.kafka_offsets[topic]  # offsets the restart read from
    kept = [line for line in lines if line["pid"] == first_pid and line["step"] <= resumed_from]
    assert any(line["step"] > resumed_from for line in lines if line["pid"] == first_pid)  # lost work, redone
    trained = Counter((p, o, kind) for line in kept + after for p, o, kind, _ in line["items"])
    assert all(n == 1 for n in trained.values()), [k for k, n in trained.items() if n > 1]  # none twice
    assert len(trained) == expected_items  # none skipped
    assert Counter(kind for _, _, kind in trained) == {"sample": len(train), "reference": len(train)}


@pytest.mark.e2e
# A student with a restricted output vocabulary resumes the same way, with the head chosen at its run start.
@pytest.mark.parametrize("coverage", [0.0, pytest.param(0.9, id="restricted-vocabulary", marks=pytest.mark.slow)])
def test_sigkill_then_restart_resumes_from_the_manifest_offsets_with_no_gap(
    tiny_teacher: Path, tiny_samples: list, tmp_path: Path, kafka_settings: KafkaSettings, coverage: float
) -> None:
    kafka = kafka_settings
    from services.common.kafka import ensure_topics

    ensure_topics(kafka)
    publish(kafka, tiny_samples)
    train = [s for s in tiny_samples if s.split == pb.common.SPLIT_TRAIN]
    expected_items = 2 * len(train)  # each train sample, and its prompt's reference answer
    port = _free_port()
    lineage = tmp_path / "lineage.jsonl"
    env = _env(tiny_teacher, tmp_path / "home", kafka, port, lineage)
    log = tmp_path / "trainer.log"
    registry = Registry(tmp_path / "home" / "registry")

    first = _serve(env, log)
    try:
        _start_run(port, "killme", eval_every_steps=2, output_vocab_coverage=coverage)

        def trained_past_a_checkpoint() -> bool:
            ckpts = registry.checkpoints("killme")
            steps = [line["step"] for line in _lineage(lineage)]
            return len(ckpts) >= 2 and bool(steps) and max(steps) > ckpts[-1].manifest.step

        # Kill with trained-but-not-checkpointed steps, the case where resume must not skip or double count.
        _wait(trained_past_a_checkpoint, first, log, 240, "steps past the second checkpoint")
        _kill(first)
    finally:
        if first.poll() is None:
            _kill(first)
    before = _lineage(lineage)
    first_pid = before[0]["pid"]
    trained_before = sum(len(line["items"]) for line in before)
    assert trained_before < expected_items, "the run finished before the kill: give it more samples"

    second = _serve(env, log)
    try:
        _wait(lambda: _trained_all(lineage, first_pid, expected_items), second, log, 240,
              "the resumed run to train every sample")  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb.trainer_grpc.TrainerServiceStub(channel)
            run = stub.GetRun(pb.trainer.GetRunRequest(run_id="killme"), timeout=30).run
            assert run.progress.state == pb.trainer.RUN_STATE_RUNNING
        second.send_signal(signal.SIGTERM)  # graceful: checkpoints, stays resumable
        assert second.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if second.poll() is None:
            _kill(second)

    _assert_resumed_exactly(
        _lineage(lineage), first_pid, registry.checkpoints("killme"), kafka.topic_teacher_samples, train, expected_items
    )
    if coverage:  # every checkpoint, before the kill and after, has the head chosen at the run start
        heads = {json.loads((c.path / "config.json").read_text())["output_vocab_size"] for c in registry.checkpoints(
            "killme")}  # fmt: skip
        sizes = {c.manifest.metrics["output_vocab_size"] for c in registry.checkpoints("killme")}
        coverages = {c.manifest.metrics["output_vocab_coverage"] for c in registry.checkpoints("killme")}
        assert len(heads) == 1 and sizes == heads and len(coverages) == 1, (heads, sizes, coverages)
    # The graceful stop left the run RUNNING on disk, to be resumed by the next start.
    state = json.loads((tmp_path / "home" / "trainer" / "runs" / "killme.json").read_text())
    assert state["state"] == "RUN_STATE_RUNNING"
