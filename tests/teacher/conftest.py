"""Teacher fixtures: ONE real vLLM engine on the tiny Llama for the whole session (a start takes 20+ s),
in-process teacher apps on port 0 around it (or around a fake engine), and helpers to read topics and offsets."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from services.common import pb
from services.common.kafka import ProtoConsumer, Received
from services.common.settings import KafkaSettings
from services.common.vllm_engine import VllmSettings
from services.teacher.main import TeacherApp
from services.teacher.settings import TeacherSettings

#: Small enough to start fast and leave the 2 shared cores to the rest of the suite.
TINY_VLLM = VllmSettings(
    kv_cache_gib=0.25, max_model_len=256, max_num_seqs=16, max_logprobs=20, enforce_eager=True, omp_threads=2
)


def teacher_settings(model_dir: Path, tmp_path: Path, **overrides: Any) -> TeacherSettings:
    values: dict[str, Any] = dict(
        model=str(model_dir),
        home=tmp_path,
        grpc_port=0,
        metrics_port=0,
        grace_period_s=2.0,
        vllm=TINY_VLLM,
        default_max_tokens=16,
        log_format="text",
    )
    values.update(overrides)
    return TeacherSettings(**values)


@pytest.fixture(scope="session")
async def teacher_engine(tiny_model_dir: Path) -> AsyncIterator[Any]:
    """The session's vLLM engine (real AsyncLLM, engine core in a child process)."""
    from services.teacher.engine import VllmTeacherEngine
    from services.teacher.main import model_revision

    engine = await VllmTeacherEngine.start(
        tiny_model_dir, TINY_VLLM, name="tiny-llama", revision=model_revision(tiny_model_dir), parameter_count=1
    )
    yield engine
    await engine.shutdown()


def read_topic(kafka: KafkaSettings, topic: str, message_type: type, want: int, timeout_s: float = 60.0) -> list:
    """Reads `want` records (or until the timeout) from the start of `topic` in a fresh group."""
    return _read(kafka, topic, message_type, lambda got: len(got) >= want, lambda _: True, timeout_s)


def read_until(kafka: KafkaSettings, topic: str, message_type: type, match: Any, timeout_s: float = 60.0) -> list:
    """Values of `topic` (from its start, fresh group) that `match`, once at least one is found or at the timeout."""
    found = _read(kafka, topic, message_type, bool, lambda r: r.value is not None and match(r.value), timeout_s)
    return [r.value for r in found]


def _read(
    kafka: KafkaSettings,
    topic: str,
    message_type: type,
    enough: Callable[[list], bool],
    keep: Callable[[Received[Any]], bool],
    timeout_s: float,
) -> list:
    consumer = ProtoConsumer(kafka, topic, message_type, group_id=f"reader-{uuid.uuid4().hex}", client_name="reader")
    got: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while not enough(got) and time.monotonic() < deadline:
            got.extend(r for r in consumer.poll(timeout_s=0.5) if keep(r))
    finally:
        consumer.close()
    return got


def chat_record(prompt_id: str, question: str, **fields: Any) -> pb.common.PromptRecord:
    record = pb.common.PromptRecord(prompt_id=prompt_id, task="math_word_problems", **fields)
    record.chat.messages.add(role="user", content=question)
    return record


@contextlib.asynccontextmanager
async def running_worker(
    engine: Any, model_dir: Path, tmp_path: Path, kafka: KafkaSettings, **worker_fields: Any
) -> AsyncIterator[TeacherApp]:
    """An in-process teacher app around `engine` whose pipeline worker is consuming (own consumer group);
    `worker_fields` override its worker settings."""
    worker = {"batch_size": 8, "group_id": f"teacher-{uuid.uuid4().hex[:6]}", "commit_interval_s": 0.1, **worker_fields}
    app = await TeacherApp.create(teacher_settings(model_dir, tmp_path, kafka=kafka, worker=worker), engine=engine)
    await app.start(metrics_server=False)
    try:
        assert app.worker is not None
        await asyncio.wait_for(app.worker.started.wait(), 30)
        yield app
    finally:
        await app.close()


def _committed(kafka: KafkaSettings, group: str, topic: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(kafka.partitions)}
    finally:
        consumer.close()


def end_offsets(kafka: KafkaSettings, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        consumer.assign(tps)
        # read to the end: the fetch high-water marks are right on every broker
        while any(consumer.highwater(tp) is None or consumer.position(tp) < consumer.highwater(tp) for tp in tps):
            consumer.poll(timeout_ms=200)
        return {tp.partition: consumer.highwater(tp) for tp in tps}
    finally:
        consumer.close()


async def wait_committed(settings: TeacherSettings) -> None:
    """Waits until the worker's group has committed every prompt partition up to its end."""
    kafka = settings.kafka
    want = await asyncio.to_thread(end_offsets, kafka, kafka.topic_prompts)
    for _ in range(100):
        got = await asyncio.to_thread(_committed, kafka, settings.worker.group_id, kafka.topic_prompts)
        if all((got.get(p) or 0) == end for p, end in want.items()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"committed {got}, want {want}")
