"""Fixtures for the trainer tests: a tiny teacher with grouped-query attention (built once per session), and an
in-process trainer service with its stub."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common import pb


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama (hidden 128, 4 query / 2 key-value heads of size 32 — vLLM's CPU attention needs a
    multiple of 32 — MLP 128) with the tiny BPE tokenizer."""
    from services.common.tiny import build_llama

    return build_llama(
        tmp_path_factory.mktemp("tiny-teacher"),
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
        seed=1,
        dtype="float32",
    )


@pytest.fixture(scope="session")
def tiny_samples(tiny_teacher: Path) -> list:
    """48 train + 8 eval teacher samples of the tiny teacher (top-5 log-probs, 10 tokens each)."""
    from tests.trainer.samples import make_samples

    return make_samples(tiny_teacher, 48, 8)


def tiny_spec(run_id: str = "", **schedule: int) -> Any:
    """A run spec for the tiny teacher: a 2-layer pruned student, small batches, frequent checkpoints."""
    from services.common import pb
    from tests.trainer.samples import CHECKER, TASK

    spec = pb.trainer.RunSpec(
        run_id=run_id,
        task=TASK,
        checker=CHECKER,
        student=pb.trainer.StudentRecipe(
            pruned=pb.trainer.PrunedStudent(
                num_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                calibration_samples=8,
            )
        ),
        schedule=pb.trainer.Schedule(batch_size=8, eval_every_steps=5, max_steps=10, learning_rate=3e-3),
        eval=pb.trainer.EvalSpec(min_eval_samples=4, max_new_tokens=8),
    )  # fmt: skip
    for name, value in schedule.items():
        setattr(spec.schedule, name, value)
    return spec


def trainer_settings(teacher: Path, home: Path, kafka: Any, **kw: Any) -> Any:
    from services.trainer.settings import TrainerSettings

    return TrainerSettings(
        home=home, kafka=kafka, teacher_model=str(teacher), grpc_port=0, metrics_port=0, batch_wait_s=0.3,
        torch_threads=2, **kw,
    )  # fmt: skip


@pytest.fixture
async def app(tiny_teacher: Path, tmp_path: Path, kafka_settings: Any) -> AsyncIterator[Any]:
    """A trainer service in this process on the test's broker (port 0), started and closed around the test."""
    from services.trainer.main import TrainerApp

    app = await TrainerApp.create(trainer_settings(tiny_teacher, tmp_path / "home", kafka_settings))
    await app.start()
    yield app
    await app.close()


@pytest.fixture
async def stub(app: Any) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        yield pb.trainer_grpc.TrainerServiceStub(channel)


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""
