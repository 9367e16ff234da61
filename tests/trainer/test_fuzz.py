"""Fuzzing every TrainerService RPC in-process (the real servicer and run manager, the tiny teacher, the session's
broker). A spec that happens to be valid starts a real run; the app stops it at the end."""

from __future__ import annotations

import grpc
import pytest

from services.common import pb
from services.trainer.main import TrainerApp
from tests.fuzz import Rpc, fuzz

SERVICE = "/distillery.trainer.v1.TrainerService/"
RPCS = [
    Rpc(SERVICE + "StartRun", pb.trainer.StartRunRequest),
    Rpc(SERVICE + "GetRun", pb.trainer.GetRunRequest),
    Rpc(SERVICE + "WatchRun", pb.trainer.WatchRunRequest, streaming=True),
    Rpc(SERVICE + "StopRun", pb.trainer.StopRunRequest),
    Rpc(SERVICE + "ListCheckpoints", pb.trainer.ListCheckpointsRequest),
    Rpc(SERVICE + "PromoteCheckpoint", pb.trainer.PromoteCheckpointRequest),
]


async def _fuzz(app: TrainerApp, examples: int) -> None:
    async with grpc.aio.insecure_channel(app.server.address) as channel:
        stub = pb.trainer_grpc.TrainerServiceStub(channel)

        async def normal() -> None:
            await stub.ListCheckpoints(pb.trainer.ListCheckpointsRequest())

        fuzzer = await fuzz(channel, RPCS, examples, normal, timeout_s=2.0)
    print(f"trainer fuzz: {fuzzer.examples} examples {fuzzer.codes}")


async def test_fuzz_every_trainer_rpc(app: TrainerApp) -> None:
    await _fuzz(app, 40)


@pytest.mark.slow
async def test_fuzz_every_trainer_rpc_long(app: TrainerApp) -> None:
    await _fuzz(app, 400)
