"""TeacherService on the real vLLM engine (tiny random Llama), in-process gRPC on port 0."""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import pb
from services.teacher.main import TeacherApp
from tests.teacher.conftest import teacher_settings

BF16_TOLERANCE = 0.1  # logprobs of a bf16 model; Score and Generate batch differently


@pytest.fixture(scope="module")
async def app(
    teacher_engine: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TeacherApp]:
    settings = teacher_settings(
        tiny_model_dir, tmp_path_factory.mktemp("teacher-home"), max_concurrent_streams=2, worker={"enabled": False}
    )
    app = await TeacherApp.create(settings, engine=teacher_engine)
    await app.start()
    yield app
    await app.close()


@pytest.fixture
async def stub(app: TeacherApp) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        yield pb.teacher_grpc.TeacherServiceStub(channel)


def _question(text: str = "Sam has 3 apples and buys 5 more. How many apples does Sam have?") -> list:
    return [pb.common.ChatMessage(role="user", content=text)]


async def _generate(stub: Any, **kwargs: Any) -> list[pb.teacher.GenerateResponse]:
    return [r async for r in stub.Generate(pb.teacher.GenerateRequest(**kwargs))]


async def test_generate_streams_tokens_with_sorted_top_k_including_the_sampled_logprob(
    stub: Any, app: TeacherApp
) -> None:
    sampling = pb.common.SamplingParams(max_tokens=12, logprobs=5, n=2, temperature=1.0)
    chunks = await _generate(stub, messages=_question(), sampling=sampling)
    assert chunks[0].prompt_token_ids and chunks[0].model == "tiny-llama"
    assert all(not c.prompt_token_ids for c in chunks[1:])
    by_index: dict[int, list[pb.teacher.GenerateResponse]] = {}
    for c in chunks:
        by_index.setdefault(c.index, []).append(c)
    assert sorted(by_index) == [0, 1]
    for parts in by_index.values():
        tokens = [t for c in parts for t in c.token_ids]
        logprobs = [lp for c in parts for lp in c.logprobs]
        assert len(tokens) == len(logprobs) == 12
        assert [lp.token_id for lp in logprobs] == tokens
        for lp in logprobs:
            assert len(lp.top_ids) == len(lp.top_logprobs) == 5
            assert all(math.isfinite(x) and x <= 0 for x in [*lp.top_logprobs, lp.logprob])
            assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
            assert lp.logprob <= lp.top_logprobs[0] + 1e-6
            if lp.token_id in lp.top_ids:
                assert lp.logprob == pytest.approx(lp.top_logprobs[list(lp.top_ids).index(lp.token_id)])
            else:
                assert lp.logprob <= lp.top_logprobs[-1] + 1e-6
        last = parts[-1]
        assert last.finish_reason == pb.common.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 12
        assert last.usage.prompt_tokens == len(chunks[0].prompt_token_ids)
        assert "".join(c.text_delta for c in parts)  # text streams along
    # greedy decoding always picks the top-1 token
    greedy = await _generate(
        stub, prompt="The answer is", sampling=pb.common.SamplingParams(temperature=0, max_tokens=6)
    )
    for lp in (lp for c in greedy for lp in c.logprobs):
        assert lp.token_id == lp.top_ids[0] and len(lp.top_ids) == app.limits.default_top_k


async def test_score_agrees_with_generate(stub: Any) -> None:
    sampling = pb.common.SamplingParams(max_tokens=10, logprobs=5, temperature=1.0)
    chunks = await _generate(stub, messages=_question("Mia has 7 stickers and gives away 2."), sampling=sampling)
    tokens = [t for c in chunks for t in c.token_ids]
    generated = [lp for c in chunks for lp in c.logprobs]
    scored = await stub.Score(
        pb.teacher.ScoreRequest(prompt_token_ids=chunks[0].prompt_token_ids, completion_token_ids=tokens, top_k=5)
    )
    assert len(scored.positions) == len(tokens)
    for g, s in zip(generated, scored.positions, strict=True):
        assert s.token_id == g.token_id
        assert s.logprob == pytest.approx(g.logprob, abs=BF16_TOLERANCE)
        assert list(s.top_logprobs) == sorted(s.top_logprobs, reverse=True)
        assert s.top_logprobs[0] == pytest.approx(g.top_logprobs[0], abs=BF16_TOLERANCE)
    # the same prompt as chat messages is tokenized the same way
    by_messages = await stub.Score(
        pb.teacher.ScoreRequest(messages=_question("Mia has 7 stickers and gives away 2."), completion_token_ids=tokens)
    )
    assert list(by_messages.prompt_token_ids) == list(chunks[0].prompt_token_ids)


async def test_get_model(stub: Any, app: TeacherApp) -> None:
    info = await stub.GetModel(pb.teacher.GetModelRequest())
    assert (info.model, info.max_model_len, info.max_logprobs) == ("tiny-llama", 256, 20)
    assert info.revision == app.engine.info.revision and len(info.revision) == 16


LONG = "seven " * 400
BAD_GENERATE = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"messages": [pb.common.ChatMessage(role="user", content="")]}, "messages"),
    ({"messages": [pb.common.ChatMessage(role="robot", content="hi")]}, "messages[0].role"),
    ({"prompt": "x", "messages": _question()}, "prompt"),
    ({"prompt": LONG}, "prompt"),
    ({"prompt": "x", "sampling": pb.common.SamplingParams(logprobs=21)}, "sampling.logprobs"),
    ({"prompt": "x", "sampling": pb.common.SamplingParams(temperature=-1)}, "sampling.temperature"),
    ({"prompt": "x", "sampling": pb.common.SamplingParams(top_p=2)}, "sampling.top_p"),
    ({"prompt": "x", "sampling": pb.common.SamplingParams(max_tokens=0)}, "sampling.max_tokens"),
    ({"prompt": "x", "sampling": pb.common.SamplingParams(n=100)}, "sampling.n"),
    ({"prompt": "x", "sampling": pb.common.SamplingParams(extra={"best_of": "2"})}, "sampling.extra[best_of]"),
    ({"prompt": "x", "sampling": pb.common.SamplingParams(extra={"allowed_token_ids": "[99999]"})}, "sampling"),
]


@pytest.mark.parametrize(("request_fields", "field"), BAD_GENERATE)
async def test_bad_generate_requests_are_invalid_argument_naming_the_field(
    stub: Any, request_fields: dict, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(stub, **request_fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}") and "=" in err.value.details()


BAD_SCORE = [
    ({"prompt": "x"}, "completion_token_ids"),
    ({"prompt": "x", "completion_token_ids": [5], "top_k": 21}, "top_k"),
    ({"prompt": "x", "completion_token_ids": [5000]}, "completion_token_ids[0]"),
    ({"prompt_token_ids": [1, -1], "completion_token_ids": [5]}, "prompt_token_ids[1]"),
    ({"prompt_token_ids": [1], "prompt": "x", "completion_token_ids": [5]}, "prompt"),
    ({"completion_token_ids": [5]}, "prompt"),
    ({"prompt_token_ids": [1] * 200, "completion_token_ids": [5] * 100}, "completion_token_ids"),
]


@pytest.mark.parametrize(("request_fields", "field"), BAD_SCORE)
async def test_bad_score_requests_are_invalid_argument_naming_the_field(
    stub: Any, request_fields: dict, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Score(pb.teacher.ScoreRequest(**request_fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)


async def _wait_until(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _long_request() -> pb.teacher.GenerateRequest:
    # ignore_eos: runs to max_tokens unless cancelled
    sampling = pb.common.SamplingParams(max_tokens=200, extra={"ignore_eos": "true"})
    return pb.teacher.GenerateRequest(prompt="Count to a thousand:", sampling=sampling)


async def test_too_many_streams_is_resource_exhausted_and_cancel_aborts(stub: Any, app: TeacherApp) -> None:
    engine: Any = app.engine
    aborted_before = engine.aborted
    calls = [stub.Generate(_long_request()) for _ in range(2)]  # the limit is 2
    for call in calls:
        await call.read()  # both streams are open and producing
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(stub, prompt="one too many")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit 2" in err.value.details()
    for call in calls:
        call.cancel()
    # the client's cancel reaches the engine: both requests are aborted long before 200 tokens
    await _wait_until(lambda: engine.aborted == aborted_before + 2 and engine.num_unfinished() == 0)
    await _wait_until(lambda: app.servicer.streams.open == 0)
    assert len(await _generate(stub, prompt="room again", sampling=pb.common.SamplingParams(max_tokens=2))) >= 1


async def test_metrics_endpoint_parses_and_has_teacher_metrics(stub: Any, app: TeacherApp) -> None:
    await _generate(stub, prompt="metrics please", sampling=pb.common.SamplingParams(max_tokens=4))
    url = f"http://127.0.0.1:{app.server.metrics_port}/metrics"

    def scrape() -> dict[str, Any]:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {f.name: f for f in text_string_to_metric_families(text)}

    families = await asyncio.to_thread(scrape)
    for name in (
        "distillery_teacher_generated_tokens",
        "distillery_teacher_samples_published",
        "distillery_teacher_prompts_consumed",
        "distillery_teacher_batch_occupancy_ratio",
        "distillery_teacher_requests_running",
        "distillery_teacher_prompt_lag_records",
        "distillery_teacher_time_to_first_token_seconds",
        "distillery_teacher_inter_token_latency_seconds",
        "distillery_grpc_requests",
        "distillery_reading_target_wpm",
    ):
        assert name in families, name
    tokens = families["distillery_teacher_generated_tokens"].samples
    assert any(s.name == "distillery_teacher_generated_tokens_total" and s.value >= 4 for s in tokens)
    ttft = families["distillery_teacher_time_to_first_token_seconds"].samples
    assert any(s.name.endswith("_count") and s.value >= 1 for s in ttft)
    codes = {(s.labels["method"], s.labels["code"]) for s in families["distillery_grpc_requests"].samples}
    assert ("Generate", "OK") in codes and ("Generate", "INVALID_ARGUMENT") in codes
