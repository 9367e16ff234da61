"""Fuzzing every ServingService RPC against the real servicer before any model is loaded (no engine, no broker):
the request validation and registry confinement paths, in the default suite at a few seconds' cost."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import pb
from services.serving.settings import ServingSettings
from tests.fuzz import Fuzzer, Rpc

SERVICE = "/distillery.serving.v1.ServingService/"
RPCS = [
    Rpc(SERVICE + "Generate", pb.serving.GenerateRequest, streaming=True),
    Rpc(SERVICE + "GetModel", pb.serving.GetModelRequest),
    Rpc(SERVICE + "LoadModel", pb.serving.LoadModelRequest),
]


async def _no_engine(path: Path) -> Any:
    raise AssertionError(f"a fuzzed request made the service start an engine for {path}")


async def test_fuzz_every_serving_rpc_before_a_model_is_loaded(tmp_path: Path) -> None:
    from services.serving.main import ServingApp

    app = ServingApp(ServingSettings(home=tmp_path, grpc_port=0, watch_checkpoints=False), _no_engine)
    await app.start(metrics_server=False)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            fuzzer = Fuzzer(channel, asyncio.get_running_loop(), timeout_s=5.0)
            for rpc in RPCS:
                await asyncio.to_thread(fuzzer.run, rpc, 60)
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING  # the truth: nothing loaded yet
            stub = pb.serving_grpc.ServingServiceStub(channel)
            try:
                await stub.GetModel(pb.serving.GetModelRequest())
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
        print(f"serving (no model) fuzz: {fuzzer.examples} examples {fuzzer.codes}")
        assert fuzzer.examples == 3 * 60
    finally:
        await app.stop()
