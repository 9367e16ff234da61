"""`distillery teacher serve` as a real process: SIGKILLed mid-batch and restarted, it loses no prompt
(duplicates allowed, gaps not); when its vLLM engine dies, the process exits non-zero."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from services.common import pb
from services.common.kafka import ProtoConsumer
from services.common.settings import KafkaSettings
from services.teacher.prompts import publish
from tests.teacher.conftest import chat_record

PROMPTS = 60


def _env(tiny_model_dir: Path, home: Path, kafka: KafkaSettings, group: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DISTILLERY_HOME=str(home),
        DISTILLERY_TEACHER_MODEL=str(tiny_model_dir),
        DISTILLERY_TEACHER_GRPC_PORT="0",
        DISTILLERY_TEACHER_METRICS_PORT="0",
        DISTILLERY_TEACHER_GRACE_PERIOD_S="1",
        DISTILLERY_TEACHER_VLLM__ENFORCE_EAGER="true",
        DISTILLERY_TEACHER_VLLM__KV_CACHE_GIB="0.25",
        DISTILLERY_TEACHER_VLLM__MAX_MODEL_LEN="256",
        DISTILLERY_TEACHER_VLLM__MAX_NUM_SEQS="8",
        DISTILLERY_TEACHER_WORKER__BATCH_SIZE="8",
        DISTILLERY_TEACHER_WORKER__GROUP_ID=group,
        DISTILLERY_TEACHER_WORKER__COMMIT_INTERVAL_S="0.2",
        DISTILLERY_KAFKA_BOOTSTRAP=str(kafka.bootstrap),
        DISTILLERY_KAFKA_PARTITIONS=str(kafka.partitions),
        DISTILLERY_KAFKA_TOPIC_PROMPTS=kafka.topic_prompts,
        DISTILLERY_KAFKA_TOPIC_TEACHER_SAMPLES=kafka.topic_teacher_samples,
        DISTILLERY_KAFKA_TOPIC_CHECKPOINTS=kafka.topic_checkpoints,
        DISTILLERY_KAFKA_TOPIC_DEAD_LETTERS=kafka.topic_dead_letters,
        OMP_NUM_THREADS="2",
    )
    return env


def _serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Own session: the server and its engine-core children form one process group we can kill together.
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "teacher", "serve"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _collect(
    consumer: ProtoConsumer,
    seen: dict[str, int],
    until: int,
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    while len(seen) < until:
        assert proc.poll() is None, f"teacher exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, (
            f"{len(seen)} of {until} prompts after {timeout_s}s:\n{log.read_text()[-3000:]}"
        )
        for received in consumer.poll(timeout_s=0.3):
            assert received.value is not None, received.error
            seen[received.value.prompt_id] = seen.get(received.value.prompt_id, 0) + 1


@pytest.mark.e2e
def test_killed_mid_batch_and_restarted_loses_nothing_and_engine_death_exits_non_zero(
    tiny_model_dir: Path, tmp_path: Path, kafka_settings: KafkaSettings
) -> None:
    kafka = kafka_settings
    env = _env(tiny_model_dir, tmp_path, kafka, f"teacher-{uuid.uuid4().hex[:6]}")
    sampling = pb.common.SamplingParams(max_tokens=64, extra={"ignore_eos": "true"})
    records = [
        chat_record(f"p{i:03d}", f"Question {i}: what is {i} plus {i}?", sampling=sampling) for i in range(PROMPTS)
    ]
    publish(kafka, records)
    consumer = ProtoConsumer(
        kafka, kafka.topic_teacher_samples, pb.common.TeacherSample, f"check-{uuid.uuid4().hex[:6]}", "check"
    )
    log = tmp_path / "teacher.log"
    seen: dict[str, int] = {}
    first = _serve(env, log)
    try:
        _collect(consumer, seen, 1, first, log, timeout_s=240)  # the worker is publishing: kill it mid-batch
        _kill_group(first)
        assert len(seen) < PROMPTS, "the worker finished before it could be killed; use more prompts"
        killed_at = len(seen)

        second = _serve(env, log)
        try:
            _collect(consumer, seen, PROMPTS, second, log, timeout_s=240)
            assert sorted(seen) == sorted(r.prompt_id for r in records)  # no gaps; duplicates are allowed
            assert killed_at < PROMPTS

            # The engine core dies → the service notices and exits non-zero.
            cores = [
                p
                for p in psutil.Process(second.pid).children(recursive=True)
                if "EngineCore" in " ".join(p.cmdline()) + p.name()
            ]
            assert cores, [p.name() for p in psutil.Process(second.pid).children(recursive=True)]
            for core in cores:
                core.kill()
            assert second.wait(timeout=90) != 0
        finally:
            if second.poll() is None:
                _kill_group(second)
    finally:
        consumer.close()
        if first.poll() is None:
            _kill_group(first)
