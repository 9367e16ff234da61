"""Prompt size limits hold before any tokenization, and a large prompt's tokenization never stalls other streams or
the health check (it used to run on the event loop: 12-30 s stalls for a 20 MB prompt)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import pb
from services.teacher.main import TeacherApp
from tests.teacher.conftest import teacher_settings

BIG = 1_000_000  # characters: allowed by the settings below, seconds of tokenizer work


@pytest.fixture(scope="module")
async def app(
    teacher_engine: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TeacherApp]:
    settings = teacher_settings(
        tiny_model_dir, tmp_path_factory.mktemp("teacher-limits"), worker={"enabled": False},
        max_prompt_chars=BIG + 10, max_prompt_bytes=BIG + 10,
    )  # fmt: skip
    app = await TeacherApp.create(settings, engine=teacher_engine)
    await app.start()
    yield app
    await app.close()


async def test_prompts_over_the_size_limits_are_refused_before_tokenizing(app: TeacherApp) -> None:
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        stub = pb.teacher_grpc.TeacherServiceStub(channel)
        for request, field in (
            (pb.teacher.GenerateRequest(prompt="a" * (BIG + 11)), "prompt"),
            (pb.teacher.GenerateRequest(prompt="é" * (BIG // 2 + 6)), "prompt"),  # chars allowed, bytes not
            (pb.teacher.GenerateRequest(messages=[pb.common.ChatMessage(role="user", content="a" * (BIG + 11))]),
             "messages[0].content"),
        ):  # fmt: skip
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(request):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details().startswith(f"{field}: the prompt is")
            assert time.monotonic() - started < 1.0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Score(pb.teacher.ScoreRequest(prompt="a" * (BIG + 11), completion_token_ids=[1]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_big_prompt_never_stalls_other_streams_or_health(app: TeacherApp) -> None:
    async with grpc.aio.insecure_channel(app.server.address, options=[
        ("grpc.max_send_message_length", 64 << 20)]) as channel:  # fmt: skip
        stub = pb.teacher_grpc.TeacherServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        words = "lorem ipsum dolor sit amet consectetur " * (BIG // 40)
        sampling = pb.common.SamplingParams(max_tokens=4)
        small = pb.teacher.GenerateRequest(prompt="hi", sampling=sampling)
        assert [c async for c in stub.Generate(small)]  # warm: a fresh engine's first steps are slow

        async def big() -> float:
            with pytest.raises(grpc.aio.AioRpcError) as err:  # longer than the tiny model's context, once tokenized
                async for _ in stub.Generate(pb.teacher.GenerateRequest(prompt=words)):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return time.monotonic()

        big_task = asyncio.ensure_future(big())
        await asyncio.sleep(0.2)  # the big request is being tokenized
        started = time.monotonic()
        await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        chunks = [c async for c in stub.Generate(small)]
        other_done = time.monotonic()
        assert chunks and other_done - started < 1.0
        big_done = await big_task
        assert big_done > other_done, "the big prompt finished first: the test did not overlap"
