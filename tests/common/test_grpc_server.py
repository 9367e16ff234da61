"""Each service's gRPC server bootstrap: health says SERVING, reflection lists the service, errors map to codes."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import pb
from services.common.errors import InvalidArgument, grpc_method
from services.common.grpc_server import GrpcServer
from services.common.settings import ServiceSettings

SERVICES = [
    ("teacher", pb.teacher_grpc.add_TeacherServiceServicer_to_server, pb.teacher_grpc.TeacherServiceServicer,
     "distillery.teacher.v1.TeacherService"),
    ("trainer", pb.trainer_grpc.add_TrainerServiceServicer_to_server, pb.trainer_grpc.TrainerServiceServicer,
     "distillery.trainer.v1.TrainerService"),
    ("serving", pb.serving_grpc.add_ServingServiceServicer_to_server, pb.serving_grpc.ServingServiceServicer,
     "distillery.serving.v1.ServingService"),
]  # fmt: skip


async def _list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        return [s.name for s in response.list_services_response.service]
    return []


@pytest.mark.parametrize(("name", "add", "servicer", "full_name"), SERVICES)
async def test_health_and_reflection(name, add, servicer, full_name) -> None:
    server = GrpcServer(name, ServiceSettings())
    add(servicer(), server.server)
    server.add_service_name(full_name)
    port = await server.start(metrics=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", full_name):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            listed = await _list_services(channel)
            assert full_name in listed
            assert "grpc.health.v1.Health" in listed
    finally:
        await server.stop(grace=0)


class _Errors(pb.serving_grpc.ServingServiceServicer):
    @grpc_method("serving")
    async def GetModel(self, request, context):
        raise InvalidArgument("sampling.top_k", 99, "must be at most 20")

    @grpc_method("serving")
    async def LoadModel(self, request, context):
        raise RuntimeError("boom")

    @grpc_method("serving")
    async def Generate(self, request, context):
        yield pb.serving.GenerateResponse(text_delta="a")
        raise ValueError("prompt='' is empty")


async def test_exceptions_map_to_status_codes() -> None:
    server = GrpcServer("serving", ServiceSettings())
    pb.serving_grpc.add_ServingServiceServicer_to_server(_Errors(), server.server)
    port = await server.start(metrics=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb.serving_grpc.ServingServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.GetModel(pb.serving.GetModelRequest())
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "sampling.top_k=99" in bad.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as internal:
                await stub.LoadModel(pb.serving.LoadModelRequest())
            assert internal.value.code() == grpc.StatusCode.INTERNAL
            assert "boom" not in internal.value.details()
            chunks = []
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for chunk in stub.Generate(pb.serving.GenerateRequest()):
                    chunks.append(chunk.text_delta)
            assert chunks == ["a"]
            assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(grace=0)


async def test_graceful_stop_reports_not_serving() -> None:
    server = GrpcServer("teacher", ServiceSettings())
    server.add_service_name("distillery.teacher.v1.TeacherService")
    port = await server.start(metrics=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await server.health.enter_graceful_shutdown()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.stop(grace=0)


async def test_connection_age_ends_connections_not_calls() -> None:
    """With a maximum connection age, a stream older than it still gets its messages (the server only stops taking
    new calls on that connection), and the client's next calls go over a new connection."""
    import asyncio

    server = GrpcServer("serving", ServiceSettings(max_connection_age_s=0.5))
    port = await server.start(metrics=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(2.0)  # four times the connection's age
            await server.set_serving(False)
            second = await asyncio.wait_for(watch.read(), 10)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            for _ in range(3):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10, wait_for_ready=True)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
                await asyncio.sleep(0.6)
    finally:
        await server.stop(grace=0)
