"""Shared fixtures: one real Kafka-protocol broker per test session, unique topics per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from services.common import broker
from services.common.settings import KafkaSettings


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`DISTILLERY_KAFKA_BOOTSTRAP` when set (an external cluster), else an embedded broker for the session."""
    external = os.environ.get("DISTILLERY_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    home = tmp_path_factory.mktemp("broker-home")
    with broker.embedded(home) as state:
        yield state.bootstrap


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    """Kafka settings on the session broker with topics unique to this test (tests never see each other's data)."""
    suffix = uuid.uuid4().hex[:8]
    return KafkaSettings(
        bootstrap=kafka_bootstrap,
        partitions=2,
        topic_prompts=f"test.{suffix}.prompts",
        topic_teacher_samples=f"test.{suffix}.teacher-samples",
        topic_checkpoints=f"test.{suffix}.checkpoints",
        topic_dead_letters=f"test.{suffix}.dead-letters",
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a locally built tokenizer (safetensors), shared by the session."""
    from services.common.tiny import build_llama

    return build_llama(tmp_path_factory.mktemp("tiny-llama"))
