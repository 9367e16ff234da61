"""Teacher fixtures: ONE real vLLM engine on the tiny Llama for the whole session (a start takes 20+ s),
in-process teacher apps on port 0 around it, and helpers to read topics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.common import pb
from services.common.kafka import ProtoConsumer
from services.common.settings import KafkaSettings
from services.common.vllm_engine import VllmSettings
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
    consumer = ProtoConsumer(kafka, topic, message_type, group_id=f"reader-{time.monotonic_ns()}", client_name="reader")
    got: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < want and time.monotonic() < deadline:
            got.extend(consumer.poll(timeout_s=0.5))
    finally:
        consumer.close()
    return got


def chat_record(prompt_id: str, question: str, **fields: Any) -> pb.common.PromptRecord:
    record = pb.common.PromptRecord(prompt_id=prompt_id, task="math_word_problems", **fields)
    record.chat.messages.add(role="user", content=question)
    return record
