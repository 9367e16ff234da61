"""Fixtures for the trainer tests: a tiny teacher with grouped-query attention, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama (hidden 64, 4 query / 2 key-value heads, MLP 128) with the tiny BPE tokenizer."""
    from services.common.tiny import build_llama

    return build_llama(
        tmp_path_factory.mktemp("tiny-teacher"),
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
        seed=1,
        dtype="float32",
    )
