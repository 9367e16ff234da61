"""Servicer translation with a fake engine: domain chunks ⇄ protobuf, errors → status codes, stream limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from services.common import pb
from services.common.grpc_server import GrpcServer
from services.common.settings import ServiceSettings
from services.teacher.engine import Chunk, Logprobs, ModelInfo, Prompt
from services.teacher.sampling import Limits, Sampling
from services.teacher.servicer import TeacherServicer

INFO = ModelInfo("fake", "rev1", max_model_len=64, max_logprobs=4, vocab_size=100, parameter_count=7, max_num_seqs=8)


def _lp(tokens: list[int], k: int = 2) -> Logprobs:
    # token t: sampled logprob -t/10, top-k ids t, t+1 with logprobs -0.1, -0.2
    out = Logprobs(k)
    for t in tokens:
        out.sampled.append(-t / 10)
        out.top_ids.extend([t, t + 1][:k])
        out.top_logprobs.extend([-0.1, -0.2][:k])
    return out


class FakeEngine:
    info = INFO

    def __init__(self) -> None:
        self.dead: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.requests: list[tuple[Prompt, Sampling]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.block = False

    def render(self, messages: Sequence[dict[str, str]] | None = None, text: str | None = None) -> Prompt:
        content = text if text is not None else "|".join(f"{m['role']}:{m['content']}" for m in messages or [])
        return Prompt(content, [ord(c) % 100 for c in content])

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(97 + t % 26) for t in token_ids)

    async def generate(
        self, prompt: Prompt, sampling: Sampling, request_id: str | None = None, *, stream_interval: int = 1
    ) -> AsyncIterator[Chunk]:
        self.requests.append((prompt, sampling))
        self.started.set()
        if self.block:
            await self.release.wait()
        for index in range(sampling.n):
            yield Chunk(index, [1, 2], "ab", _lp([1, 2]))
            yield Chunk(index, [3], "c", _lp([3]), finish_reason="length")

    async def score(self, token_ids: Sequence[int], first: int, top_k: int) -> Logprobs:
        return _lp(list(token_ids[first:]), top_k)

    def num_unfinished(self) -> int:
        return 0

    async def shutdown(self) -> None:
        pass


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
