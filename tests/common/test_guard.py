"""Hostile gRPC callers against the shared server bootstrap: crafted bytes, huge values, floods of idle streams,
cancelled streams (each a case from the hostile-callers issue)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import metrics, pb
from services.common.errors import InvalidArgument, grpc_method
from services.common.grpc_server import GrpcServer
from services.common.guard import bad_utf8_field
from services.common.settings import ServiceSettings


class _Servicer(pb.serving_grpc.ServingServiceServicer):
    """Generate streams one chunk, then waits until the client goes away; GetModel echoes a field in an error."""

    @grpc_method("guard-test")
    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield pb.serving.GenerateResponse(text_delta=request.prompt[:8])
        if request.prompt.startswith("busy"):  # streams as fast as the client reads: cancelled while writing
            while True:
                yield pb.serving.GenerateResponse(text_delta="x" * 1000)
        await asyncio.Event().wait()

    @grpc_method("guard-test")
    async def LoadModel(self, request: Any, context: Any) -> Any:
        raise InvalidArgument("registry_uri", request.registry_uri, "not a checkpoint")


async def _poll(done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a plain value, not an event
        await asyncio.sleep(0.05)


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    server = GrpcServer("guard-test", ServiceSettings(max_concurrent_rpcs=48, max_open_streams=32))
    pb.serving_grpc.add_ServingServiceServicer_to_server(_Servicer(), server.server)
    await server.start(metrics=False)
    yield server
    await server.stop(grace=0)


def _raw(channel: grpc.aio.Channel, method: str, streaming: bool = False) -> Callable[..., Any]:
    """A call that sends the given bytes as they are (no serializer): what a hostile client can send."""
    factory = channel.unary_stream if streaming else channel.unary_unary
    return factory(method, request_serializer=None, response_deserializer=None)


async def test_invalid_utf8_is_invalid_argument_naming_the_field(
    server: GrpcServer, caplog: pytest.LogCaptureFixture
) -> None:
    # field 2 (prompt) and field 1 (messages) → ChatMessage field 2 (content), with bytes that are not UTF-8
    prompt = b"\x12\x03a\xff\xfe"
    content = bytes([0x0A, 10]) + b"\x0a\x04user\x12\x02\xc3\x28"
    caplog.set_level(logging.INFO)
    async with grpc.aio.insecure_channel(server.address) as channel:
        generate = _raw(channel, "/distillery.serving.v1.ServingService/Generate", streaming=True)
        for raw, field in ((prompt, "prompt"), (content, "messages.content")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in generate(raw):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(f"{field}: not valid UTF-8")
        load = _raw(channel, "/distillery.serving.v1.ServingService/LoadModel")
        for raw in (b"\x0a\x02\xff\xff", b"\x0a\x7f", b"\xff\xff\xff"):  # bad UTF-8, truncated, garbage
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await load(raw)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raw
        # still serving: a normal request works
        stream = pb.serving_grpc.ServingServiceStub(channel).Generate(pb.serving.GenerateRequest(prompt="hello"))
        assert (await stream.read()).text_delta == "hello"
        stream.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_bad_utf8_field_walks_nested_messages() -> None:
    raw = pb.serving.GenerateRequest(sampling=pb.common.SamplingParams(stop=["ok"])).SerializeToString()
    assert bad_utf8_field(pb.serving.GenerateRequest.DESCRIPTOR, raw) is None
    bad = raw.replace(b"ok", b"\xff\xfe")
    assert bad_utf8_field(pb.serving.GenerateRequest.DESCRIPTOR, bad) == "sampling.stop"


async def test_a_huge_value_is_quoted_briefly(server: GrpcServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    huge = "x" * 2_000_000
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb.serving_grpc.ServingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.LoadModel(pb.serving.LoadModelRequest(registry_uri=huge))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("registry_uri='xxx") and len(err.value.details()) < 400
    assert "2000000 long" in err.value.details()
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


async def test_health_answers_while_streams_fill_their_own_limit(server: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb.serving_grpc.ServingServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        streams = [stub.Generate(pb.serving.GenerateRequest(prompt="idle")) for _ in range(48)]
        results = await asyncio.gather(*(s.read() for s in streams), return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(results) - len(refused) == 32
        assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "max_open_streams" in refused[0].details()
        started = time.monotonic()
        for _ in range(10):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - started < 1.0
        for s in streams:
            s.cancel()
        await _poll(lambda: server.guard.open_streams == 0)  # slots come back when streams are cancelled


async def test_every_cancelled_stream_is_counted(server: GrpcServer) -> None:
    """36-38 of 50 cancelled streams used to be counted as CANCELLED."""
    counter = metrics.GRPC_REQUESTS.labels("guard-test", "Generate", "CANCELLED")
    before = counter._value.get()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb.serving_grpc.ServingServiceStub(channel)
        for batch in range(2):
            streams = [stub.Generate(pb.serving.GenerateRequest(prompt=f"busy{batch}")) for _ in range(25)]
            await asyncio.gather(*(s.read() for s in streams))
            for s in streams:
                s.cancel()
        await _poll(lambda: counter._value.get() >= before + 50)
    assert counter._value.get() == before + 50
