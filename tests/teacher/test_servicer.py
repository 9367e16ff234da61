"""Servicer translation with a fake engine: domain chunks ⇄ protobuf, errors → status codes, stream limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common import pb
from services.common.grpc_server import GrpcServer
from services.common.settings import ServiceSettings
from services.teacher.sampling import Limits
from services.teacher.servicer import TeacherServicer
from tests.teacher.fakes import FakeEngine


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeEngine, Any]]:
    engine = FakeEngine()
    limits = Limits(max_model_len=64, max_logprobs=4, vocab_size=100, default_top_k=2, default_max_tokens=8)
    server = GrpcServer("teacher", ServiceSettings())
    pb.teacher_grpc.add_TeacherServiceServicer_to_server(TeacherServicer(engine, limits, 1), server.server)  # type: ignore[arg-type]
    port = await server.start(metrics=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield engine, pb.teacher_grpc.TeacherServiceStub(channel)
    await server.stop(grace=0)


async def test_generate_translates_chunks(fake: tuple[FakeEngine, Any]) -> None:
    engine, stub = fake
    request = pb.teacher.GenerateRequest(
        messages=[pb.common.ChatMessage(role="user", content="hi")],
        sampling=pb.common.SamplingParams(n=2, temperature=0.5),
    )
    chunks = [c async for c in stub.Generate(request)]
    prompt, sampling = engine.requests[0]
    assert prompt.text == "user:hi" and (sampling.n, sampling.temperature, sampling.max_tokens) == (2, 0.5, 8)
    assert [(c.index, list(c.token_ids), c.text_delta) for c in chunks] == [
        (0, [1, 2], "ab"), (0, [3], "c"), (1, [1, 2], "ab"), (1, [3], "c")
    ]  # fmt: skip
    assert list(chunks[0].prompt_token_ids) == prompt.token_ids and not chunks[1].prompt_token_ids
    first = chunks[0].logprobs
    assert [(lp.token_id, round(lp.logprob, 3), list(lp.top_ids)) for lp in first] == [
        (1, -0.1, [1, 2]),
        (2, -0.2, [2, 3]),
    ]
    assert [list(lp.top_logprobs) == pytest.approx([-0.1, -0.2]) for lp in first] == [True, True]
    assert chunks[1].finish_reason == pb.common.FINISH_REASON_LENGTH and chunks[0].finish_reason == 0
    assert (chunks[1].usage.prompt_tokens, chunks[1].usage.completion_tokens) == (len(prompt.token_ids), 3)
    assert not chunks[0].HasField("usage") and all(c.model == "fake" for c in chunks)


async def test_score_and_get_model_translate(fake: tuple[FakeEngine, Any]) -> None:
    _, stub = fake
    reply = await stub.Score(pb.teacher.ScoreRequest(prompt_token_ids=[5, 6], completion_token_ids=[7, 8], top_k=2))
    assert [(p.token_id, round(p.logprob, 3), list(p.top_ids)) for p in reply.positions] == [
        (7, -0.7, [7, 8]),
        (8, -0.8, [8, 9]),
    ]
    assert list(reply.prompt_token_ids) == [5, 6] and reply.model == "fake"
    info = await stub.GetModel(pb.teacher.GetModelRequest())
    assert (info.model, info.revision, info.max_model_len, info.max_logprobs, info.parameter_count) == (
        "fake",
        "rev1",
        64,
        4,
        7,
    )


async def test_stream_limit_and_engine_errors_map_to_codes(fake: tuple[FakeEngine, Any]) -> None:
    engine, stub = fake
    engine.block = True
    held = stub.Generate(pb.teacher.GenerateRequest(prompt="hold"))
    await asyncio.wait_for(engine.started.wait(), 10)  # the first stream holds the only slot
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [c async for c in stub.Generate(pb.teacher.GenerateRequest(prompt="second"))]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    engine.release.set()
    assert len([c async for c in held]) == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Score(pb.teacher.ScoreRequest(prompt="x" * 70, completion_token_ids=[1]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("prompt=")
