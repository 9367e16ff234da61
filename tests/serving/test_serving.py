"""The serving service end to end on real vLLM engines, the real broker and real gRPC (tiny Llamas).

One service per module (see conftest): it starts with an empty registry, serves v1 once v1's promotion event
arrives, and its tests then swap, refuse and stream against it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.common import pb
from services.serving.loadtest import LoadtestConfig, run_loadtest
from tests.serving.conftest import Served, TinyModels, event_for, nan_weights, poll, register

pytestmark = pytest.mark.timeout(900)


def chat(text: str = "Tom has 3 apples and buys 5 more. How many apples?") -> list[pb.common.ChatMessage]:
    return [pb.common.ChatMessage(role="user", content=text)]


def request(max_tokens: int = 16, **sampling: Any) -> pb.serving.GenerateRequest:
    return pb.serving.GenerateRequest(
        messages=chat(),
        sampling=pb.common.SamplingParams(max_tokens=max_tokens, extra={"ignore_eos": "true"}, **sampling),
    )


async def collect(stub: Any, req: pb.serving.GenerateRequest) -> list[pb.serving.GenerateResponse]:
    return [chunk async for chunk in stub.Generate(req)]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_not_serving_until_the_first_promotion(served: Served) -> None:
    assert served.before_first == {
        "health": health_pb2.HealthCheckResponse.NOT_SERVING,
        "get_model": grpc.StatusCode.NOT_FOUND,
        "generate": grpc.StatusCode.UNAVAILABLE,
    }
    reply = await served.health.Check(health_pb2.HealthCheckRequest(service="distillery.serving.v1.ServingService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    model = (await served.stub.GetModel(pb.serving.GetModelRequest())).model
    assert (model.version, model.run_id, model.registry_uri) == (served.v1.version, "test-run", served.v1.uri)
    assert model.manifest_sha256 == served.v1.manifest_sha256 and model.metrics["accuracy"] == 0.5


async def test_generate_streams_tokens_with_version_and_usage(served: Served) -> None:
    version = await served.version()
    chunks = await collect(served.stub, request(max_tokens=12))
    assert {c.model_version for c in chunks} == {version}
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 12
    last = chunks[-1]
    assert last.finish_reason == pb.common.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 12 and last.usage.prompt_tokens > 5
    assert all(c.finish_reason == pb.common.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    raw = await collect(served.stub, pb.serving.GenerateRequest(prompt="The answer is", sampling=request(3).sampling))
    assert sum(len(c.token_ids) for c in raw) == 3


async def one_by_one_then_paced(served: Served, interval_s: float) -> tuple[list[Any], list[Any], float]:
    """One 40-token greedy stream sent token by token (no interval), then again under `interval_s`; asserts both
    are the same completion. Returns both streams' messages and the paced one's seconds."""
    greedy = request(max_tokens=40, temperature=0.0)
    streams = served.app.streams
    try:
        streams.interval_s = 0.0
        one_by_one = await collect(served.stub, greedy)
        streams.interval_s = interval_s
        started = time.perf_counter()
        paced = await collect(served.stub, greedy)
        seconds = time.perf_counter() - started
    finally:
        streams.interval_s = 0.25
    ids = [t for c in one_by_one for t in c.token_ids]
    assert [t for c in paced for t in c.token_ids] == ids and len(ids) == 40
    assert "".join(c.text_delta for c in paced) == "".join(c.text_delta for c in one_by_one)
    assert paced[-1].finish_reason == pb.common.FINISH_REASON_LENGTH
    return one_by_one, paced, seconds


async def test_a_stream_interval_sends_several_tokens_per_message_and_the_same_completion(served: Served) -> None:
    assert served.app.streams.interval_s == 0.25  # the default (ServingSettings.stream_interval_ms)
    one_by_one, chunked, seconds = await one_by_one_then_paced(served, 0.25)
    assert chunked[-1].usage.completion_tokens == 40
    # Messages are at least 0.25 s apart: at most one per interval (plus the first), however fast the engine runs.
    assert len(chunked) <= 2 + seconds / 0.25, (len(chunked), seconds)
    assert len(chunked) < len(one_by_one)


async def test_under_an_interval_vllm_gathers_tokens_and_the_completion_is_the_same(served: Served) -> None:
    """With a step time measured, a paced stream asks vLLM for an output every N tokens (`pacing.StepClock`): each
    message between the first and the last then carries at least N tokens, even when the interval is shorter than a
    step; the tokens and the text are those of a stream sent token by token."""
    assert served.app.holder.current is not None
    clock = served.app.holder.current.engine._clock  # type: ignore[attr-defined]
    clock.step_s = 1e-6  # N = the cap (8) for the paced stream (the unpaced one before it measures nothing)
    one_by_one, gathered, _ = await one_by_one_then_paced(served, 0.002)
    assert len(one_by_one) > len(gathered)
    assert all(len(c.token_ids) >= clock.max_tokens for c in gathered[1:-1]), [len(c.token_ids) for c in gathered]
    assert len(gathered) <= 2 + 40 // clock.max_tokens
    assert clock.step_s > 1e-5  # the stream's own chunks measured the real step


async def test_a_stream_that_ends_within_its_interval_ends_at_once(served: Served) -> None:
    """The last chunk is sent when the engine finishes, not when the interval is over: a 10 s interval paces the
    messages of a stream that is over in a fraction of that."""
    streams = served.app.streams
    try:
        streams.interval_s = 10.0
        started = time.perf_counter()
        chunks = await collect(served.stub, request(max_tokens=24, temperature=0.0))
        seconds = time.perf_counter() - started
    finally:
        streams.interval_s = 0.25
    assert sum(len(c.token_ids) for c in chunks) == 24 and chunks[-1].finish_reason == pb.common.FINISH_REASON_LENGTH
    assert len(chunks) <= 2  # the first token at once, then everything else when the stream ended
    assert seconds < 5, seconds


def _req(**sampling: Any) -> pb.serving.GenerateRequest:
    return pb.serving.GenerateRequest(messages=chat(), sampling=pb.common.SamplingParams(**sampling))


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        (pb.serving.GenerateRequest(), "messages=[]"),
        (_req(temperature=-0.5), "sampling.temperature=-0.5"),
        (_req(top_p=1.5), "sampling.top_p=1.5"),
        (_req(max_tokens=-3), "sampling.max_tokens=-3"),
        (
            pb.serving.GenerateRequest(messages=[pb.common.ChatMessage(role="bot", content="x")]),
            "messages[0].role='bot'",
        ),
    ],
)
async def test_bad_values_are_invalid_argument(served: Served, req: pb.serving.GenerateRequest, expected: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(served.stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.value.details()


async def test_limits_are_resource_exhausted(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(served.stub, request(max_tokens=5000))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "sampling.max_tokens=5000" in err.value.details()
    long_prompt = pb.serving.GenerateRequest(prompt="one two three " * 200, sampling=request(4).sampling)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(served.stub, long_prompt)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_prompt_tokens" in err.value.details()

    limits = served.app.streams.limits
    saved = limits.max_concurrent_streams
    limits.max_concurrent_streams = 2
    calls = [served.stub.Generate(request(max_tokens=900)) for _ in range(2)]
    try:
        for call in calls:
            await call.read()  # both streams are open
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(served.stub, request(4))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_streams" in err.value.details()
    finally:
        for call in calls:
            call.cancel()
        limits.max_concurrent_streams = saved


async def test_client_cancel_aborts_the_engine_request(served: Served) -> None:
    cancelled = counter("distillery_serving_streams_total", result="cancelled")
    call = served.stub.Generate(request(max_tokens=900))
    await call.read()
    engine = served.app.holder.current.engine
    assert engine.num_unfinished() >= 1
    call.cancel()
    await poll(lambda: engine.num_unfinished() == 0, 30, "the engine to drop the cancelled request")
    await poll(
        lambda: counter("distillery_serving_streams_total", result="cancelled") > cancelled, 10, "cancel counted"
    )
    await poll(lambda: len(served.app.streams.open) == 0, 10, "no open streams")


async def test_promotion_swaps_while_streams_are_open(served: Served, tiny_models: TinyModels) -> None:
    old = await served.version()
    # The reload path needs the standby engine, which starts in the background after the first load.
    await poll(lambda: served.app.holder.standby is not None, 300, "the standby engine", interval_s=0.5)
    swaps_ok = counter("distillery_serving_swaps_total", result="ok")
    switched = asyncio.Event()
    spans: list[tuple[float, float, set[int], int]] = []  # (start, end, versions, tokens) of each stream

    async def keep_streaming() -> None:
        while not switched.is_set():
            begin = time.monotonic()
            chunks = await collect(served.stub, request(max_tokens=900))  # a failed stream raises here
            spans.append((begin, time.monotonic(), {c.model_version for c in chunks},
                          sum(len(c.token_ids) for c in chunks)))  # fmt: skip

    loops = [asyncio.create_task(keep_streaming()) for _ in range(12)]
    await poll(lambda: len(served.app.streams.open) == 12, 60, "12 open streams")
    new = register(served.registry, tiny_models.v2)
    published = time.monotonic()
    served.publish(event_for(new))
    await served.wait_version(new.version, timeout_s=120)
    observed = time.monotonic()
    switched.set()
    await asyncio.gather(*loops)
    after = await collect(served.stub, request(max_tokens=8))
    assert all(len(versions) == 1 for _, _, versions, _ in spans)  # one version per stream, first token to last
    assert all(tokens == 900 for *_, tokens in spans)
    assert all(versions == {old} for begin, _, versions, _ in spans if begin < published)
    assert any(begin < published and end > observed for begin, end, _, _ in spans), "no stream spanned the swap"
    assert {c.model_version for c in after} == {new.version}
    assert counter("distillery_serving_swaps_total", result="ok") == swaps_ok + 1
    health = await served.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_reloaded_weights_match_a_reference_forward_pass(served: Served) -> None:
    """The engine that took the new weights in place computes what the checkpoint says (tied LM head included)."""
    import torch

    from services.common.models import load_causal_lm

    await served.app.swapper.wait_idle()
    engine = served.app.holder.current.engine
    probe = await engine.probe(6)
    reference = load_causal_lm(served.app.holder.current.model.path, dtype=torch.float32)
    prompt = engine.encode_chat((("user", "Tom has 3 apples and buys 5 more. How many apples does he have now?"),))
    ids = torch.tensor([prompt + probe.token_ids])
    with torch.no_grad():
        logits = reference(ids).logits.float()  # [1, T, vocab]
    logprobs = torch.log_softmax(logits[0, len(prompt) - 1 : -1], dim=-1)
    expected = logprobs[torch.arange(len(probe.token_ids)), torch.tensor(probe.token_ids)]
    assert probe.token_ids == logprobs.argmax(-1).tolist()  # greedy tokens agree
    assert max(abs(a - b) for a, b in zip(probe.logprobs, expected.tolist(), strict=True)) < 0.05


CORRUPTIONS = ["bad_sha256", "missing_file", "pickle_weights", "nan_weights"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
async def test_corrupt_checkpoints_are_refused(served: Served, tiny_models: TinyModels, kind: str) -> None:
    await served.app.swapper.wait_idle()
    before = await served.version()
    failed = counter("distillery_serving_swaps_total", result="failed")
    ckpt = register(served.registry, tiny_models.v3, mutate=nan_weights if kind == "nan_weights" else None)
    if kind == "bad_sha256":
        weights = ckpt.path / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif kind == "missing_file":
        (ckpt.path / "tokenizer.json").unlink()
    elif kind == "pickle_weights":
        (ckpt.path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    served.publish(event_for(ckpt))
    await poll(lambda: counter("distillery_serving_swaps_total", result="failed") > failed, 120, "the refusal")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=ckpt.uri))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "registry_uri=" in err.value.details()
    expected = {"bad_sha256": "sha256", "missing_file": "missing", "pickle_weights": "not safetensors",
                "nan_weights": "warm-up failed"}[kind]  # fmt: skip
    assert expected in err.value.details()
    assert await served.version() == before
    chunks = await collect(served.stub, request(max_tokens=4))
    assert {c.model_version for c in chunks} == {before}


async def test_good_checkpoint_after_a_refused_one_and_older_versions_ignored(
    served: Served, tiny_models: TinyModels
) -> None:
    await served.app.swapper.wait_idle()
    good = register(served.registry, tiny_models.v3)
    reply = await served.stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=good.uri))
    assert reply.model.version == good.version and reply.swap_s < 60
    assert {c.model_version for c in await collect(served.stub, request(max_tokens=4))} == {good.version}

    ignored = counter("distillery_serving_swaps_total", result="ignored")
    served.publish(event_for(served.v1))
    await poll(lambda: counter("distillery_serving_swaps_total", result="ignored") > ignored, 60, "ignored")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=served.v1.uri))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await served.version() == good.version
    served.publish(event_for(register(served.registry, tiny_models.v1, promote=False), promoted=False))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await served.stub.LoadModel(pb.serving.LoadModelRequest(registry_uri="/nonexistent/checkpoint"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_metrics_endpoint_parses(served: Served) -> None:
    await collect(served.stub, request(max_tokens=8))
    url = f"http://127.0.0.1:{served.app.server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    wpm = families["distillery_serving_stream_words_per_minute"]
    assert wpm.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in wpm.samples if s.name.endswith("_bucket")}
    assert "238.0" in buckets and buckets["+Inf"] >= 1
    target = families["distillery_reading_target_wpm"]
    assert [s.value for s in target.samples] == [238.0]
    for name in (
        "distillery_serving_generated_tokens",
        "distillery_serving_streams_below_target",
        "distillery_serving_streams",
        "distillery_serving_time_to_first_token_seconds",
        "distillery_serving_inter_token_latency_seconds",
        "distillery_serving_active_streams",
        "distillery_serving_model_version",
        "distillery_serving_model_info",
        "distillery_serving_swaps",
        "distillery_serving_swap_duration_seconds",
    ):
        assert name in families, name
    info = next(s for s in families["distillery_serving_model_info"].samples)
    assert info.labels["version"] == str(await served.version())


async def test_loadtest_with_swaps_against_the_service(served: Served, tiny_models: TinyModels) -> None:
    await served.app.swapper.wait_idle()
    await poll(lambda: served.app.holder.standby is not None, 300, "the standby engine", interval_s=0.5)
    uris = [register(served.registry, m).uri for m in (tiny_models.v1, tiny_models.v2)]
    result = await run_loadtest(
        LoadtestConfig(
            address=served.app.address, concurrency=6, duration_s=8, max_tokens=64, swap_uris=uris, swap_interval_s=2.0
        )
    )
    summary = result.summary()
    assert summary["failed"] == 0, summary["errors"]
    assert summary["completed"] > 6 and summary["tokens_per_s"] > 0
    assert summary["wpm_p50"] is not None and summary["itl_ms_p50"] is not None
    assert summary["mixed_version_streams"] == 0
    assert [s["error"] for s in summary["swaps"]] == [None, None]
    assert len(summary["versions"]) >= 2
    json.dumps(summary)


async def test_loadtest_command_prints_json(served: Served) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "loadtest", "--address", served.app.address, "--concurrency", "2",
        "--duration", "2", "--max-tokens", "16", "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    assert report["failed"] == 0 and report["streams"] >= 2 and not math.isnan(report["tokens_per_s"])


async def test_the_load_generator_runs_in_child_processes_and_their_streams_merge(served: Served) -> None:
    from services.bench.clients import child_pool, loadtest_in_children

    config = LoadtestConfig(address=served.app.address, concurrency=5, duration_s=3, max_tokens=16)
    with child_pool(2) as pool:
        result = await loadtest_in_children(pool, config, processes=2)
        child = pool.submit(os.getpid).result(timeout=60)
    summary = result.summary()
    assert summary["failed"] == 0, summary["errors"]
    assert summary["concurrency"] == 5 and len({s.client for s in result.streams}) == 3  # 3 + 2 clients, ids 0..2
    assert summary["tokens"] == sum(s.tokens for s in result.streams) > 0
    assert child != os.getpid()
